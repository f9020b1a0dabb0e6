"""`refseg train`: the command line of the trainer (refseg/engine/train.py) and of recipes (engine/recipe.py).

    refseg train --data data/synthref --batch-size 32 --max-steps 3000 --out runs/lts
    refseg train --config configs/lts-synthref.yaml --out runs/lts     # a recipe: its data and every stage
    refseg train --config runs/lts/config.json --lr 1e-4 --out runs/lts-lr1e-4
    refseg train --resume runs/lts --max-steps 6000       # continue exactly where last/ stopped
    refseg train --overwrite --data D --out runs/lts ...   # start anew in a folder that holds a run
    refseg train --nproc 2 ...                             # = torchrun --nproc_per_node 2 -m refseg.cli train ...
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

from refseg.argtypes import config_flags, positive_int
from refseg.engine import distributed
from refseg.engine.config import add_config_arguments, config_from_args, given_flags, read_config_file
from refseg.engine.train import TrainError, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="processes to train with (launches torchrun --nproc_per_node N); batch_size is split between them")
    parser.add_argument("--data-root", default="data",
                        help="where a recipe's SynthRef split is found, or made when missing (default: data)")


def main(args: argparse.Namespace) -> int:
    from refseg.data.refer import ReferFormatError
    from refseg.engine import recipe

    if recipe.is_recipe_run(args):  # configs/<model>.yaml: stages into OUT/<stage>/ (engine/recipe.py)
        return recipe.main(args)
    if args.nproc > 1 and "RANK" not in os.environ:
        return distributed.launch(args.nproc, _to_argv(args))
    try:
        base: Dict[str, Any] = {}
        if getattr(args, "resume", None):
            run_config = Path(args.resume) / "config.json"
            if not run_config.exists():
                raise TrainError(f"--resume {args.resume}: no config.json in that folder")
            base = {**read_config_file(run_config), "out": str(args.resume), "overwrite": False}
        try:
            cfg = config_from_args(args, base)
        except ValueError as e:
            raise TrainError(str(e)) from None
        if not cfg.data.path:
            raise TrainError("--data is required (a refer-format folder)")
        train(cfg)
    except (TrainError, FileNotFoundError, ReferFormatError) as e:
        print(f"refseg train: error: {e}", file=sys.stderr)
        return 2
    return 0


def _to_argv(args: argparse.Namespace) -> List[str]:
    """The flags given (config fields present in the namespace, --config), for the torchrun relaunch."""
    return (["--config", args.config] if args.config else []) + config_flags(given_flags(args))
