"""An append-only audit log of admin actions: one JSON object a line, each flushed and fsynced.

    log = AuditLog("audit.jsonl")
    log.record("admin:3f2a9c1b0d4e", "put_user", "carol", "ok", adapters=["gamma"])
    # {"time": "2025-01-01T12:00:00.000000Z", "who": "admin:3f2a9c1b0d4e", "action": "put_user", "target": "carol",
    #  "result": "ok", "adapters": ["gamma"]}

Keys never reach it: a detail named "keys" or containing "key" (any case) is refused. AuditLog(None) records
nothing (but still checks its arguments). Thread-safe.
"""
from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

FIELDS = ("time", "who", "action", "target", "result")


class AuditLog:
    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, who: str, action: str, target: str, result: str, **detail) -> dict:
        """Append one entry and return it. Raises ValueError for a detail that could carry a key."""
        for name in detail:
            if "key" in name.lower():
                raise ValueError(f"audit detail {name!r} refused: keys are never written to the audit log")
            if name in FIELDS:
                raise ValueError(f"audit detail {name!r} would overwrite the entry's own field")
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                 "who": str(who), "action": str(action), "target": str(target), "result": str(result), **detail}
        line = json.dumps(entry, default=str, ensure_ascii=True) + "\n"  # ensure_ascii: always one line
        if self.path is None:
            return entry
        with self._lock:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        return entry


def read(path: str | Path) -> list[dict]:
    """Every entry of an audit log, oldest first (a torn last line, from a crash mid-write, is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):  # no newline after it: the write was cut short
                break
            raise ValueError(f"audit log {path}: line {i} is not valid JSON") from None
    return out
