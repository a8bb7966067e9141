"""Cache keys and atomic writes for slide products (<cache_dir>/slides/<slide_key>/...).

A product's file name carries the key of the parameters that made it, and its folder the key of the
slide file it came from; a product that exists is complete, because it only appears through os.replace.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def _digest(text: str, length: int) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def slide_key(path) -> str:
    """Hash of the slide file's identity (absolute path, size, mtime): a replaced file gets a new key."""
    path = Path(path).expanduser().absolute()
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"slide file not found: {path}; check the cohort's slide paths") from None
    return _digest(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}", 16)


def _normalise(value):
    """JSON-ready and stable: dataclasses as dicts, tuples as lists, 20.0 as 20 (so 20 and 20.0 agree)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def params_key(params: dict) -> str:
    """Short stable hash of a parameter dict (dataclasses accepted); key order does not matter."""
    return _digest(json.dumps(_normalise(params), sort_keys=True), 12)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is moved into place with os.replace.

    The temporary name ends with the final name, so writers that look at the suffix (cv2.imwrite)
    still work. Works for a folder too: if another process put the same folder in place first, ours is
    discarded (products are keyed by their inputs, so both are the same).
    On error the temporary file or folder is removed and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if not (tmp.is_dir() and path.is_dir()):  # a folder can't replace a non-empty folder
                raise
            shutil.rmtree(tmp)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
