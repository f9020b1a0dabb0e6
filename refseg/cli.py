"""The `refseg` command line.

Each sub-command lives in its own module, which exports two functions:

    add_arguments(parser: argparse.ArgumentParser) -> None
    main(args: argparse.Namespace) -> int

Only the module of the command being run is imported, so `refseg --help`
and light commands start quickly.
"""

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "make-data": ("refseg.data.synthref.generate", "generate a SynthRef data set in the refer format"),
    "weaken": ("refseg.data.weak", "make the LRB-WREL weak-expression version of a refer data set"),
    "stats": ("refseg.data.stats", "print a summary of a refer-format data set"),
    "train": ("refseg.engine.train", "train a model"),
    "eval": ("refseg.engine.evaluate", "evaluate a checkpoint on a refer-format split"),
    "predict": ("refseg.predict_cli", "segment the object an expression names in an image"),
    "demo": ("refseg.demo_cli", "serve the web demo and the REST API (/segment) on one port"),
    "export": ("refseg.export", "export a model to ONNX (image encoder + text/head graphs)"),
    "bench": ("refseg.bench", "every method under every supervision budget: train/load, evaluate, write a report"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="refseg",
        description="refseg: referring image segmentation toolkit.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {k:<10} {v[1]}" for k, v in COMMANDS.items()),
    )
    p.add_argument("command", choices=sorted(COMMANDS), metavar="command", help="one of the commands below")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        top = _top_parser()
        if not argv:
            top.print_help()
            return 2
        top.parse_args(argv[:1])  # prints help or a clear "invalid choice" error
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"refseg {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
