"""Fixed file names and atomic, verified file I/O: the only place that knows how bytes reach disk."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from seqr.core.argfmt import PathNotFound

# A library directory
MANIFEST = "manifest.json"
LOCK_FILE = ".seqr.lock"  # flock'd by every writer (and shared by readers) of a library directory
LOCK_TIMEOUT_S = 30.0
ADAPTERS_DIR = "adapters"
SHARED_A_PREFIX = "shared_a"
LIBRARY_FORMAT = "seqr-library"
LIBRARY_FORMAT_VERSION = 1

# A peft adapter directory (what a silo ships)
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
STATS_FILE = "seqr_stats.json"  # per-layer activation-norm stats written by calibration
CENTROIDS_FILE = "seqr_centroids.safetensors"  # per-layer mean input of the silo's data (centroid routers)
ADAPTER_META = "seqr_adapter.json"  # seqr's own facts about a trained adapter (shared-A seed, task)
TRAIN_LOG = "train_log.jsonl"  # loss per training step, beside the adapter
TRAIN_STATE_SUFFIX = ".resume.pt"  # a run's resumable state, hidden beside the adapter dir it will write
ADAPTER_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, STATS_FILE, CENTROIDS_FILE, ADAPTER_META)  # what seqr reads from one

# An evaluation output directory (seqr eval / seqr demo)
EVAL_RESULTS = "eval.json"  # every number the report and figures are drawn from
EVAL_REPORT = "report.md"

# A cached model directory (models.py): written last, so its presence means the directory is complete
MODEL_CACHE_MARKER = "seqr_model_cache.json"


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (renames, new files) to disk where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write data to path so that a reader (or a crash) sees either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj, *, rows: str | None = None) -> None:
    """Write obj as JSON atomically, indented; `rows`: the key of a list written one compact item per line
    instead (a library manifest's adapters: Python's C encoder, 10x faster than the indenting one on thousands)."""
    atomic_write_bytes(path, json_text(obj, rows).encode())


class Encoded(str):
    """An item of a `rows` list already JSON-encoded (its text, kept by the caller): written as is."""

    def __new__(cls, obj):
        return super().__new__(cls, json.dumps(obj))

    @classmethod
    def text(cls, text: str) -> "Encoded":
        """The JSON text of an item as read back from a file this module wrote (not encoded again)."""
        return super().__new__(cls, text)


def seed_manifest_line(name: str, ad, line: str) -> None:
    """The manifest line `manifest_line` would encode for adapter `ad` as loaded, taken from the manifest read."""
    ad.line = ((name, ad.file, ad.sha256), ad.stats, Encoded.text(line))


def manifest_line(name: str, ad) -> Encoded:
    """One adapter's (a library's `_Adapter`) manifest entry, JSON-encoded once per content (a change then writes
    N cached lines)."""
    key = (name, ad.file, ad.sha256)
    if ad.line is None or ad.line[0] != key or ad.line[1] is not ad.stats:  # stats: the very object encoded
        stats = None if ad.stats is None else {k: s.to_dict() for k, s in ad.stats.items()}
        ad.line = (key, ad.stats, Encoded({"name": name, "file": ad.file, "sha256": ad.sha256, "stats": stats}))
    return ad.line[2]


def json_text(obj, rows: str | None = None) -> str:
    if rows is None or rows not in obj:
        return json.dumps(obj, indent=1, sort_keys=False) + "\n"
    head = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items() if k != rows]
    items = ",\n".join(f"  {item if isinstance(item, Encoded) else json.dumps(item)}" for item in obj[rows])
    return "{\n" + ",\n".join(head + [f" {json.dumps(rows)}: [\n{items}\n ]"]) + "\n}\n"


def read_json_rows(path: str | Path, what: str, rows: str) -> tuple[dict, list[str] | None]:
    """`read_json` of a file `json_text` wrote with `rows`, and each item of obj[rows] as its line of text (None
    when the file is laid out otherwise, e.g. edited by hand): a writer can then write unchanged items back as
    read, without encoding them again."""
    obj, text = _read_json_text(path, what)
    head = f" {json.dumps(rows)}: [\n"  # json_text's layout: one item per line
    start, items = text.find(head), obj.get(rows)
    if start < 0 or not isinstance(items, list):
        return obj, None
    end = text.find("\n ]\n", start)
    lines = [ln[2:].rstrip(",") for ln in text[start + len(head):end].split("\n")] if items else []
    if end < 0 or len(lines) != len(items):
        return obj, None
    try:  # each line must be exactly its item: a line is only ever written back in place of the very item it encodes
        same = all(json.loads(ln) == item for ln, item in zip(lines, items))
    except json.JSONDecodeError:
        same = False
    return obj, lines if same else None


def read_json(path: str | Path, what: str) -> dict:
    """Read a JSON object with errors that name the file and what it was supposed to be."""
    return _read_json_text(path, what)[0]


def _read_json_text(path: str | Path, what: str) -> tuple[dict, str]:
    """(the JSON object, the text it was parsed from), read once."""
    path = Path(path)
    if not path.is_file():
        raise PathNotFound(f"{what} not found: {path}")
    try:
        text = path.read_text()
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e}); the file is corrupt or truncated") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got {type(obj).__name__}")
    return obj, text


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_tensors(path: str | Path, what: str, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file, verifying its checksum when one is recorded; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file {path} is missing")
    data = path.read_bytes()
    if expected_sha256 is not None and sha256(data) != expected_sha256:
        raise ValueError(f"{what}: file {path} is corrupt or truncated (checksum mismatch, {len(data)} bytes)")
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{what}: file {path} is not a readable safetensors file ({e})") from None


class LockTimeout(TimeoutError):
    """Another process held a directory's lock for longer than we were willing to wait."""


_HELD: dict[str, object] = {}  # lock files this process holds exclusively for an owner -> that owner
_HELD_MUTEX = threading.Lock()


@contextlib.contextmanager
def dir_lock(path: str | Path, *, shared: bool = False, timeout: float | None = None, owner=None):
    """An inter-process lock on a directory (flock on its LOCK_FILE): exclusive for writers, shared for readers.
    Waits up to `timeout` seconds (default LOCK_TIMEOUT_S, read at each call), then raises LockTimeout naming the
    directory. A directory where the lock file cannot be created (read-only) is read without one. `owner`: see
    file_lock."""
    with file_lock(Path(path) / LOCK_FILE, str(path), shared=shared, timeout=timeout, owner=owner):
        yield


def lock_file_of(path: str | Path) -> Path:
    """The lock file guarding a single file's writers: `.<name>.lock` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def file_lock(lock: Path, what: str, *, shared: bool = False, timeout: float | None = None, owner=None):
    """flock on `lock` (created if missing). An exclusive lock taken for an `owner` (any object) is handed to
    every nested call for the same owner, on any thread: a service takes it off its engine thread, then the change
    it queues there writes under it. Any other caller, in this process or another, waits as usual."""
    import fcntl

    key = os.path.realpath(lock)
    with _HELD_MUTEX:
        handed = owner is not None and _HELD.get(key) is owner
    if handed:
        yield
        return
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if not shared:
            raise
        yield
        return
    try:
        deadline = time.monotonic() + timeout
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{what} is locked by another writer for more than {timeout:g} s") from None
                time.sleep(0.02)
        if owner is not None and not shared:
            with _HELD_MUTEX:
                _HELD[key] = owner
        try:
            yield
        finally:
            if owner is not None and not shared:
                with _HELD_MUTEX:
                    _HELD.pop(key, None)
    finally:
        os.close(fd)  # closing releases the lock


def confined(root: str | Path, rel, what: str) -> Path:
    """root / rel, refused unless rel is a relative, normalised path that stays inside root after symlinks are
    followed: a manifest can never make seqr read or delete a file outside its directory."""
    root = Path(root)
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ValueError(f"{what}: file entry must be a non-empty relative path, got {rel!r}")
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or os.path.normpath(rel) != rel:
        raise ValueError(f"{what}: file entry {rel!r} is not a normalised path inside {root}")
    full = root / rel
    if not full.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{what}: file entry {rel!r} leads outside {root} (through a symlink)")
    return full


_GENERATION = re.compile(rb'^\{\s*"format": "[^"]*",\s*"format_version": \d+,\s*"generation": (\d+),')


def manifest_generation(path: Path) -> int:
    """The generation of the manifest in `path` (0 when there is none yet, or it predates generations), read from
    the head of the file, where `LoraLibrary._write_manifest` puts it (the whole manifest is parsed only when it is not there):
    a change's conflict check costs O(1), not a parse of N adapters' stats."""
    f = Path(path) / MANIFEST
    if not f.exists():
        return 0
    with open(f, "rb") as fh:
        head = _GENERATION.match(fh.read(256))
    return int(head.group(1)) if head else int(read_json(f, "library manifest").get("generation", 0))


def write_hashed(path: Path, stem: str, tensors: dict[str, torch.Tensor]) -> tuple[str, str]:
    """Write tensors to `<stem>-<hash>.safetensors` (skipped when that exact content, checked by its sha256, is
    already there)."""
    data = tensors_to_bytes(tensors)
    digest = sha256(data)
    rel = f"{stem}-{digest[:16]}.safetensors"
    target = path / rel
    if not (target.is_file() and target.stat().st_size == len(data) and sha256(target.read_bytes()) == digest):
        atomic_write_bytes(target, data)  # absent, or a damaged leftover under the same name: rewritten
    return rel, digest
