"""Small file helpers shared by checkpoints, stores and run state: hashing, atomic writes, checked JSON."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from libkd import LibkdError


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, value: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: ranks may write the same file
    with open(tmp, "w") as fh:
        fh.write(json.dumps(value, indent=1, sort_keys=True))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json_with_format(path: str | Path, expected_format: str, error: type[LibkdError], fix: str) -> dict[str, Any]:
    """A JSON file whose ``format`` field must be ``expected_format``; ``fix`` says what to do otherwise."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"'{path}' is not valid JSON ({exc}); {fix}") from exc
    if not isinstance(value, dict) or value.get("format") != expected_format:
        found = value.get("format") if isinstance(value, dict) else type(value).__name__
        raise error(f"'{path}' is not a {expected_format} file (format {found!r}); {fix}")
    return value


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def disk_full_is_an_error(message: str) -> Iterator[None]:
    """Turn 'no space left on device' inside the block into a LibkdError that says ``message``."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise LibkdError(f"disk full: {message}") from exc
        raise
