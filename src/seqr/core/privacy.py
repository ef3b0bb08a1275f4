"""Differentially private calibration: the Gaussian mechanism on clipped per-example summaries.

The unit of privacy is one training example. Adjacency is **replace-one**: two datasets are neighbours when they
hold the same number n of examples and differ in one of them. n is public (the silo declares how many examples
it calibrates on, e.g. `--max-examples`) and is released as is; it is not noised. (Under add/remove adjacency the
released n would itself tell whether an example is in.)

The release, for an adapter with L routed layers (everything below is `seqr.silo.private.dp_calibrate`):

- per example e and layer l: a_el = mean over e's kept tokens of ||B A x_t||, b_el = mean of ||B A x_t||^2; the
  2L summaries form one row v_e (an example without kept tokens gives the zero row);
- clipping: v_e <- v_e * min(1, C / ||v_e||_2), so ||v_e|| <= C;
- S = sum_e v_e, released as S~ = S + N(0, sigma^2 I), sigma = nm * sqrt(2) * C. Replace-one sensitivity is
  sqrt(2) C, not 2 C: every summary is >= 0, so two clipped rows u, w lie in the non-negative orthant and
  ||u - w||^2 = ||u||^2 + ||w||^2 - 2 u.w <= 2 C^2 (removing or adding one example moves S by at most C);
- per layer, by post-processing only: mu = S~_a / n, m = S~_b / n, s = sigma / n (the noise std of mu, public),
  var = m - mu^2 + s^2 (unbiased: E[mu~^2] = mu^2 + s^2), sigma_l = sqrt(max(var, s^2)): the std is floored at s,
  the resolution of the released mean itself, so z-scores stay finite (s > 0 always).

So under DP (up to noise and clipping) mu_l is the mean of the token norms with every **example** weighing the
same (each of example e's T_e kept tokens weighs 1 / (n T_e)), and sigma_l^2 = mean_e b_el - mu_l^2 is their
variance under those weights (the spread within and between examples together). The non-DP path weighs every
token the same (1 / T); the two estimators agree when all examples have the same number of kept tokens.
NormStats.count is then the number of examples; the token count is not released, nor are quantiles (a
quantile of the norms has no bounded sensitivity under this mechanism), so the percentile normalisation cannot
use a DP adapter.

Centroids (optional, a second release): per example the mean input x over its real tokens, all layers'
means concatenated into one row c_e; minus a public centre p (the mean of the public sample's rows when C_c is
taken from one, else 0), clipped to C_c, summed, noised with std nm * 2 * C_c (inputs have any sign: replace-one
sensitivity 2 C_c), divided by n, plus p again. p is data-independent, so the sensitivity is that of the rows
c_e - p; it pays because every silo's mean inputs share a large common part: on the paper-budget library
(SmolLM2), 16 public rows have norms up to 63 but lie within 6.2 of their mean, so the centred C_c, and with it
the noise, is ten times smaller. Budget split: both releases use the same noise multiplier nm,
the smallest at which the accountant says their composition is (epsilon, delta)-DP (an equal split in the
Gaussian-DP sense). Without centroids the one release gets the whole budget.

The accountant is Google's `dp-accounting` (PLD by default, tight; RDP on request): it is asked for
`GaussianDpEvent(nm)`, a Gaussian of std nm per unit of L2 sensitivity, and our std is nm times our sensitivity.

C is never chosen from the private data: it is given (`--dp-clip`), or taken from a public sample
(`--dp-public TASK`: the largest per-example row norm on those public examples, C_c around their mean, see
`seqr.silo.private.public_clip`: a function of public data and of the adapter's weights, which the silo
releases anyway). What the guarantee covers: the released stats and centroids, given the adapter's weights; the
weights are trained without DP and are not covered. The noise is drawn by torch from a generator seeded with
63 bits of OS entropy; it is not hardened against floating-point attacks on the sampler (Mironov 2012).
"""
from __future__ import annotations

import functools
import math
import secrets
from dataclasses import MISSING, asdict, dataclass, field, fields
from numbers import Real

import torch

from seqr.core.argfmt import BadValue, unknown

MECHANISM, ADJACENCY = "gaussian", "replace-one"
ACCOUNTANTS = ("pld", "rdp")
MIN_EXAMPLES = 2
STATS_SENSITIVITY = math.sqrt(2.0)  # x C: replace-one, rows in the non-negative orthant
CENTROID_SENSITIVITY = 2.0  # x C_c: replace-one, rows of any sign


def _positive(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and value > 0):
        raise BadValue(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def check_examples(examples: int) -> None:
    """A DP release needs at least MIN_EXAMPLES examples (the mean of one example is that example)."""
    if examples < MIN_EXAMPLES:
        raise BadValue(f"DP calibration needs at least {MIN_EXAMPLES} examples, got {examples}")


@dataclass
class DPConfig:
    """What a DP calibration asks for: (epsilon, delta), the per-example clip bound C of the norm summaries and
    C_c of the centroid rows (None: centroids cannot be released under DP), and the accountant. `clip` may be
    None until it is taken from a public sample (`seqr.silo.private.public_clip`); `clip_rule` says how C was
    chosen. `centroid_center` (layer -> (n,)), public, is what the centroid rows are clipped around (None: 0);
    `center_rule` says where it came from."""

    epsilon: float
    delta: float
    clip: float | None = None
    centroid_clip: float | None = None
    accountant: str = "pld"
    clip_rule: str = "given"
    centroid_center: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    center_rule: str | None = None

    def __post_init__(self):
        self.epsilon = _positive("DP epsilon", self.epsilon)
        d = self.delta
        if isinstance(d, bool) or not isinstance(d, Real) or not 0 < d < 1:
            raise BadValue(f"DP delta must be in (0, 1), got {d!r}")
        self.delta = float(d)
        self.clip = None if self.clip is None else _positive("DP clip C", self.clip)
        self.centroid_clip = None if self.centroid_clip is None else _positive("DP centroid clip", self.centroid_clip)
        if self.accountant not in ACCOUNTANTS:
            raise BadValue(unknown("accountant", str(self.accountant), ACCOUNTANTS))
        c = self.centroid_center
        if c is not None and not (isinstance(c, dict) and c and all(
                isinstance(v, torch.Tensor) and v.dim() == 1 and v.is_floating_point() and torch.isfinite(v).all()
                for v in c.values())):
            raise BadValue(f"DP centroid centre must map layers to finite 1-D float tensors, got {type(c).__name__}")

    def guarantee(self, examples: int, centroids: bool = False) -> "Guarantee":
        """The guarantee of one calibration on `examples` examples (with centroids: two composed releases)."""
        check_examples(examples)
        if self.clip is None:
            raise BadValue("DP calibration needs a clip bound C: give one, or take it from a public sample")
        if centroids and self.centroid_clip is None:
            raise BadValue("DP centroids need a centroid clip bound C_c, got none; give one or withhold centroids")
        releases = 2 if centroids else 1
        nm = noise_multiplier(self.epsilon, self.delta, releases, self.accountant)
        return Guarantee(epsilon=self.epsilon, delta=self.delta, clip=self.clip, examples=examples,
                         noise_multiplier=nm, accountant=accountant_label(self.accountant),
                         centroid_clip=self.centroid_clip if centroids else None, clip_rule=self.clip_rule,
                         centroid_center=(self.center_rule or "given") if centroids and self.centroid_center else None)


def noise_multiplier(epsilon: float, delta: float, releases: int = 1, accountant: str = "pld") -> float:
    """The smallest noise multiplier nm (std per unit of L2 sensitivity) at which `releases` Gaussian releases,
    composed, are (epsilon, delta)-DP by dp-accounting's calibrate_dp_mechanism with its PLD or RDP accountant.

    PLD discretises the privacy loss on a grid (pessimistically, so the bound stays valid): its default step,
    1e-4, is kept up to epsilon 1 and grows with epsilon above, so the relative precision stays 1e-4 and the
    grid stays small (at epsilon 1000 the default step would take minutes per calibration)."""
    import dp_accounting as dpa

    step = 1e-4 * max(1.0, epsilon)  # the PLD grid's step in privacy loss
    make = {"pld": functools.partial(dpa.pld.PLDAccountant, value_discretization_interval=step),
            "rdp": dpa.rdp.RdpAccountant}[accountant]
    event = lambda nm: dpa.ComposedDpEvent([dpa.GaussianDpEvent(nm)] * releases)  # noqa: E731
    return float(dpa.calibrate_dp_mechanism(make, event, epsilon, delta))


def accountant_label(accountant: str) -> str:
    from importlib.metadata import version

    return f"dp-accounting {version('dp-accounting')} {accountant.upper()}"


@dataclass(frozen=True)
class Guarantee:
    """The (epsilon, delta)-DP guarantee (replace-one, one example) a calibration's released stats carry; stored
    in every layer's NormStats record, so the adapter dir, the library manifest and the service carry it."""

    epsilon: float
    delta: float
    clip: float
    examples: int
    noise_multiplier: float
    accountant: str  # "dp-accounting <version> PLD|RDP"
    centroid_clip: float | None = None  # None: no centroids were released under this guarantee
    clip_rule: str = "given"
    centroid_center: str | None = None  # where the public centre of the centroid rows came from (None: 0)
    mechanism: str = MECHANISM
    adjacency: str = ADJACENCY

    def __post_init__(self):
        for key in ("epsilon", "clip", "noise_multiplier"):
            _positive(key, getattr(self, key))
        if not 0 < self.delta < 1 or self.centroid_clip is not None and not self.centroid_clip > 0:
            raise ValueError(f"delta must be in (0, 1) and centroid_clip > 0, got {self.delta}, {self.centroid_clip}")
        if isinstance(self.examples, bool) or not isinstance(self.examples, int) or self.examples < MIN_EXAMPLES:
            raise ValueError(f"examples must be an integer >= {MIN_EXAMPLES}, got {self.examples!r}")

    @property
    def stats_noise_std(self) -> float:
        return self.noise_multiplier * STATS_SENSITIVITY * self.clip

    @property
    def centroid_noise_std(self) -> float | None:
        return None if self.centroid_clip is None else self.noise_multiplier * CENTROID_SENSITIVITY * self.centroid_clip

    @property
    def std_floor(self) -> float:
        """The noise std of each released mean (sigma / n): the floor of every released std."""
        return self.stats_noise_std / self.examples

    def to_dict(self) -> dict:
        return {**asdict(self), "releases": 1 if self.centroid_clip is None else 2,
                "stats_noise_std": self.stats_noise_std, "centroid_noise_std": self.centroid_noise_std,
                "std_floor": self.std_floor}

    @classmethod
    def from_dict(cls, d) -> "Guarantee":
        """A record written by `to_dict` (the derived fields are recomputed); errors name the field."""
        if not isinstance(d, dict):
            raise ValueError(f"a privacy record must be an object, got {d!r}")
        known = {f.name: f for f in fields(cls)}
        missing = [k for k, f in known.items() if f.default is MISSING and k not in d]
        if missing:
            raise ValueError(f"privacy record has no field {missing[0]!r}")
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, ValueError, BadValue) as e:
            raise ValueError(f"privacy record: {e}") from None

    def describe(self) -> str:
        around = f" around {self.centroid_center}" if self.centroid_center else ""
        cents = "" if self.centroid_clip is None else f", C_c={self.centroid_clip:.4g}{around} (centroids)"
        return (f"eps={self.epsilon:g}, delta={self.delta:g}, C={self.clip:.4g}{cents}, {self.examples} examples, "
                f"{self.mechanism} nm={self.noise_multiplier:.4g}, {self.adjacency}, {self.accountant}")


def clip_rows(rows: torch.Tensor, clip: float) -> torch.Tensor:
    """Each row scaled to L2 norm at most `clip` (rows already inside are unchanged)."""
    norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)  # (N, 1)
    return rows * torch.clamp(clip / norms.clamp_min(1e-300), max=1.0)  # (N, d)


def clipped_sum(rows: torch.Tensor, clip: float) -> torch.Tensor:
    """sum_e clip(v_e): the pre-noise sum, which one example moves by at most `clip` (added or removed)."""
    return clip_rows(rows.double(), clip).sum(0)  # (d,)


def noise_generator() -> torch.Generator:
    """A generator seeded from OS entropy: DP noise must not be reproducible from a public seed."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def noised(total: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    return total + std * torch.randn(total.shape, generator=generator, dtype=torch.float64)  # total's shape


def release_moments(total: torch.Tensor, g: Guarantee, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu (L,), sigma (L,)) from the clipped sum `total` (L, 2) of (mean norm, mean squared norm) per example:
    S~ = S + N(0, stats_noise_std^2), mu = S~_a / n, var = S~_b / n - mu^2 + s^2, sigma = sqrt(max(var, s^2)),
    s = g.std_floor."""
    noisy = noised(total.double(), g.stats_noise_std, generator) / g.examples  # (L, 2)
    mu, second = noisy.unbind(-1)  # (L,) each
    s2 = g.std_floor ** 2
    return mu, (second - mu * mu + s2).clamp_min(s2).sqrt()


def release_centroids(total: torch.Tensor, g: Guarantee, generator: torch.Generator) -> torch.Tensor:
    """The noisy mean (d,) of the clipped per-example mean inputs: (sum + N(0, centroid_noise_std^2)) / n."""
    if g.centroid_noise_std is None:
        raise ValueError("this guarantee released no centroids (centroid_clip is None)")
    return noised(total.double(), g.centroid_noise_std, generator) / g.examples  # (d,)


def guarantee_of(stats: dict | None) -> Guarantee | None:
    """The guarantee an adapter's per-layer stats carry: the one every layer holds, else None (uncalibrated,
    calibrated without DP, or layers from different releases)."""
    found = {s.privacy for s in (stats or {}).values()}
    return found.pop() if len(found) == 1 else None


def guarantees(library) -> dict[str, Guarantee | None]:
    """name -> guarantee (or None) of every adapter of a library (anything with `.names` and `.stats(name)`)."""
    return {n: guarantee_of(library.stats(n)) for n in library.names}


def unguaranteed(library) -> list[str]:
    """The library's adapters whose stats carry no DP guarantee."""
    return [n for n, g in guarantees(library).items() if g is None]
