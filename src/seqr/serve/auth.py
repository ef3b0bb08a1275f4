"""Who may route to which adapters: the service's auth file, checked and kept on disk atomically.

Shape (more fields may be added, these stay):
    {"users": {"alice": {"keys": ["sha256$<salt hex>$<hash hex>"], "adapters": ["sst2", "agnews"]}},
     "admin_keys": ["sha256$<salt hex>$<hash hex>"], "generation": 7}
Keys are stored hashed: "sha256$" + a random 16-byte salt (hex) + "$" + hex(sha256(salt + key)), a fresh salt
per key. A file that still holds plaintext keys (any entry not starting with "sha256$") is accepted: its keys
are hashed on load and the file is rewritten in the hashed form (once; it says so on stderr). Plaintext keys
(in such a file, or given to put_user) must be 8+ characters.

A bearer key is checked against every stored hash, in constant time each (no early exit that would leak which
entry matched). Keys never appear in errors, logs or reprs.

Writers take the file's lock (`.<name>.lock` beside it) and check its `generation` against the one they loaded:
a second writer with a stale copy (another process or server changed the file since) gets AuthConflict and
writes nothing, so no acknowledged change is ever overwritten.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from seqr.store import files

USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@\-]{0,127}$")
HASH_PREFIX = "sha256$"
SALT_BYTES = 16
MIN_KEY_LEN = 8
_HASH_RE = re.compile(r"^sha256\$([0-9a-f]{%d})\$([0-9a-f]{64})$" % (2 * SALT_BYTES))


def _encode(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")  # never raises, whatever a header held


def hash_key(key: str, salt: bytes | None = None) -> str:
    """The stored form of a plaintext key: "sha256$<salt hex>$<hex of sha256(salt + key)>" (fresh salt)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    return f"{HASH_PREFIX}{salt.hex()}${hashlib.sha256(salt + _encode(key)).hexdigest()}"


def is_hashed(entry: str) -> bool:
    """Whether a stored key entry is in the hashed form (anything else is a plaintext key)."""
    return isinstance(entry, str) and entry.startswith(HASH_PREFIX)


@lru_cache(maxsize=8192)
def _parsed(entry: str) -> tuple[bytes, bytes]:
    m = _HASH_RE.match(entry)
    if m is None:
        raise ValueError("malformed hashed key")
    return bytes.fromhex(m.group(1)), bytes.fromhex(m.group(2))


def _matches(given: bytes, entry: str) -> bool:
    salt, digest = _parsed(entry)
    return hmac.compare_digest(hashlib.sha256(salt + given).digest(), digest)


def key_matches(key: str, entry: str) -> bool:
    """Whether plaintext `key` is the key a hashed entry was made from (constant time)."""
    return _matches(_encode(key), entry)


def _valid_plaintext(k) -> bool:
    """A usable plaintext key: a string of MIN_KEY_LEN+ characters that is valid Unicode (no lone surrogate,
    which no client could send as a header)."""
    if not isinstance(k, str) or len(k) < MIN_KEY_LEN:
        return False
    try:
        k.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _valid_hash(k) -> bool:
    return isinstance(k, str) and _HASH_RE.match(k) is not None


@dataclass(frozen=True)
class User:
    name: str
    keys: tuple[str, ...] = field(repr=False)  # hashed entries ("sha256$salt$hash"), never plaintext
    adapters: frozenset[str]

    def __post_init__(self):
        if not isinstance(self.name, str) or not USER_RE.match(self.name):
            raise ValueError(f"user name must match {USER_RE.pattern}, got {self.name!r}")
        if not self.keys or not all(_valid_hash(k) for k in self.keys):
            raise ValueError(f"user {self.name!r}: keys must be a non-empty list of hashed keys "
                             f"({HASH_PREFIX}<32 hex salt>$<64 hex hash>)")
        if not all(isinstance(a, str) and a for a in self.adapters):
            raise ValueError(f"user {self.name!r}: adapters must be a list of adapter names")


@dataclass(frozen=True)
class Principal:
    """The result of a key lookup: a user, or an admin (user None)."""

    user: User | None
    admin: bool = False
    key_id: str | None = None  # which stored key matched (key_id()), never the key: tells two admins apart


def key_id(entry: str) -> str:
    """A short public id of a stored (hashed) key entry: the first 12 hex of its sha256."""
    return hashlib.sha256(entry.encode()).hexdigest()[:12]


def _check_entries(entries: list[tuple[str, str]], where: str) -> int:
    """Refuse a key that names two principals among (who, entry) pairs, plaintext or hashed; entries must be
    hashed or 8+ character plaintext. Returns how many are plaintext. Never names a key."""
    plain = 0
    for who, e in entries:
        if is_hashed(e):
            if not _valid_hash(e):
                raise ValueError(f"{where}: a key of {who!r} starts with {HASH_PREFIX!r} but is not a well-formed "
                                 f"hash ({HASH_PREFIX}<32 hex salt>$<64 hex hash>)")
            continue
        if not _valid_plaintext(e):
            raise ValueError(f"{where}: keys of {who!r} must be strings of {MIN_KEY_LEN}+ characters")
        plain += 1
    for i, (who, e) in enumerate(entries):
        for other, f in entries[i + 1:]:
            if other == who:
                continue
            if is_hashed(e) and is_hashed(f):
                same = hmac.compare_digest(e, f)
            elif is_hashed(e):
                same = key_matches(f, e)
            elif is_hashed(f):
                same = key_matches(e, f)
            else:
                same = hmac.compare_digest(_encode(e), _encode(f))
            if same:
                raise ValueError(f"{where}: a key is shared by {who!r} and {other!r}; every key must name one "
                                 "principal")
    return plain


def _hashed(entry: str) -> str:
    return entry if is_hashed(entry) else hash_key(entry)


class AuthConflict(RuntimeError):
    """Another writer changed the auth file since this copy was loaded."""


def _generation_on_disk(path: Path) -> int:
    return int(files.read_json(path, "auth file").get("generation", 0)) if path.exists() else 0


class AuthStore:
    """Users, their hashed keys and adapter sets, and hashed admin keys; changes persist atomically to the
    file, under its lock and generation check."""

    def __init__(self, users: dict[str, User], admin_keys: tuple[str, ...], path: Path | None = None,
                 extra: dict | None = None, generation: int = 0):
        admin_keys = tuple(admin_keys)
        if not all(_valid_hash(k) for k in admin_keys):
            raise ValueError(f"admin_keys must be hashed keys ({HASH_PREFIX}<32 hex salt>$<64 hex hash>)")
        self._state = (dict(users), admin_keys)  # one attribute: a reload or a change swaps both at once
        self.path, self.extra = path, extra or {}
        self.generation = generation  # of the file this copy was loaded from or last wrote
        self.lock_owner = None  # set by a holder of the file's lock (files.file_lock) to hand it over
        self._check_unique_keys()

    @property
    def users(self) -> dict[str, User]:
        return self._state[0]

    @users.setter
    def users(self, users: dict[str, User]) -> None:
        self._state = (users, self._state[1])

    @property
    def admin_keys(self) -> tuple[str, ...]:
        """The hashed admin keys."""
        return self._state[1]

    def reload(self) -> None:
        """Re-read the file (another process changed it); the old state stays if the file is bad."""
        new = AuthStore.load(self.path)
        self._state, self.extra, self.generation = new._state, new.extra, new.generation

    @classmethod
    def from_dict(cls, d: dict, path: Path | None = None) -> "AuthStore":
        """A store from the file's shape. Plaintext keys in it are hashed; with a `path`, the file there is
        then rewritten in the hashed form."""
        where = str(path) if path else "auth config"
        if not isinstance(d, dict) or not isinstance(d.get("users"), dict):
            raise ValueError(f"{where}: expected an object with a 'users' object")
        admin = d.get("admin_keys", [])
        if not isinstance(admin, list) or not all(isinstance(k, str) and (is_hashed(k) or _valid_plaintext(k))
                                                  for k in admin):
            raise ValueError(f"{where}: admin_keys must be a list of strings of {MIN_KEY_LEN}+ characters "
                             "(or hashed keys)")
        entries = [("admin", k) for k in admin]
        for name, u in d["users"].items():
            if not isinstance(u, dict) or not isinstance(u.get("keys"), list) or not isinstance(u.get("adapters"), list):
                raise ValueError(f"{where}: user {name!r} needs 'keys' and 'adapters' lists")
            if not u["keys"]:
                raise ValueError(f"user {name!r}: keys must be a non-empty list of strings of {MIN_KEY_LEN}+ "
                                 "characters")
            entries += [(name, k) for k in u["keys"]]
        plain = _check_entries(entries, where)
        users = {name: User(name, tuple(_hashed(k) for k in u["keys"]), frozenset(u["adapters"]))
                 for name, u in d["users"].items()}
        extra = {k: v for k, v in d.items() if k not in ("users", "admin_keys", "generation")}
        gen = d.get("generation", 0)
        if isinstance(gen, bool) or not isinstance(gen, int) or gen < 0:
            raise ValueError(f"{where}: generation must be a non-negative integer, got {gen!r}")
        store = cls(users, tuple(_hashed(k) for k in admin), path, extra, gen)
        if plain and path is not None:
            try:
                store._commit(*store._state)
            except (OSError, AuthConflict) as e:
                print(f"seqr: could not rewrite {path} with its {plain} plaintext API key(s) hashed "
                      f"({getattr(e, 'strerror', None) or e}); they stay in plaintext on disk", file=sys.stderr,
                      flush=True)
            else:
                print(f"seqr: hashed {plain} plaintext API key(s) in {path}", file=sys.stderr, flush=True)
        return store

    @classmethod
    def load(cls, path: str | Path) -> "AuthStore":
        path = Path(path)
        return cls.from_dict(files.read_json(path, "auth file"), path)

    def to_dict(self) -> dict:
        users, admin_keys = self._state
        return {**self.extra, "users": {n: {"keys": list(u.keys), "adapters": sorted(u.adapters)}
                                        for n, u in users.items()}, "admin_keys": list(admin_keys),
                "generation": self.generation}

    def _check_unique_keys(self) -> None:
        """The same stored entry may not name two principals (hashes of one key under different salts can only
        be told apart with the key: from_dict and put_user check plaintext keys against every entry)."""
        users, admin_keys = self._state
        seen: dict[str, str] = {}
        for who, keys in [*((n, u.keys) for n, u in users.items()), ("admin", admin_keys)]:
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
        """The principal a bearer key belongs to, or None. Hashes the key with every stored entry's salt and
        compares against every entry, in constant time each, with no early exit."""
        if not key or not isinstance(key, str):
            return None
        found: Principal | None = None
        given = _encode(key)
        users, admin_keys = self._state
        for k in admin_keys:
            if _matches(given, k):
                found = Principal(None, admin=True, key_id=key_id(k))
        for u in users.values():
            for k in u.keys:
                if _matches(given, k):
                    found = Principal(u, key_id=key_id(k))
        return found

    def put_user(self, name: str, keys: list[str], adapters: list[str], known: set[str]) -> User:
        """Create or replace a user from plaintext keys (stored hashed) and persist the file; nothing changes
        if the write fails. A key that already names another principal is refused."""
        if not isinstance(keys, (list, tuple)) or not keys or not all(_valid_plaintext(k) for k in keys):
            raise ValueError(f"user {name!r}: keys must be a non-empty list of strings of {MIN_KEY_LEN}+ characters "
                             f"(valid Unicode)")
        if not isinstance(adapters, (list, tuple, set, frozenset)):
            raise ValueError(f"user {name!r}: adapters must be a list of adapter names")
        user = User(name, tuple(hash_key(k) for k in keys), frozenset(adapters))
        unknown = sorted(user.adapters - known)
        if unknown:
            raise ValueError(f"user {name!r}: unknown adapter(s) {unknown}; the library holds {sorted(known)}")
        for k in keys:
            p = self.lookup(k)
            if p is not None and (p.admin or p.user.name != name):
                other = "admin" if p.admin else p.user.name
                raise ValueError(f"a key is shared by {other!r} and {name!r}; every key must name one principal")
        users, admin_keys = self._state
        self._commit({**users, name: user}, admin_keys)
        return user

    def drop_adapter(self, adapter: str) -> None:
        """Remove a deleted adapter from every user's set and persist."""
        users, admin_keys = self._state
        self._commit({n: User(n, u.keys, u.adapters - {adapter}) for n, u in users.items()}, admin_keys)

    def restore(self, users: dict[str, User]) -> None:
        """Put back an earlier set of users (undoing a change whose companion library change failed), persisted
        like any change."""
        self._commit(users, self.admin_keys)

    def _commit(self, users: dict[str, User], admin_keys: tuple[str, ...]) -> None:
        """Under the file's lock: refuse if another writer committed since this copy was loaded (AuthConflict),
        else write the new state with the next generation, then swap it in. A failed write changes nothing; a
        lookup sees the old state or the new one."""
        if self.path is None:
            self._state = (users, admin_keys)
            return
        with files.file_lock(files.lock_file_of(self.path), str(self.path), owner=self.lock_owner):
            on_disk = _generation_on_disk(self.path)
            if on_disk != self.generation:
                raise AuthConflict(f"auth file {self.path} was changed by another writer since this copy was "
                                   f"loaded (generation {on_disk} on disk, {self.generation} here); reload and retry")
            old, gen = self._state, self.generation
            self._state, self.generation = (users, admin_keys), gen + 1
            try:
                files.atomic_write_json(self.path, self.to_dict())
            except BaseException:
                self._state, self.generation = old, gen
                raise
