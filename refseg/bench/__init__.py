"""`refseg bench`: every method under every supervision budget, and its report folder.

run.py holds the command (`add_arguments`, `main`) and the row registry (`ENTRIES`, `PRESETS`);
report.py writes the report folder (report.md, results.json, the plot, the overlay grids).
"""

from refseg.bench.run import ENTRIES, PRESETS, Entry, Preset, add_arguments, main, missing_train_support, train_argv

__all__ = ["ENTRIES", "PRESETS", "Entry", "Preset", "add_arguments", "main", "missing_train_support", "train_argv"]
