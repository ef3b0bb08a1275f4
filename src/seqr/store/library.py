"""`LoraLibrary`: named adapters x named layers, its on-disk format, and peft import/export.

On disk (a directory)::

    manifest.json                      format + version, metadata, layers, adapters (file, sha256, stats)
    shared_a-<hash>.safetensors        the shared A of every layer, stored once (shared-A libraries)
    adapters/<name>-<hash>.safetensors one file per adapter: B (and A for unique-A libraries) per layer

File names carry a content hash, so a save never overwrites a file the current manifest points to: new
files are written first, then the manifest is replaced atomically, then unreferenced files are deleted.
A process killed at any point leaves the previous library loadable.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from seqr.core.argfmt import PathNotFound
from seqr.store import banks, checks, files
from seqr.core.bank import AdapterBank
from seqr.store.loaded import Loaded, MappedFile
from seqr.store.peft_io import read_peft_adapter, stats_record, write_peft_adapter
from seqr.core.stats import NormStats, as_normalised
from seqr.core.stats import pooled as pool_stats

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
# The dtypes a library may store its tensors in on disk (`save(dtype=...)`); in memory they are float32 either way.
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _Adapter:
    B: dict[str, torch.Tensor]
    A: dict[str, torch.Tensor] | None = None  # unique-A libraries only
    stats: dict[str, NormStats] | None = None
    centroids: dict[str, torch.Tensor] | None = None  # layer -> (n,) mean input on the silo's data
    file: str | None = None  # relative path of its file once on disk
    sha256: str | None = None
    line: tuple | None = field(default=None, repr=False, compare=False)  # (key, stats, encoded manifest entry)


@dataclass
class LibraryMeta:
    rank: int
    layers: dict[str, tuple[int, int]]  # layer name -> (m, n)
    target_modules: list[str]
    base_model: str | None = None
    a_seed: int | None = None
    fan_in_fan_out: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not self.layers:
            raise ValueError("a library needs at least one adapted layer, got none")


class LoraLibrary:
    """Named LoRA adapters over named layers, one `AdapterBank` per layer.

    A library bound to a directory (after `save` or `load`) persists `add` and `remove` immediately,
    writing only that adapter's file and the manifest.
    """

    def __init__(self, meta: LibraryMeta, shared_A: dict[str, torch.Tensor] | None = None):
        self.meta = meta
        self.shared_A = None if shared_A is None else checks.tensors(meta, shared_A, "the shared A", "A")
        self._adapters: dict[str, _Adapter] = {}
        self._banks: dict[str, AdapterBank] = {}
        self.path: Path | None = None
        self._generation = 0  # the manifest generation this copy was loaded from or last wrote
        self._shared_file: tuple[str, str] | None = None  # (file, sha256) of the stored shared A
        self.percentile = False  # route by each adapter's empirical CDF (a `scored("percentile")` view)
        self.storage_dtype = "float32"  # STORAGE_DTYPES: what its files hold; memory holds those values in float32
        self.lock_owner = None  # set by a holder of the directory's writer lock (files.file_lock) to hand it over
        self.resident_dtype = "float32"  # STORAGE_DTYPES: the dtype A, B and centroids are held in (routing: fp32)
        self._loaded: Loaded | None = None  # the rows it was loaded into, until its banks take them over

    # ---------------------------------------------------------------------------------------------- access
    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    @property
    def layers(self) -> list[str]:
        return list(self.meta.layers)

    @property
    def shared_a(self) -> bool:
        return self.shared_A is not None

    @property
    def default_method(self) -> str:
        """The router this library is served with unless told otherwise: SEQR where A is shared, else SPECTR
        (the exact norm router that needs no shared A)."""
        return "seqr" if self.shared_a else "spectr"

    @property
    def rank(self) -> int:
        return self.meta.rank

    @property
    def generation(self) -> int:
        """The manifest generation this copy was loaded from or last wrote (0: never saved)."""
        return self._generation

    def __len__(self) -> int:
        return len(self._adapters)

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def stats(self, name: str) -> dict[str, NormStats] | None:
        return self._get(name).stats

    @property
    def uncalibrated(self) -> list[str]:
        return [n for n, a in self._adapters.items() if a.stats is None]

    @property
    def has_centroids(self) -> bool:
        """Every adapter ships its centroids (the centroid routers need them all)."""
        return bool(self._adapters) and all(a.centroids is not None for a in self._adapters.values())

    def centroids(self, name: str) -> dict[str, torch.Tensor] | None:
        return self._get(name).centroids

    def bank_flags(self) -> tuple[bool, bool, bool]:
        """What a freshly built bank would hold besides A and B: (stats, centroids, quantiles)."""
        return not self.uncalibrated, self.has_centroids, self.percentile

    def bank(self, layer: str, device: torch.device | str | None = None) -> AdapterBank:
        """The AdapterBank of one layer on `device` (default: where the library's tensors are, the CPU), built on
        first use and cached: `add` and `remove` update it in place (store/banks.py), other changes rebuild it."""
        if layer not in self.meta.layers:
            raise KeyError(f"unknown layer {layer!r}; this library adapts {len(self.layers)} layers, e.g. "
                           f"{self.layers[:3]}")
        if not self._adapters:
            raise ValueError("the library is empty: add an adapter before routing")
        if device is not None and torch.device(device) == self._device(layer):
            device = None  # where its tensors are: the library's own bank, which holds them
        key = layer if device is None else (layer, str(torch.device(device)))
        if key not in self._banks:
            self._banks[key] = banks.build(self, layer, device)
            banks.bind(self, layer, self._banks[key])
        return self._banks[key]

    def _device(self, layer: str) -> torch.device:
        """Where the library's tensors of `layer` are."""
        return (self.shared_A if self.shared_a else next(iter(self._adapters.values())).B)[layer].device

    def drop_banks(self) -> None:
        """Forget the cached banks (each is rebuilt on next use), e.g. after changing adapters' tensors in place."""
        banks.drop(self)

    def adapter_weights(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(A, B) per layer of one adapter, B with its scaling folded in."""
        ad = self._get(name)
        return (self.shared_A if self.shared_a else ad.A), ad.B

    def _get(self, name: str) -> _Adapter:
        if name not in self._adapters:
            raise KeyError(f"unknown adapter {name!r}; the library holds {self.names}")
        return self._adapters[name]

    # ---------------------------------------------------------------------------------------------- changes
    def add(self, name: str, B: dict[str, torch.Tensor], *, A: dict[str, torch.Tensor] | None = None,
            stats: dict[str, NormStats] | None = None, centroids: dict[str, torch.Tensor] | None = None) -> None:
        """Add one adapter: B (m, r) per layer with scaling folded in; A (r, n) per layer for unique-A
        libraries (for a shared-A library A may be given only to check it equals the shared A); centroids
        (n,) per layer for the centroid routers (optional)."""
        self._check_new(name)
        where = f"adapter {name!r}"
        B = checks.tensors(self.meta, B, where, "B")
        if self.shared_a:
            if A is not None:
                A = self._stored(checks.tensors(self.meta, A, where, "A"))  # as it would be stored
                checks.same_A(self.meta, self.shared_A, A, where)
            A = None
        elif A is None:
            raise ValueError(f"{where}: this library has one A per adapter, so add() needs A")
        else:
            A = checks.tensors(self.meta, A, where, "A")
        if stats is not None:
            stats = checks.stats(self.meta, stats, where)
        if centroids is not None:
            centroids = checks.centroids(self.meta, centroids, where)
        ad = _Adapter(B=banks.views(self, name, self._stored(B), "B"), A=banks.views(self, name, self._stored(A), "A"),
                      stats=stats, centroids=self._stored(centroids))
        flags = self.bank_flags()
        self._adapters[name] = ad
        self._persist(undo=lambda: self._adapters.pop(name), before=lambda: self._write_adapter(self.path, name, ad))
        banks.added(self, name, flags)  # in place: cached banks gain one row each

    def _check_new(self, name) -> None:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"adapter name must match {NAME_RE.pattern} (letters, digits, _ . -), got {name!r}")
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} is already in the library; remove it first to replace it")

    def add_peft(self, name: str, adapter_dir: str | Path) -> None:
        """Add one calibrated peft adapter dir under `name` (a live service's "add adapter")."""
        new = LoraLibrary.from_peft({name: adapter_dir})
        if new.uncalibrated:
            raise ValueError(f"adapter {name!r} has no calibration stats ({files.STATS_FILE}); run seqr calibrate")
        A, B = new.adapter_weights(name)
        self.add(name, B, A=A, stats=new.stats(name), centroids=new.centroids(name))

    def remove(self, name: str, *, allow_empty: bool = True) -> None:
        """Remove an adapter; on a bound library its file is deleted after the manifest drops it."""
        ad = self._get(name)
        if not allow_empty and len(self) == 1:
            raise ValueError(f"cannot remove {name!r}: it is the library's last adapter")
        order, flags = self.names, self.bank_flags()
        self._adapters = banks.swap_last(self._adapters, name)  # the last adapter takes its place, as in the banks

        def delete_file():  # after the manifest dropped it, still under the lock
            if ad.file and not self._referenced(ad.file):
                files.confined(self.path, ad.file, f"adapter {name!r}").unlink(missing_ok=True)
        self._persist(undo=lambda: self._restore(order, name, ad), after=delete_file)
        banks.removed(self, name, ad, flags)  # in place: the last adapter takes its slot

    def _restore(self, order: list[str], name: str, ad: _Adapter) -> None:
        self._adapters[name] = ad
        self._adapters = {n: self._adapters[n] for n in order}

    def set_stats(self, name: str, stats: dict[str, NormStats]) -> None:
        ad = self._get(name)
        old, ad.stats = ad.stats, checks.stats(self.meta, stats, f"adapter {name!r}")
        self.drop_banks()
        self._persist(undo=lambda: setattr(ad, "stats", old))

    def with_stats(self, stats: dict[str, dict[str, NormStats]],
                   centroids: dict[str, dict[str, torch.Tensor]] | None = None) -> "LoraLibrary":
        """An unbound copy (nothing it does touches disk) sharing this library's tensors, with the stats (e.g. noised
        mu) and centroids (e.g. a private release; held as saved ones are) of the adapters named in each replaced."""
        centroids = centroids or {}
        if unknown := sorted(n for n in {*stats, *centroids} if n not in self._adapters):
            raise KeyError(f"stats or centroids for unknown adapter(s) {unknown}; the library holds {self.names}")
        new = LoraLibrary(self.meta)
        new.shared_A, new.storage_dtype, new.resident_dtype = self.shared_A, self.storage_dtype, self.resident_dtype
        new._adapters = {n: replace(a, B=banks.derived(new, n, a.B, "B"), A=banks.derived(new, n, a.A, "A"), file=None,
                                    sha256=None, stats=checks.stats(self.meta, stats[n], f"adapter {n!r}")
                                    if n in stats else a.stats,
                                    centroids=new._stored(checks.centroids(self.meta, centroids[n], f"adapter {n!r}"))
                                    if n in centroids else a.centroids) for n, a in self._adapters.items()}
        return new

    def normalised(self, how: str = "z", pooled: bool = False) -> "LoraLibrary":
        """An unbound view whose stats make routing use another normalisation of the norms
        (stats.NORMALISATIONS) and/or one
        mu, sigma per adapter pooled over all layers. z with per-layer stats is the paper (self, unchanged)."""
        if how == "z" and not pooled:
            return self
        if self.uncalibrated:
            raise ValueError(f"adapter(s) {self.uncalibrated} have no stats to rescore; run seqr calibrate")
        if how == "percentile":
            if pooled:
                raise ValueError("normalisation 'percentile' reads each layer's own quantiles; it cannot use pooled stats")
            missing = [n for n in self.names if any(v.quantiles is None for v in self.stats(n).values())]
            if missing:
                raise ValueError(f"adapter(s) {missing} have no norm quantiles for normalisation 'percentile'; recalibrate "
                                 f"them with this version of seqr calibrate")
        view = {}
        for n in self.names:
            st = self.stats(n)
            st = pool_stats(st) if pooled else st
            view[n] = {layer: as_normalised(v, how) for layer, v in st.items()}
        new = self.with_stats(view)
        new.percentile = how == "percentile"
        return new

    def _stored(self, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """The tensors as this library holds them: exactly the values its files store (rounded through the storage
        dtype), in its resident dtype, so a library in memory routes as the same library loaded back from disk."""
        sd, rd = STORAGE_DTYPES[self.storage_dtype], STORAGE_DTYPES[self.resident_dtype]
        if tensors is None or (sd == rd == torch.float32):
            return tensors
        return {k: t.to(sd).to(rd) for k, t in tensors.items()}

    def set_resident_dtype(self, dtype: str) -> "LoraLibrary":
        """Hold A, B and the centroids in `dtype` (STORAGE_DTYPES) from now on: float16 / bfloat16 halve the memory;
        the routing math (z = A x, the Gram form, the z-score, the update's product) still runs in float32."""
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"resident dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
        self.resident_dtype, rd = dtype, STORAGE_DTYPES[dtype]
        self._cast_all(lambda d: None if d is None else {k: t.to(rd) for k, t in d.items()})
        return self

    def _cast_all(self, cast) -> None:
        """Replace every tensor held (shared A, B, A, centroids) by `cast` of it (a dict layer -> tensor each);
        the banks are rebuilt on next use."""
        self.drop_banks()
        self._loaded = None  # every adapter holds its own cast tensors now
        self.shared_A = cast(self.shared_A)
        for name, ad in self._adapters.items():
            ad.B, ad.A = banks.views(self, name, cast(ad.B), "B"), banks.views(self, name, cast(ad.A), "A")
            ad.centroids = cast(ad.centroids)

    def _round_to_storage(self, dtype: str) -> None:
        """Switch the storage dtype, rounding every tensor held (shared A, B, A, centroids) to it."""
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
        if dtype == self.storage_dtype or dtype == "float32":  # widening keeps every stored value
            self.storage_dtype = dtype
            return
        if self.storage_dtype != "float32":
            raise ValueError(f"library is stored in {self.storage_dtype}; it cannot be re-stored in {dtype} "
                             f"(its float32 values are gone)")
        self.storage_dtype = dtype
        self._cast_all(self._stored)

    def _persist(self, undo, before=None, after=None) -> None:
        """Commit an in-memory change of a bound library under the directory's writer lock: check no other writer
        committed since this copy was loaded (else LibraryConflict), run `before` (new files), write the manifest
        with the next generation, run `after` (deleting files no manifest names). If anything fails before the
        manifest is written (the lock cannot be taken or times out, a read-only directory, a conflict, a failed
        write), undo the in-memory change and re-raise, so memory and disk never disagree."""
        if self.path is None:
            return
        gen, committed = self._generation, False
        try:
            with files.dir_lock(self.path, owner=self.lock_owner):
                on_disk = files.manifest_generation(self.path)
                if on_disk != gen:
                    raise LibraryConflict(f"library {self.path} was changed by another writer since this copy was "
                                          f"loaded (generation {on_disk} on disk, {gen} here); reload it and retry")
                if before is not None:
                    before()
                self._generation = gen + 1
                self._write_manifest(self.path)
                committed = True
                if after is not None:
                    after()
        except BaseException:
            if not committed:
                self._generation = gen
                undo()
                self.drop_banks()
            raise

    # ---------------------------------------------------------------------------------------------- disk
    def save(self, path: str | Path, dtype: str | None = None) -> Path:
        """Write the library to a directory (new files, then the manifest, atomically) and bind to it. `dtype`
        (STORAGE_DTYPES) stores the tensors in half precision: files half the size, the routing math still
        float32; the library in memory is rounded to the stored values, so it equals what `load` gives back."""
        if dtype is not None:
            self._round_to_storage(dtype)
        path = Path(path)
        (path / files.ADAPTERS_DIR).mkdir(parents=True, exist_ok=True)
        with files.dir_lock(path):  # concurrent saves to one dir take turns; each leaves a loadable library
            self._save_locked(path)
        return path

    def _save_locked(self, path: Path) -> None:
        self._generation = files.manifest_generation(path) + 1
        if self.shared_a:
            self._shared_file = files.write_hashed(path, files.SHARED_A_PREFIX,
                                             self._on_disk({f"{layer}.A": t for layer, t in self.shared_A.items()}))
        for name, ad in self._adapters.items():
            self._write_adapter(path, name, ad)
        self._write_manifest(path)
        self.path = path
        keep = {ad.file for ad in self._adapters.values()} | ({self._shared_file[0]} if self._shared_file else set())
        for f in [*path.glob(f"{files.SHARED_A_PREFIX}-*.safetensors"), *path.glob(".*.tmp"),
                  *(path / files.ADAPTERS_DIR).glob("*")]:
            if str(f.relative_to(path)) not in keep:
                f.unlink(missing_ok=True)  # files of a previous version, or left by a killed save

    def _write_adapter(self, path: Path, name: str, ad: _Adapter) -> None:
        tensors = {f"{layer}.B": t for layer, t in ad.B.items()}
        if ad.A is not None:
            tensors.update({f"{layer}.A": t for layer, t in ad.A.items()})
        if ad.centroids is not None:
            tensors.update({f"{layer}.centroid": t for layer, t in ad.centroids.items()})
        ad.file, ad.sha256 = files.write_hashed(path, f"{files.ADAPTERS_DIR}/{name}", self._on_disk(tensors))

    def _on_disk(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dt = STORAGE_DTYPES[self.storage_dtype]
        return {k: t.to(dt) for k, t in tensors.items()}

    def files(self) -> list[str]:
        """The files of a saved library, relative to its directory: the manifest, the shared A, each adapter's."""
        if self.path is None:
            raise ValueError("this library is not saved; save() it first")
        return ([files.MANIFEST] + ([self._shared_file[0]] if self._shared_file else [])
                + [a.file for a in self._adapters.values() if a.file])

    def _referenced(self, file: str) -> bool:
        return any(a.file == file for a in self._adapters.values())

    def _write_manifest(self, path: Path) -> None:
        m = self.meta
        files.atomic_write_json(path / files.MANIFEST, rows="adapters", obj={
            "format": files.LIBRARY_FORMAT, "format_version": files.LIBRARY_FORMAT_VERSION,
            "generation": self._generation, "storage_dtype": self.storage_dtype,
            "base_model": m.base_model, "rank": m.rank, "target_modules": m.target_modules,
            "shared_a": self.shared_a, "a_seed": m.a_seed, "fan_in_fan_out": m.fan_in_fan_out,
            "extra": m.extra, "layers": {k: list(v) for k, v in m.layers.items()},
            "shared_a_file": None if self._shared_file is None else
            {"file": self._shared_file[0], "sha256": self._shared_file[1]},
            "adapters": [files.manifest_line(n, a) for n, a in self._adapters.items()],
        })

    @classmethod
    def load(cls, path: str | Path, resident_dtype: str = "float32", *, lazy: bool = True) -> "LoraLibrary":
        """Load a library directory: its manifest (format version, stats) and every adapter file's header now;
        the files are memory-mapped and their tensors read, checksums verified and values checked on first use
        (`lazy`, store/loaded.py), or before returning with `lazy=False`. `resident_dtype` (STORAGE_DTYPES): what
        A, B and the centroids are held in (as `set_resident_dtype`, without a float32 copy first)."""
        if resident_dtype not in STORAGE_DTYPES:
            raise ValueError(f"resident dtype must be one of {list(STORAGE_DTYPES)}, got {resident_dtype!r}")
        path = Path(path)
        if not (path / files.MANIFEST).is_file():
            raise PathNotFound(f"{path} holds no seqr library ({files.MANIFEST} missing)")
        with files.dir_lock(path, shared=True):  # never half of another process's change
            lib = cls._load_locked(path, resident_dtype)
            if not lazy:
                lib._loaded.fill()
        return lib

    @classmethod
    def _load_locked(cls, path: Path, resident_dtype: str) -> "LoraLibrary":
        man, lines = files.read_json_rows(path / files.MANIFEST, "library manifest", "adapters")
        storage = checks.manifest_header(path, man, STORAGE_DTYPES)
        try:
            meta = LibraryMeta(rank=man["rank"], layers={k: tuple(v) for k, v in man["layers"].items()},
                               target_modules=man["target_modules"], base_model=man.get("base_model"),
                               a_seed=man.get("a_seed"), fan_in_fan_out=bool(man.get("fan_in_fan_out")),
                               extra=man.get("extra") or {})
            entries, sa = checks.manifest_entries(path, man)
            generation = int(man.get("generation", 0))
            shared = None
            if man.get("shared_a"):
                what = f"library {path}: shared A"
                t = files.read_tensors(files.confined(path, sa["file"], what), what, sa["sha256"])
                shared = {layer: t[f"{layer}.A"] for layer in meta.layers if f"{layer}.A" in t}
            lib = cls(meta, shared)
            lib.storage_dtype, lib.resident_dtype = storage, resident_dtype
            lib.shared_A = lib._stored(lib.shared_A)
            lib._shared_file = None if sa is None else (sa["file"], sa["sha256"])
            lib._loaded = Loaded(lib, [e["name"] for e in entries], STORAGE_DTYPES[resident_dtype],
                                 STORAGE_DTYPES[storage])
            layouts: dict = {}  # header text -> parsed entries: the adapter files share one layout
            for i, e in enumerate(entries):
                lib._load_entry(path, e, i, layouts)
                if lines is not None and len(entries) == len(lines):  # its manifest line, written back as read
                    files.seed_manifest_line(e["name"], lib._adapters[e["name"]], lines[i])
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"library manifest {path / files.MANIFEST} is missing or malforms field {e}") from None
        lib.path, lib._generation = path, generation
        return lib

    def _load_entry(self, path: Path, e: dict, i: int, layouts: dict) -> None:
        """Adapter i of the manifest: its file mapped and its header checked (B, and A for unique-A libraries, at
        every layer, in the library's shapes), its stats and centroids read; B and A are read on first use."""
        name = e["name"]
        self._check_new(name)
        what = f"library {path}: adapter {name!r}"
        src = MappedFile(files.confined(path, e["file"], what), what, layouts)
        checks.stored(self.meta, src.shape, what, kinds=("B",) if self.shared_a else ("B", "A"))
        self._loaded.sources.append((src, e["sha256"]))
        if e.get("stats") is not None and not isinstance(e["stats"], dict):
            raise ValueError(f"{what}: field 'stats' must be an object layer -> record, got {type(e['stats']).__name__}")
        stats = None if e.get("stats") is None else checks.stats(
            self.meta, {k: stats_record(v, f"{what}, layer {k}") for k, v in e["stats"].items()}, what)
        cents = {layer: src.tensor(k) for layer in self.meta.layers if src.shape(k := f"{layer}.centroid")} or None
        cents = None if cents is None else self._stored(checks.centroids(self.meta, cents, what))
        self._adapters[name] = _Adapter(B=banks.loaded_views(self, name, "B", i), stats=stats, centroids=cents,
                                        A=None if self.shared_a else banks.loaded_views(self, name, "A", i),
                                        file=e["file"], sha256=e["sha256"])

    # ---------------------------------------------------------------------------------------------- peft
    @classmethod
    def from_peft(cls, paths) -> "LoraLibrary":
        """Build a library from standard peft adapter dirs (a list, or a dict name -> dir).

        All adapters must share base model, rank, target modules and layer shapes; every mismatch is listed
        in one error. If every layer's A is identical across adapters (to 1e-6 relative) the library is
        shared-A (SEQR-routable); otherwise, or if any adapter was trained with its own A (seqr meta
        `shared_a: false`, e.g. `seqr train --unique-a`), it is a unique-A library (SPECTR and the baselines).
        """
        items = list(paths.items()) if isinstance(paths, dict) else [(None, p) for p in paths]
        if not items:
            raise ValueError("from_peft needs at least one adapter directory, got none")
        ads = [read_peft_adapter(p, name) for name, p in items]
        checks.compatible(ads)
        first = ads[0]
        shared = checks.one_shared_a(ads)
        seeds = {a.meta.get("a_seed") for a in ads}
        order = sorted(first.A, key=checks.natural_key)
        meta = LibraryMeta(rank=first.rank, layers={k: (first.B[k].shape[0], first.A[k].shape[1]) for k in order},
                           target_modules=first.target_modules,
                           base_model=next((a.base_model for a in ads if a.base_model), None),
                           a_seed=seeds.pop() if len(seeds) == 1 and shared else None,
                           fan_in_fan_out=first.fan_in_fan_out)
        lib = cls(meta, first.A if shared else None)
        for a in ads:
            lib.add(a.name, a.B, A=None if shared else a.A, stats=a.stats, centroids=a.centroids)
        return lib

    def to_peft(self, name: str, path: str | Path) -> Path:
        """Write one adapter as a standard peft adapter dir that `PeftModel.from_pretrained` loads."""
        A, B = self.adapter_weights(name)
        meta = {"a_seed": self.meta.a_seed} if self.shared_a and self.meta.a_seed is not None else None
        return write_peft_adapter(path, A=A, B=B, rank=self.rank, target_modules=self.meta.target_modules,
                                  base_model=self.meta.base_model, fan_in_fan_out=self.meta.fan_in_fan_out,
                                  stats=self._get(name).stats, meta=meta, centroids=self._get(name).centroids)

    def __repr__(self) -> str:
        return (f"LoraLibrary({len(self)} adapters, {len(self.layers)} layers, rank={self.rank}, "
                f"shared_a={self.shared_a}, base_model={self.meta.base_model!r})")


class LibraryConflict(RuntimeError):
    """Another writer changed the library directory since this copy was loaded."""
