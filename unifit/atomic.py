"""Atomic writes: write a temp file (or build a temp directory) beside the target, then rename it over the target.

Stages resume by trusting the files they find, so a kill mid-write must never leave a half file under the final
name. The temp name starts with a dot and does not end with the target's suffix, so the globs that collect outputs
(`*.parquet`, `*.png`) never pick one up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path to write `path`'s content to; renamed over `path` when the block ends, removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """A temp directory to build `path` in; it takes `path`'s place when the block ends, and is removed if it raises.

    `keep_existing`: when another process put `path` in place first (two workers converting the same model), keep
    theirs and drop this copy; otherwise an existing `path` is replaced whole (a re-export).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not keep_existing:
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:  # a non-empty `path` appeared meanwhile: only a concurrent identical build does that
        shutil.rmtree(tmp, ignore_errors=True)
        if not keep_existing:
            raise
