"""Training metrics: RUN/log.csv rows (time, step, epoch, tag, value) and TensorBoard scalars."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Dict


class RunLog:
    """log.csv rows (time, step, epoch, tag, value) + TensorBoard scalars; inert off rank 0.

    A failed write of log.csv (a full disk) raises OSError naming log.csv.
    """

    def __init__(self, run: Path, enabled: bool):
        self.enabled = enabled
        self.csv = None
        self.tb = None
        if not enabled:
            return
        self.path = path = run / "log.csv"
        new = not path.exists()
        self.csv_file = open(path, "a", newline="")
        self.csv = csv.writer(self.csv_file)
        if new:
            self._write([["time", "step", "epoch", "tag", "value"]])
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run / "tb"))
        except ImportError:  # tensorboard is a dependency, but keep training without it
            self.tb = None

    def scalars(self, step: int, epoch: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        now = round(time.time(), 3)
        self._write([[now, step, epoch, tag, f"{float(v):.6g}"] for tag, v in values.items()])
        if self.tb is not None:
            for tag, v in values.items():
                if math.isfinite(float(v)):
                    self.tb.add_scalar(tag, float(v), step)

    def _write(self, rows) -> None:
        try:
            self.csv.writerows(rows)
            self.csv_file.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from None

    def close(self) -> None:
        """Close the files (again: nothing)."""
        if self.enabled:
            self.enabled = False
            try:
                self.csv_file.close()
            except OSError:  # the flush of a full disk: the error was raised by the write already
                pass
            if self.tb is not None:
                self.tb.close()
