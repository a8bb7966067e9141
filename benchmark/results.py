"""Result files: one JSON per job, written atomically, read back by the leaderboard alone."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator


def atomic_write(path: Path, write: Callable[[IO], Any], mode: str = "w") -> None:
    """Call write(file) on a temporary file in the same folder, fsync, then rename: readers (and a
    rerun after a kill) never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a metric that cannot be computed is null
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def write_result(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(_jsonable(record), indent=1, sort_keys=True) + "\n")


def read_result(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def result_path(out_dir: Path, dataset: str, task: str, method: str, fold: int, seed: int) -> Path:
    return Path(out_dir) / "results" / dataset / task / method / f"fold{fold}_seed{seed}.json"


def iter_results(out_dir: Path) -> Iterator[dict]:
    """Every result record under `<out_dir>/results`, in a stable order."""
    for path in sorted((Path(out_dir) / "results").glob("*/*/*/fold*_seed*.json")):
        try:
            record = read_result(path)
        except json.JSONDecodeError as err:  # only possible for a file not written by us
            raise ValueError(f"{path} is not a valid result file ({err}); delete it and rerun that job") from err
        record["_path"] = str(path)
        yield record
