"""`NormStats`: streaming, mergeable mean and standard deviation of activation norms."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from seqr.core.privacy import Guarantee

QUANTILE_LEVELS = tuple((k + 0.5) / 32 for k in range(32))  # where calibration samples each adapter's norm CDF


@dataclass(slots=True)
class NormStats:
    """Welford's running mean / sum of squared deviations (M2) of a stream of scalars, in float64.

    `std` is the population standard deviation (ddof=0, numpy's default). Two NormStats built from
    disjoint shards merge exactly (Chan et al.), so silos can calibrate in parallel. `quantiles` (optional):
    the norms at QUANTILE_LEVELS from one whole calibration pass (`with_quantiles`), for the percentile score;
    they cannot be streamed or merged, so `update` and `merge` drop them. `privacy` (optional): the DP guarantee
    of a differentially private calibration (seqr.core.privacy), whose count is then the number of examples, not
    tokens; `update` and `merge` drop it too (a merged stream is another release).
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    quantiles: tuple[float, ...] | None = None
    privacy: Guarantee | None = None

    def __post_init__(self):
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"count must be a non-negative integer, got {self.count!r}")
        if self.count == 0 and (self.mean != 0 or self.m2 != 0):
            raise ValueError(f"empty NormStats must have mean = m2 = 0, got mean={self.mean}, m2={self.m2}")
        if self.m2 < 0 or not math.isfinite(self.m2) or not math.isfinite(self.mean):
            raise ValueError(f"mean and m2 must be finite and m2 >= 0, got mean={self.mean}, m2={self.m2}")
        if self.quantiles is not None:
            q = tuple(float(v) for v in self.quantiles)
            if len(q) != len(QUANTILE_LEVELS) or not all(map(math.isfinite, q)) or any(b < a for a, b in zip(q, q[1:])):
                raise ValueError(f"quantiles must be {len(QUANTILE_LEVELS)} finite non-decreasing norms (at "
                                 f"stats.QUANTILE_LEVELS), got {len(q)} values {list(q[:4])}...")
            self.quantiles = q
        if self.privacy is not None and not isinstance(self.privacy, Guarantee):
            raise ValueError(f"privacy must be a seqr.core.privacy.Guarantee or None, got {self.privacy!r}")

    def update(self, values) -> "NormStats":
        """Add a batch of values (any shape); batches are combined with the parallel formula."""
        v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        if v.numel() == 0:
            return self
        if not torch.isfinite(v).all():
            raise ValueError("NormStats.update got NaN or inf values")
        b_mean = float(v.mean())
        self.quantiles = self.privacy = None
        self._combine(v.numel(), b_mean, float(((v - b_mean) ** 2).sum()))
        return self

    def merge(self, other: "NormStats") -> "NormStats":
        """Fold another shard's stats into this one (in place) and return self."""
        self.quantiles = self.privacy = None
        self._combine(other.count, other.mean, other.m2)
        return self

    def _combine(self, n_b: int, mean_b: float, m2_b: float) -> None:
        if n_b == 0:
            return
        n_a, n = self.count, self.count + n_b
        d = mean_b - self.mean
        self.mean += d * n_b / n
        self.m2 += m2_b + d * d * n_a * n_b / n
        self.count = n

    @property
    def var(self) -> float:
        if self.count == 0:
            raise ValueError("NormStats is empty: no value was recorded")
        return self.m2 / self.count

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def to_dict(self) -> dict:
        d = {"count": self.count, "mean": self.mean, "m2": self.m2, "std": self.std if self.count else None}
        d = d if self.quantiles is None else {**d, "quantiles": list(self.quantiles)}
        return d if self.privacy is None else {**d, "privacy": self.privacy.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "NormStats":
        """A record written by `to_dict`; errors name the field (callers add the file, adapter and layer)."""
        if not isinstance(d, dict):
            raise ValueError(f"malformed NormStats record: must be an object, got {d!r}")
        for key in ("count", "mean", "m2"):
            v = d.get(key)
            if key not in d:
                raise ValueError(f"malformed NormStats record: no field {key!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"malformed NormStats record: field {key!r} must be a number, got {v!r}")
        count = d["count"]
        if isinstance(count, float) and count.is_integer():
            count = int(count)
        q = d.get("quantiles")
        if q is not None and (not isinstance(q, list) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                              for v in q)):
            raise ValueError(f"malformed NormStats record: field 'quantiles' must be a list of numbers, got {q!r}")
        try:
            privacy = None if d.get("privacy") is None else Guarantee.from_dict(d["privacy"])
            return cls(count=count, mean=float(d["mean"]), m2=float(d["m2"]),
                       quantiles=None if q is None else tuple(float(v) for v in q), privacy=privacy)
        except ValueError as e:
            raise ValueError(f"malformed NormStats record: {e}") from None


def with_quantiles(s: NormStats, values) -> NormStats:
    """s plus the quantiles of `values`: all the norms s was computed from, in one pass."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() != s.count:
        raise ValueError(f"quantiles need the {s.count} values the stats were computed from, got {v.numel()}")
    if v.numel() == 0:
        raise ValueError("quantiles of an empty stream are undefined")
    q = torch.quantile(v, torch.tensor(QUANTILE_LEVELS, dtype=torch.float64))  # (Q,) linear interpolation
    return NormStats(s.count, s.mean, s.m2, tuple(q.tolist()))


NORMALISATIONS = ("z", "raw", "ratio", "percentile")  # z-score (paper), raw norm, norm / mu, the adapter's own CDF


def as_normalised(s: NormStats, how: str) -> NormStats:
    """Stats whose z-score (n - mean) / std is the given normalisation of the norm n: "z" keeps s, "raw" gives n itself
    (mean 0, std 1), "ratio" gives n / mu (mean 0, std mu). "percentile" keeps s: its monotone map from z to
    the adapter's empirical CDF is applied on top by the bank (LoraLibrary.normalised). Routing stays an exact argmax."""
    if how not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {how!r}")
    if how in ("z", "percentile"):
        return s
    scale = 1.0 if how == "raw" else s.mean
    if not scale > 0:
        raise ValueError(f"normalisation 'ratio' needs a positive mean norm, got {s.mean}")
    return NormStats(count=s.count, mean=0.0, m2=s.count * scale * scale)


def pooled(stats: dict[str, NormStats]) -> dict[str, NormStats]:
    """One NormStats merged over every layer (exact, as if all layers' norms were one stream), for each layer."""
    total = NormStats()
    for st in stats.values():
        total.merge(st)
    return {layer: NormStats(total.count, total.mean, total.m2) for layer in stats}


def sign_test_p(only_a: int, only_b: int) -> float:
    """Two-sided exact sign test on the discordant pairs of a paired comparison (a right and b wrong, or the
    reverse): small p means a real difference, not sampling noise."""
    n = only_a + only_b
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n) if n else 1.0


def z_scorable(mu, sigma) -> bool:
    """True when (norm - mu) / sigma is safe in float32: mu, sigma finite there, sigma > 0, and mu / sigma and
    1 / sigma^2 (what SEQR folds into its Grams) finite too; for every pair when given sequences."""
    with np.errstate(all="ignore"):  # numpy float32: the same float32 arithmetic, far faster than torch per call
        m, s = np.asarray(mu, dtype=np.float32), np.asarray(sigma, dtype=np.float32)
        return bool((np.isfinite(m) & np.isfinite(s) & (s > 0) & np.isfinite(m / s)
                     & np.isfinite(np.float32(1) / (s * s))).all())

