"""Who may route to which adapters: the service's auth file, checked and kept on disk atomically.

Shape (more fields may be added, these stay):
    {"users": {"alice": {"keys": ["sk-alice-1"], "adapters": ["sst2", "agnews"]}}, "admin_keys": ["sk-admin"]}
Keys are compared in constant time against every known key (no early exit that would leak which prefix
matched) and never appear in errors, logs or reprs.
"""
from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import files

USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@\-]{0,127}$")


@dataclass(frozen=True)
class User:
    name: str
    keys: tuple[str, ...] = field(repr=False)
    adapters: frozenset[str]

    def __post_init__(self):
        if not isinstance(self.name, str) or not USER_RE.match(self.name):
            raise ValueError(f"user name must match {USER_RE.pattern}, got {self.name!r}")
        if not self.keys or not all(isinstance(k, str) and len(k) >= 8 for k in self.keys):
            raise ValueError(f"user {self.name!r}: keys must be a non-empty list of strings of 8+ characters")
        if not all(isinstance(a, str) and a for a in self.adapters):
            raise ValueError(f"user {self.name!r}: adapters must be a list of adapter names")


@dataclass(frozen=True)
class Principal:
    """The result of a key lookup: a user, or an admin (user None)."""

    user: User | None
    admin: bool = False


class AuthStore:
    """Users, their keys and adapter sets, and admin keys; changes persist atomically to the file."""

    def __init__(self, users: dict[str, User], admin_keys: tuple[str, ...], path: Path | None = None,
                 extra: dict | None = None):
        self._state = (dict(users), tuple(admin_keys))  # one attribute: a reload swaps both at once
        self.path, self.extra = path, extra or {}
        self._check_unique_keys()

    @property
    def users(self) -> dict[str, User]:
        return self._state[0]

    @users.setter
    def users(self, users: dict[str, User]) -> None:
        self._state = (users, self._state[1])

    @property
    def admin_keys(self) -> tuple[str, ...]:
        return self._state[1]

    def reload(self) -> None:
        """Re-read the file (another process changed it); the old state stays if the file is bad."""
        new = AuthStore.load(self.path)
        self._state, self.extra = new._state, new.extra

    @classmethod
    def from_dict(cls, d: dict, path: Path | None = None) -> "AuthStore":
        where = str(path) if path else "auth config"
        if not isinstance(d, dict) or not isinstance(d.get("users"), dict):
            raise ValueError(f"{where}: expected an object with a 'users' object")
        admin = d.get("admin_keys", [])
        if not isinstance(admin, list) or not all(isinstance(k, str) and len(k) >= 8 for k in admin):
            raise ValueError(f"{where}: admin_keys must be a list of strings of 8+ characters")
        users = {}
        for name, u in d["users"].items():
            if not isinstance(u, dict) or not isinstance(u.get("keys"), list) or not isinstance(u.get("adapters"), list):
                raise ValueError(f"{where}: user {name!r} needs 'keys' and 'adapters' lists")
            users[name] = User(name, tuple(u["keys"]), frozenset(u["adapters"]))
        extra = {k: v for k, v in d.items() if k not in ("users", "admin_keys")}
        return cls(users, tuple(admin), path, extra)

    @classmethod
    def load(cls, path: str | Path) -> "AuthStore":
        path = Path(path)
        return cls.from_dict(files.read_json(path, "auth file"), path)

    def to_dict(self) -> dict:
        return {**self.extra, "users": {n: {"keys": list(u.keys), "adapters": sorted(u.adapters)}
                                        for n, u in self.users.items()}, "admin_keys": list(self.admin_keys)}

    def _check_unique_keys(self) -> None:
        seen: dict[str, str] = {}
        for who, keys in [*((n, u.keys) for n, u in self.users.items()), ("admin", self.admin_keys)]:
            for k in keys:
                if k in seen and seen[k] != who:
                    raise ValueError(f"a key is shared by {seen[k]!r} and {who!r}; every key must name one principal")
                seen[k] = who

    def check_adapters(self, known: set[str]) -> None:
        """Raise naming every user whose set names an adapter the library does not hold."""
        bad = {n: sorted(u.adapters - known) for n, u in self.users.items() if u.adapters - known}
        if bad:
            raise ValueError(f"auth file names adapters the library does not hold: {bad}; library: {sorted(known)}")

    def lookup(self, key: str | None) -> Principal | None:
        """The principal a bearer key belongs to, or None. Compares against every key, in constant time each."""
        if not key:
            return None
        found: Principal | None = None
        given = key.encode()
        users, admin_keys = self._state
        for k in admin_keys:
            if hmac.compare_digest(given, k.encode()):
                found = Principal(None, admin=True)
        for u in users.values():
            for k in u.keys:
                if hmac.compare_digest(given, k.encode()):
                    found = Principal(u)
        return found

    def put_user(self, name: str, keys: list[str], adapters: list[str], known: set[str]) -> User:
        """Create or replace a user and persist the file (the old state stays if the write fails)."""
        user = User(name, tuple(keys), frozenset(adapters))
        unknown = sorted(user.adapters - known)
        if unknown:
            raise ValueError(f"user {name!r}: unknown adapter(s) {unknown}; the library holds {sorted(known)}")
        old = self.users.get(name)
        self.users[name] = user
        try:
            self._check_unique_keys()
            self.save()
        except BaseException:
            if old is None:
                self.users.pop(name, None)
            else:
                self.users[name] = old
            raise
        return user

    def drop_adapter(self, adapter: str) -> None:
        """Remove a deleted adapter from every user's set and persist."""
        self.users = {n: User(n, u.keys, u.adapters - {adapter}) for n, u in self.users.items()}
        self.save()

    def save(self) -> None:
        if self.path is not None:
            files.atomic_write_json(self.path, self.to_dict())
