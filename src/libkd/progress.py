"""Progress bars for long work, on a terminal only.

In a file or a pipe (CI logs, ``nohup`` logs) a tqdm bar leaves a residue line at every refresh
(``epoch 3/12:   0%| ...`` before each summary line), so there every bar is off and the callers'
own summary lines (one per epoch, one per store shard) are the record.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm import tqdm


def on_terminal(stream: Any = None) -> bool:
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on standard error, disabled off a terminal (and wherever ``disable=True``)."""
    kwargs.setdefault("file", sys.stderr)
    kwargs["disable"] = kwargs.get("disable") is True or not on_terminal(kwargs["file"])
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kwargs)
