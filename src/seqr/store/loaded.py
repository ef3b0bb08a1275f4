"""What a library is loaded from: its adapters' safetensors files mapped into memory, not read (`MappedFile`), and
the rows they are read into on first use (`Loaded`), stacked per layer in the banks' layout.

Loading a library N = 5000 adapters large parses N file headers; the B (and unique A) bytes are read, their
checksums verified and their values checked when the library is first used (its banks are built, e.g. by
`attach`), or one adapter's alone when only that adapter is read (e.g. `remove`, `to_peft`). A mapping holds no
file descriptor, so thousands are open at once, and a file another process deletes after the load stays readable.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from pathlib import Path

import torch

# safetensors dtype names (its format spec) of the floating-point tensors a library stores
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class MappedFile:
    """One safetensors file mapped read-only (torch.UntypedStorage.from_file, a private mapping): opening it reads
    its header only; a tensor's bytes are read when it is used. The header (8-byte little-endian length, then
    JSON: name -> dtype, shape, data_offsets) is parsed here rather than by safetensors' `safe_open`, which does
    not expose the file's bytes that the library's checksum covers; tests check it against safetensors' reader."""

    def __init__(self, path: Path, what: str, layouts: dict | None = None):
        """`layouts`: header text -> parsed entries, shared by the files of one load: a library's adapter files
        have one layout (same tensors, same offsets), parsed and held once instead of once per file."""
        self.path, self.what = Path(path), what
        bad = f"{what}: file {path} is corrupt or truncated"
        try:
            with open(self.path, "rb") as f:  # the header read, not mapped: a mapping's touched pages stay resident
                size = os.fstat(f.fileno()).st_size
                n = int.from_bytes(f.read(8), "little") if size >= 8 else 0
                text = f.read(n) if 8 + n <= size else b""
                storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=size) if size else None
        except FileNotFoundError:
            raise FileNotFoundError(f"{what}: file {path} is missing") from None
        if size < 8:
            raise ValueError(f"{bad} ({size} bytes, not a safetensors file)")
        if 8 + n > size:
            raise ValueError(f"{bad} (its header claims {n} bytes, the file has {size})")
        self._bytes = torch.empty(0, dtype=torch.uint8).set_(storage)  # (size,) the file, mapped
        self._start = 8 + n
        layout = None if layouts is None else layouts.get(text)
        if layout is None:
            layout = self._parse(text, size, bad)
            if layouts is not None:
                layouts[text] = layout
        self.entries, end = layout
        if end > size:
            raise ValueError(f"{bad} (its tensors end at byte {end}, the file has {size})")

    def _parse(self, text: bytes, size: int, bad: str) -> tuple[dict, int]:
        """(key -> (dtype, shape, first byte, end byte), the last tensor's end byte) from the header's JSON."""
        try:
            header = json.loads(text)
        except ValueError:
            raise ValueError(f"{bad} (its header is not JSON)") from None
        if not isinstance(header, dict):
            raise ValueError(f"{bad} (its header is not a JSON object)")
        header.pop("__metadata__", None)
        entries = {key: self._entry(key, e, size, bad) for key, e in header.items()}
        return entries, max((e[3] for e in entries.values()), default=self._start)

    def _entry(self, key: str, e, size: int, bad: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        """(dtype, shape, first byte, end byte) of one tensor, checked against the file's size."""
        try:
            dtype, shape, (b, end) = DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{bad} (tensor {key!r}: {e!r} is not a floating-point tensor entry)") from None
        want = math.prod(shape) * dtype.itemsize
        if not (isinstance(b, int) and isinstance(end, int) and 0 <= b and end - b == want
                and self._start + end <= size):
            raise ValueError(f"{bad} (tensor {key!r} at bytes {b}-{end}: shape {shape} needs {want}, the file has "
                             f"{size - self._start} bytes of data)")
        return dtype, shape, self._start + b, self._start + end

    def shape(self, key: str) -> tuple[int, ...] | None:
        e = self.entries.get(key)
        return None if e is None else e[1]

    def tensor(self, key: str) -> torch.Tensor:
        """Tensor `key`, a view of the mapping (read from disk as it is touched)."""
        dtype, shape, b, end = self.entries[key]
        raw = self._bytes[b:end]  # (bytes,)
        if b % dtype.itemsize:
            raw = raw.clone()  # not aligned to its dtype in the file: a view cannot reinterpret it in place
        return raw.view(dtype).reshape(shape)

    def sha256(self) -> str:
        return hashlib.sha256(self._bytes.numpy()).hexdigest()  # reads every page of the mapping once


class Loaded:
    """The B (and unique A) rows of the adapters a library was loaded with, in its banks' layout (B^T (N, r, m), a
    unique A (N, r, n)), read from their mapped files (`sources`, adapter i's at index i) on first use: `fill`
    reads every file, verifies its checksum and stacks its rows (a bank built while the library holds exactly
    the adapters loaded, in their order, then takes a layer's rows over: no copy); until then `row` reads one
    adapter's tensor from its file alone. Values are rounded through the storage dtype and held in `dtype`."""

    def __init__(self, lib, names: list[str], dtype: torch.dtype, storage: torch.dtype):
        r, self.names, self.dtype, self.storage = lib.rank, list(names), dtype, storage
        self.shapes = {"B": {layer: (r, m) for layer, (m, n) in lib.meta.layers.items()},
                       "A": {} if lib.shared_a else {layer: (r, n) for layer, (m, n) in lib.meta.layers.items()}}
        self.sources: list[tuple[MappedFile, str]] | None = []  # (mapped file, its sha256) per adapter
        self._rows: dict[str, dict[str, torch.Tensor]] | None = None  # attr -> layer -> stacked rows, once filled
        self._verified: set[int] = set()
        self._released: set[str] = set()
        self._lock = threading.RLock()  # a server's threads may read rows while another builds a bank

    def has(self, attr: str, layer: str) -> bool:
        """Whether `layer`'s `attr` ("B" or "A") rows are read here (not yet taken over by the layer's bank)."""
        return layer in self.shapes[attr] and layer not in self._released

    def row(self, attr: str, layer: str, i: int) -> torch.Tensor:
        """Adapter i's (m, r) B or (r, n) A at `layer`: a view of the stacked rows, or, before they are filled,
        a copy read from its file alone."""
        with self._lock:
            if self._rows is not None:
                t = self._rows[attr][layer][i]  # (r, m) B^T or (r, n) A
                return t.T if attr == "B" else t
            return self._read(i, f"{layer}.{attr}").to(self.dtype, copy=True)

    def take(self, lib, layer: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B^T (N, r, m), A (N, r, n) or None) of `layer` for its bank, filled first, when the library still holds
        exactly the adapters loaded, in order; else (None, None)."""
        if not self.has("B", layer) or self.names != lib.names:
            return None, None
        self.fill()
        return self._rows["B"][layer], self._rows["A"].get(layer)

    def release(self, layer: str) -> None:
        """`layer`'s bank is built: its rows are read there from now on; once every layer's is, the files are
        unmapped."""
        with self._lock:
            self._released.add(layer)
            for rows in (self._rows or {}).values():
                rows.pop(layer, None)
            if self._released >= set(self.shapes["B"]):
                self.sources = None

    def fill(self) -> None:
        """Read every adapter's file into the stacked rows (its checksum verified, every value finite)."""
        with self._lock:
            if self._rows is not None:
                return
            N = len(self.names)
            rows = {attr: {layer: torch.empty(N, *shape, dtype=self.dtype) for layer, shape in shapes.items()
                           if layer not in self._released} for attr, shapes in self.shapes.items()}
            for i in range(N):
                for attr, layers in rows.items():
                    for layer, dst in layers.items():
                        t = self._read(i, f"{layer}.{attr}", check=False)  # (m, r) B or (r, n) A
                        dst[i].copy_(t.T if attr == "B" else t)
            for attr, layers in rows.items():
                for layer, dst in layers.items():
                    self._check_finite(attr, layer, dst)
            self._rows, self.sources = rows, None

    def _read(self, i: int, key: str, check: bool = True) -> torch.Tensor:
        """Tensor `key` of adapter i's file, rounded through the storage dtype, its file's checksum verified first
        (and, with `check`, its values finite: `fill` checks them stacked, one layer at a time)."""
        if self.sources is None:
            raise RuntimeError(f"adapter {self.names[i]!r}: its file is no longer mapped (its rows were released)")
        src, sha = self.sources[i]
        if i not in self._verified:
            if src.sha256() != sha:
                raise ValueError(f"{src.what}: file {src.path} is corrupt or truncated (checksum mismatch)")
            self._verified.add(i)
        t = src.tensor(key).to(self.storage)
        if check and not torch.isfinite(t).all():
            raise ValueError(f"{src.what}, layer {key.rsplit('.', 1)[0]}: {key.rsplit('.', 1)[1]} contains NaN or inf")
        return t

    def _check_finite(self, attr: str, layer: str, rows: torch.Tensor) -> None:
        if torch.isfinite(rows.sum()):  # one pass, nothing allocated; a non-finite sum (or an overflow) looks closer
            return
        bad = (~torch.isfinite(rows)).flatten(1).any(1)  # (N,)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"{self.sources[i][0].what}, layer {layer}: {attr} contains NaN or inf")
