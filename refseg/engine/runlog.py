"""Training metrics: RUN/log.csv rows (time, step, epoch, tag, value) and TensorBoard scalars."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Dict


class RunLog:
    """log.csv rows (time, step, epoch, tag, value) + TensorBoard scalars; inert off rank 0."""

    def __init__(self, run: Path, enabled: bool):
        self.enabled = enabled
        self.csv = None
        self.tb = None
        if not enabled:
            return
        path = run / "log.csv"
        new = not path.exists()
        self.csv_file = open(path, "a", newline="")
        self.csv = csv.writer(self.csv_file)
        if new:
            self.csv.writerow(["time", "step", "epoch", "tag", "value"])
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run / "tb"))
        except ImportError:  # tensorboard is a dependency, but keep training without it
            self.tb = None

    def scalars(self, step: int, epoch: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        now = round(time.time(), 3)
        for tag, v in values.items():
            v = float(v)
            self.csv.writerow([now, step, epoch, tag, f"{v:.6g}"])
            if self.tb is not None and math.isfinite(v):
                self.tb.add_scalar(tag, v, step)
        self.csv_file.flush()

    def close(self) -> None:
        if self.enabled:
            self.csv_file.close()
            if self.tb is not None:
                self.tb.close()
