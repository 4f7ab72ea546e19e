"""The durable, append-only results store.

Layout (default root `results/`):

    <root>/runs/<hash[:2]>/<config_hash>/<record_id>.json          one record per finished run
    <root>/runs/<hash[:2]>/<config_hash>/<record_id>.safetensors   its trainable state
    <root>/locks/<config_hash>.lock                                held while a cell runs

Promises (tested with concurrent OS processes and SIGKILLed writers):
- a record appears whole or not at all: it is written to a temporary file in the same folder,
  fsynced, then renamed; the state file is renamed into place before the record that names it;
- records are never rewritten; the latest record of a cell (by `finished_at`, then id) wins;
- record ids are unique (time + pid + random), so concurrent writers never collide;
- a cell runs under an exclusive lock (flock; released by the OS if the process dies), and an ok
  record is only appended when the cell has none, so a resume never writes a second one.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import secrets
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

SCHEMA_VERSION = 1


class CellBusy(Exception):
    """Another process holds this cell's lock (the run is in progress elsewhere)."""


def new_record_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{secrets.token_hex(4)}"


def utcnow() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class ResultStore:
    def __init__(self, root: str | Path = "results"):
        self.root = Path(root)

    # ------------------------------------------------------------------ paths
    def cell_dir(self, config_hash: str) -> Path:
        return self.root / "runs" / config_hash[:2] / config_hash

    def state_path(self, record: dict[str, Any]) -> Path | None:
        name = record.get("state_file")
        return self.cell_dir(record["config_hash"]) / name if name else None

    # ------------------------------------------------------------------ reading
    def iter_records(self, with_errors: bool = False) -> Iterator[dict[str, Any]]:
        """Every readable record; unreadable ones are counted in `self.skipped`."""
        self.skipped: list[str] = []
        runs = self.root / "runs"
        if not runs.is_dir():
            return
        for path in sorted(runs.glob("*/*/*.json")):
            try:
                rec = json.loads(path.read_text())
                if not isinstance(rec, dict) or "config_hash" not in rec or "status" not in rec:
                    raise ValueError("not a run record")
            except (OSError, ValueError) as e:
                self.skipped.append(f"{path}: {e}")
                continue
            rec["_path"] = str(path)
            yield rec

    def records(self) -> list[dict[str, Any]]:
        recs = list(self.iter_records())
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable record(s), e.g. {self.skipped[0]}", stacklevel=2
            )
        return recs

    def cell_records(self, config_hash: str) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.cell_dir(config_hash).glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return sorted(out, key=lambda r: (r.get("finished_at", ""), r.get("record_id", "")))

    def latest(self, config_hash: str) -> dict[str, Any] | None:
        recs = self.cell_records(config_hash)
        return recs[-1] if recs else None

    def latest_by_cell(self) -> dict[str, dict[str, Any]]:
        """config_hash -> its latest record."""
        best: dict[str, dict[str, Any]] = {}
        for rec in self.records():
            key = (rec.get("finished_at", ""), rec.get("record_id", ""))
            cur = best.get(rec["config_hash"])
            if cur is None or key > (cur.get("finished_at", ""), cur.get("record_id", "")):
                best[rec["config_hash"]] = rec
        return best

    def has_ok(self, config_hash: str) -> bool:
        return any(r.get("status") == "ok" for r in self.cell_records(config_hash))

    def load_state(self, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        path = self.state_path(record)
        if path is None or not path.is_file():
            raise FileNotFoundError(f"run {record.get('config_hash', '?')[:12]} has no saved trainable state")
        return load_file(str(path))

    # ------------------------------------------------------------------ writing
    def append(self, record: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> Path:
        """Append a record (and its trainable state) atomically; returns the record's path."""
        record = dict(record)
        record.setdefault("schema", SCHEMA_VERSION)
        record.setdefault("record_id", new_record_id())
        record.setdefault("finished_at", utcnow())
        cell = self.cell_dir(record["config_hash"])
        cell.mkdir(parents=True, exist_ok=True)
        if state is not None:
            name = f"{record['record_id']}.safetensors"
            tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            fd, tmp = tempfile.mkstemp(dir=cell, prefix=".tmp-")
            os.close(fd)
            try:
                save_file(tensors, tmp) if tensors else save_file({"_empty": torch.zeros(0)}, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, cell / name)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            record["state_file"] = name
        path = cell / f"{record['record_id']}.json"
        atomic_write_bytes(path, (json.dumps(record, indent=1, default=str) + "\n").encode())
        return path

    @contextlib.contextmanager
    def lock(self, config_hash: str, wait: bool = False):
        """Hold the cell's exclusive lock; raises CellBusy if another process holds it."""
        lock_dir = self.root / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_dir / f"{config_hash}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise CellBusy(config_hash) from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {time.time():.0f}\n".encode())
            yield
        finally:
            os.close(fd)

    def is_running(self, config_hash: str) -> bool:
        """True when some live process holds the cell's lock."""
        path = self.root / "locks" / f"{config_hash}.lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def strip_private(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}
