"""c2al speaks through `logging` (logger "c2al" and its children), so a caller decides what shows.

train.py shows INFO lines on stdout; a benchmark that runs many trainings sets
the "c2al" logger to WARNING instead of redirecting stdout.
"""
from __future__ import annotations

import logging
import sys
import warnings


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at emit time (pytest's capture swaps it after set-up)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Plain message lines from the "c2al" loggers on stdout, once per process.

    Example:
        >>> setup_logging().name
        'c2al'
    """
    root = logging.getLogger("c2al")
    root.setLevel(level)
    if not any(isinstance(h, _CurrentStdout) for h in root.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.propagate = False
    return root


def quiet_libraries() -> None:
    """TorchRec's planner and DDP warn on every run about things users cannot act on."""
    warnings.filterwarnings("ignore")
    for name in ("torchrec", "torch.distributed", "torch.fx", "torch.nn.parallel"):
        logging.getLogger(name).setLevel(logging.ERROR)
