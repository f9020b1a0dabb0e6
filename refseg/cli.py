"""The `refseg` command line.

Each sub-command lives in its own module, which exports two functions:

    add_arguments(parser: argparse.ArgumentParser) -> None
    main(args: argparse.Namespace) -> int

Only the module of the command being run is imported, so `refseg --help`
and light commands start quickly.

Bad input (a malformed data set, an unreadable image, a broken config or
checkpoint, a missing file) ends any command with one line on stderr,
`refseg <command>: error: <message naming the file / field / value>`, and
exit status 2; Ctrl-C ends it with status 130. Other exceptions are bugs
and keep their traceback.
"""

import argparse
import importlib
import sys

# (module, class) of the errors that mean bad input; looked up only in modules already imported
USER_ERRORS = (
    ("refseg.data.image", "ImageReadError"),
    ("refseg.data.refer", "ReferFormatError"),
    ("refseg.engine.config", "ConfigError"),
    ("refseg.engine.checkpoint", "CheckpointError"),
    ("refseg.engine.state", "StateError"),
    ("refseg.engine.train", "TrainError"),
    ("refseg.outputs", "OutputError"),
    ("refseg.modeling.limits", "ModelConfigError"),
    ("refseg.predictor", "ModelOutputError"),
    ("refseg.backends", "BackendError"),
)

# name -> (module, one-line help)
COMMANDS = {
    "make-data": ("refseg.data.synthref.generate", "generate a SynthRef data set in the refer format"),
    "weaken": ("refseg.data.weak", "make the LRB-WREL weak-expression version of a refer data set"),
    "stats": ("refseg.data.stats", "print a summary of a refer-format data set"),
    "train": ("refseg.engine.train_cli", "train a model (or a recipe: configs/<model>.yaml)"),
    "eval": ("refseg.engine.evaluate", "evaluate a checkpoint on a refer-format split"),
    "predict": ("refseg.predict_cli", "segment the object an expression names in an image"),
    "demo": ("refseg.demo_cli", "serve the web demo and the REST API (/segment) on one port"),
    "export": ("refseg.export", "export a model to ONNX (image encoder + text/head graphs)"),
    "bench": ("refseg.bench.run", "every method under every supervision budget: train/load, evaluate, write a report"),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


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
    parser = OneLineErrorParser(prog=f"refseg {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        close_progress_bars()
        print(f"refseg {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (re-raised unless it is bad input)
        if not is_user_error(e):
            raise
        close_progress_bars()
        print(f"refseg {name}: error: {one_line(e)}", file=sys.stderr)
        return 2


def close_progress_bars() -> None:
    """Close the tqdm bars an error left open, so that the message starts on a line of its own
    (a bar ends its line only when it is closed)."""
    tqdm_std = sys.modules.get("tqdm.std")
    if tqdm_std is None:
        return
    for bar in list(getattr(tqdm_std.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001  (a bar that cannot close must not hide the error)
            pass


def is_user_error(e: BaseException) -> bool:
    """True for refseg's bad-input errors and for OS errors (missing file, no permission, disk full)."""
    if isinstance(e, OSError):
        return True
    classes = [getattr(sys.modules[m], c) for m, c in USER_ERRORS if m in sys.modules]
    return isinstance(e, tuple(classes))


def one_line(e: BaseException) -> str:
    """The exception's message on one line (multi-line messages joined with '; ')."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
