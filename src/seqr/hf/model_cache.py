"""An atomic on-disk cache of built directories (a dequantised model, ...): build in a temp dir beside the
target, write a marker last, rename into place. A target without a valid marker is never trusted."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from seqr.store import files

CACHE_FORMAT = "seqr-model-cache"
CACHE_FORMAT_VERSION = 1
STALE_BUILD_AGE_S = 3600  # leftover build dirs (killed builds) older than this are deleted


def say(msg: str) -> None:
    """A progress or status line on stderr."""
    print(f"seqr: {msg}", file=sys.stderr, flush=True)


def cache_complete(target: Path, source: str) -> bool:
    """True when `target` holds a finished cache of `source` (its marker, written last, says so)."""
    try:
        marker = files.read_json(target / files.MODEL_CACHE_MARKER, "model cache marker")
    except (FileNotFoundError, ValueError):
        return False
    return (marker.get("format") == CACHE_FORMAT and marker.get("format_version") == CACHE_FORMAT_VERSION
            and marker.get("source") == source)


def ensure_cached(target: Path, build: Callable[[Path], None], source: str) -> Path:
    """Return `target`, first building it with `build(tmp_dir)` unless it is a complete cache of `source`.

    The build happens in a fresh dir beside `target`; the marker is written last and the dir renamed into
    place, so `target` is either absent, incomplete-and-ignored (rebuilt), or whole."""
    target = Path(target)
    if cache_complete(target, source):
        return target
    if target.exists():
        say(f"{target} has no completion marker for {source}; rebuilding it")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(target)
    tmp = Path(tempfile.mkdtemp(prefix=_build_prefix(target), dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        started = time.perf_counter()
        build(tmp)
        _seal(tmp)
        files.atomic_write_json(tmp / files.MODEL_CACHE_MARKER, {
            "format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION, "source": source,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_seconds": round(time.perf_counter() - started, 1)})
        (tmp / files.MODEL_CACHE_MARKER).chmod(0o644)
        _install(tmp, target, source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after a successful install
    return target


def _build_prefix(target: Path) -> str:
    return f".{target.name}.build-"


def _remove_stale_builds(target: Path) -> None:
    """Delete build dirs left by killed loads (old enough that no live build can own them)."""
    for p in target.parent.glob(_build_prefix(target) + "*"):
        try:
            if time.time() - p.stat().st_mtime > STALE_BUILD_AGE_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _seal(root: Path) -> None:
    """Make every file under `root` readable by all (some writers create 0600 files) and flush it to disk."""
    for p in sorted(root.rglob("*")):
        if p.is_file():
            p.chmod(0o644)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    files.fsync_dir(root)


def _install(tmp: Path, target: Path, source: str) -> None:
    """Rename the finished build `tmp` to `target`, moving an untrusted old `target` out of the way."""
    if cache_complete(target, source):
        return  # a concurrent load finished first; keep its cache, drop ours
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=_build_prefix(target), dir=target.parent))
        os.replace(target, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not cache_complete(target, source):  # lost a race to a concurrent build: theirs is fine
            raise
    files.fsync_dir(target.parent)
