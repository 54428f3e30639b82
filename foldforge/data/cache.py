"""Ahead-of-time feature cache: one memory-mappable record per chain plus a manifest.

Record file (``.ffr``), little-endian, no pickle anywhere::

    b"FFREC001"  | u64 header length | JSON header (space padded) | arrays, each 64-byte aligned

The JSON header holds the record id, its metadata and, per array, dtype/shape/offset; ``checksum`` is the
SHA-256 of the array section. Arrays are returned as read-only views into an ``mmap`` of the file, so
loading a record copies nothing; a batch reads only the rows it samples. Writes go to a temporary file in
the same directory followed by ``os.replace``, so a record either exists whole or not at all.

Cache directory::

    CACHE/manifest.json           {"format", "records": [...], "failed": [...], "config": {...}}
    CACHE/records/<xy>/<id>.ffr   xy = characters 1-2 of the PDB id, as the PDB shards its archive
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

MAGIC = b"FFREC001"
ALIGN = 64
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CacheError(RuntimeError):
    """A cache or record that cannot be trusted (missing, truncated, checksum mismatch)."""


@dataclass
class Record:
    id: str
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    checksum: str

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]


def _pad(n: int) -> int:
    return (-n) % ALIGN


def atomic_write_bytes(path: Path, chunks) -> None:
    """Write ``chunks`` (iterable of bytes-like) to ``path`` via temp file + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_record(path: str | Path, record_id: str, arrays: Mapping[str, np.ndarray],
                 meta: Mapping[str, Any] | None = None) -> str:
    """Write one record atomically; returns its checksum (``sha256:<hex>``)."""
    specs, blobs, offset = {}, [], 0
    digest = hashlib.sha256()
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.hasobject:
            raise TypeError(f"record {record_id}: array {name!r} has dtype object; only numeric arrays are stored")
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        data = arr.tobytes()
        specs[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset}
        pad = b"\0" * _pad(len(data))
        blobs += [data, pad]
        digest.update(data)
        digest.update(pad)
        offset += len(data) + len(pad)
    checksum = "sha256:" + digest.hexdigest()
    header = {"format": FORMAT_VERSION, "id": record_id, "meta": dict(meta or {}), "arrays": specs,
              "nbytes": offset, "checksum": checksum}
    hbytes = json.dumps(header, sort_keys=True).encode()
    hbytes += b" " * _pad(len(MAGIC) + 8 + len(hbytes))
    atomic_write_bytes(Path(path), [MAGIC, struct.pack("<Q", len(hbytes)), hbytes, *blobs])
    return checksum


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a record; ``header["_data_start"]`` is where its arrays begin."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise CacheError(f"{path}: not a foldforge record (bad magic or truncated)")
            (hlen,) = struct.unpack("<Q", head[8:])
            header = json.loads(f.read(hlen))
            header["_data_start"] = 16 + hlen
            return header
    except FileNotFoundError:
        raise CacheError(f"{path}: record file missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CacheError(f"{path}: record header is corrupt") from None


def read_record(path: str | Path, *, verify: bool = True, expected_checksum: str | None = None) -> Record:
    """Map a record file; with ``verify`` the SHA-256 of its arrays is checked before use."""
    path = Path(path)
    header = read_header(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    start = header["_data_start"]
    nbytes = header["nbytes"]
    if size != start + nbytes:
        raise CacheError(f"{path}: record is truncated or has trailing bytes ({size} B, expected {start + nbytes} B)")
    want = expected_checksum or header["checksum"]
    if header["checksum"] != want:
        raise CacheError(f"{path}: checksum in header {header['checksum']} != manifest {want}")
    if verify:
        got = "sha256:" + hashlib.sha256(memoryview(buf)[start:start + nbytes]).hexdigest()
        if got != want:
            raise CacheError(f"{path}: checksum mismatch (stored {want}, computed {got}); "
                             f"the file is corrupt — delete it and re-run `foldforge prepare` to rebuild it")
    arrays = {}
    for name, spec in header["arrays"].items():
        dtype = np.dtype(spec["dtype"])
        count = int(np.prod(spec["shape"], dtype=np.int64))
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=start + spec["offset"]).reshape(spec["shape"])
        arrays[name] = arr
    return Record(id=header["id"], meta=header["meta"], arrays=arrays, checksum=header["checksum"])


def record_relpath(record_id: str) -> str:
    shard = record_id[1:3] if len(record_id) >= 3 else "__"
    return f"records/{shard}/{record_id}.ffr"


def write_manifest(cache_dir: Path, records: list[dict], failed: list[dict], config: dict,
                   skipped: list[dict] = ()) -> None:
    order = lambda r: (r.get("input", ""), r.get("chain") or "")  # noqa: E731
    body = {"format": FORMAT_VERSION, "records": sorted(records, key=lambda r: r["id"]),
            "failed": sorted(failed, key=order), "skipped": sorted(skipped, key=order), "config": config}
    atomic_write_bytes(cache_dir / MANIFEST, [json.dumps(body, indent=1).encode() + b"\n"])


class FeatureCache:
    """Read side of a prepared cache: manifest entries plus checksum-verified record access."""

    def __init__(self, cache_dir: str | Path, *, verify: str = "once"):
        if verify not in ("always", "once", "never"):
            raise ValueError(f"verify must be 'always', 'once' or 'never', not {verify!r}")
        self.dir = Path(cache_dir)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise CacheError(f"{self.dir}: no {MANIFEST}; run `foldforge prepare --out {self.dir}` first")
        try:
            body = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{path}: manifest is corrupt ({e})") from None
        if body.get("format") != FORMAT_VERSION:
            raise CacheError(f"{path}: cache format {body.get('format')} is not {FORMAT_VERSION}; re-run prepare")
        self.entries: list[dict] = body["records"]
        self.failed: list[dict] = body.get("failed", [])
        self.skipped: list[dict] = body.get("skipped", [])
        self.config: dict = body.get("config", {})
        self._index = {e["id"]: i for i, e in enumerate(self.entries)}
        self.verify = verify
        self._verified: set[str] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def ids(self) -> list[str]:
        return [e["id"] for e in self.entries]

    def index_of(self, record_id: str) -> int:
        return self._index[record_id]

    def path(self, i: int) -> Path:
        return self.dir / self.entries[i]["path"]

    def load(self, i: int) -> Record:
        entry = self.entries[i]
        check = self.verify == "always" or (self.verify == "once" and entry["id"] not in self._verified)
        rec = read_record(self.dir / entry["path"], verify=check, expected_checksum=entry["checksum"])
        if check:
            self._verified.add(entry["id"])
        return rec

    def verify_all(self, progress=None) -> list[tuple[str, str]]:
        """Re-hash every record; returns (id, problem) for each record that fails."""
        bad = []
        for i in progress(range(len(self))) if progress else range(len(self)):
            try:
                read_record(self.path(i), verify=True, expected_checksum=self.entries[i]["checksum"])
            except CacheError as e:
                bad.append((self.entries[i]["id"], str(e)))
        return bad
