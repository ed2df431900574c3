"""Logging and progress bars for long work (search, evaluation): one place decides what the user sees.

Modules log through `get_logger(__name__)` (children of the "calm" logger) and wrap long loops in
`progress(...)`, a tqdm bar with rate and ETA. Bars are drawn only when stderr is a terminal and the "calm"
logger shows INFO, so logs, CI output and `-q` runs stay free of carriage-return noise.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, TypeVar

from tqdm import tqdm

ROOT = "calm"
T = TypeVar("T")


def get_logger(name: str) -> logging.Logger:
    """The logger of a calm module (`calm.search`, ...); `name` may be `__name__` or a short suffix."""
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


def bars_enabled() -> bool:
    return sys.stderr.isatty() and logging.getLogger(ROOT).isEnabledFor(logging.INFO)


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it") -> tqdm:
    """A tqdm bar over `iterable` (or a manual one of `total` steps), disabled when not on a terminal."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=not bars_enabled())


class _ElapsedFormatter(logging.Formatter):
    """`[calm   12s] message`: seconds since logging was configured, as the run's progress lines always read."""

    def __init__(self) -> None:
        super().__init__()
        self.start = time.perf_counter()

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"[calm {time.perf_counter() - self.start:6.0f}s]"
        if record.levelno >= logging.WARNING:
            prefix += f" {record.levelname.lower()}:"
        return f"{prefix} {record.getMessage()}"


def configure_logging(verbosity: int = 0, stream=None) -> None:
    """Route the "calm" logger to `stream` (stdout by default): verbosity 0 INFO, >0 DEBUG, <0 WARNING.

    Called by the command line; a library user who configures logging themselves need not call it."""
    level = logging.DEBUG if verbosity > 0 else logging.INFO if verbosity == 0 else logging.WARNING
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        if getattr(handler, "_calm", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler._calm = True  # type: ignore[attr-defined]
    handler.setFormatter(_ElapsedFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
