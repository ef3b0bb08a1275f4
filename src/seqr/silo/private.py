"""`seqr calibrate --dp-epsilon E --dp-delta D`: a differentially private calibration of one adapter.

The mechanism, its adjacency (replace-one), the budget split with centroids, the std floor and what is public are
in seqr.core.privacy; this module runs the model to get each example's summaries, clips and sums them
(`dp_sums`, deterministic), then adds the noise and writes the release (`dp_calibrate`).

The clip bound C is a public choice: given (`--dp-clip`), or taken from a public sample by `public_clip`, the
largest per-example row norm on examples the silo may publish (another task's data, never its own training
data), so that rows like the public ones are not clipped. The same sample gives the centroids' public centre p,
the mean of its centroid rows, and C_c, the largest distance of one of them from p.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from seqr.core.argfmt import BadValue
from seqr.core.privacy import (DPConfig, Guarantee, check_examples, clipped_sum, noise_generator,
                               release_centroids, release_moments)
from seqr.core.stats import NormStats
from seqr.silo.calibrate import Batch, ship, traced_batches


def example_rows(b: Batch, tokens: str = "all") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per example of the batch: its row (B, 2L) of (mean ||B A x||, mean ||B A x||^2) over its `tokens`, layer
    by layer (an example without such tokens gives zeros), and its centroid row (B, sum n): its mean input per
    layer over its real tokens, layers concatenated (None when inputs were not traced)."""
    keep = b.select[tokens]  # (t,)
    ex = b.example[keep] - b.start  # (t',) example index within the batch
    zeros = torch.zeros(len(b.tokens), dtype=torch.float64)  # (B,)
    kept = zeros.index_add(0, ex, torch.ones(len(ex), dtype=torch.float64)).clamp_min(1)  # (B,) tokens kept
    cols = []
    for norms in b.norms.values():
        v = norms[keep]  # (t',)
        cols += [zeros.index_add(0, ex, v) / kept, zeros.index_add(0, ex, v * v) / kept]  # (B,) each
    rows = torch.stack(cols, 1)  # (B, 2L): layer l's mean norm at 2l, its mean squared norm at 2l + 1
    if not b.inputs:
        return rows, None
    per = b.tokens[:, None].clamp_min(1).double()  # (B, 1)
    return rows, torch.cat([x / per for x in b.inputs.values()], 1)  # (B, sum n)


@dataclass
class ClippedSums:
    """The pre-noise sums over examples of their clipped rows."""

    stats: dict[str, torch.Tensor]  # layer -> (2,): sum of clipped (mean norm, mean squared norm)
    centroids: dict[str, torch.Tensor] | None  # layer -> (n,): its slice of the sum of clipped rows c_e - p
    examples: int
    center: dict[str, torch.Tensor] | None = None  # layer -> (n,): the public centre p (None: 0)


def dp_sums(model, tokenizer, adapter_dir: str | Path, examples, clip: float, centroid_clip: float | None = None,
            *, centroid_center: dict[str, torch.Tensor] | None = None, tokens: str = "all", batch_size: int = 8,
            progress: bool = True, scoring: str = "choices") -> ClippedSums:
    """sum_e clip(v_e, C) (and sum_e clip(c_e - p, C_c) with a `centroid_clip`, p the public `centroid_center`
    or 0): one example moves either sum by at most its clip bound when added or removed, sqrt(2) C (2 C_c) when
    replaced."""
    check_examples(len(examples))
    total = cents = 0.0
    for b in traced_batches(model, tokenizer, adapter_dir, examples, batch_size=batch_size, progress=progress,
                            scoring=scoring, inputs=centroid_clip is not None):
        rows, c = example_rows(b, tokens)
        total = total + clipped_sum(rows, clip)  # (2L,)
        if c is not None:
            p = 0.0 if centroid_center is None else layer_row(centroid_center, b.inputs)  # (sum n,)
            cents = cents + clipped_sum(c - p, centroid_clip)  # (sum n,)
        layers, sizes = list(b.norms), [x.shape[1] for x in b.inputs.values()]
    stats = dict(zip(layers, total.reshape(-1, 2)))  # layer -> (2,)
    return ClippedSums(stats, dict(zip(layers, cents.split(sizes))) if centroid_clip is not None else None,
                       len(examples), centroid_center if centroid_clip is not None else None)


def layer_row(per_layer: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-layer vectors concatenated in the order of a batch's centroid row (`like`'s layers)."""
    if missing := [k for k in like if k not in per_layer]:
        raise ValueError(f"the centroid centre has no vector for layer(s) {missing[:3]}")
    return torch.cat([per_layer[k].double() for k in like])  # (sum n,)


class PublicBounds(NamedTuple):
    """What the public rule takes from a public sample: C, and with centroids C_c and the centre p."""

    clip: float
    centroid_clip: float | None = None
    center: dict[str, torch.Tensor] | None = None  # layer -> (n,) float64


def public_clip(model, tokenizer, adapter_dir: str | Path, public_examples, *, tokens: str = "all",
                centroids: bool = False, batch_size: int = 8, progress: bool = True,
                scoring: str = "choices") -> PublicBounds:
    """C by the public rule, the largest per-example row norm over `public_examples`, which must be data the silo
    may publish (never its private training data: C would then leak it); with `centroids` also the centre p, the
    mean of their centroid rows, and C_c, the largest distance of one of those rows from p."""
    c, rows, sizes = 0.0, [], {}
    for b in traced_batches(model, tokenizer, adapter_dir, public_examples, batch_size=batch_size,
                            progress=progress, scoring=scoring, inputs=centroids):
        r, cents = example_rows(b, tokens)
        c = max(c, float(torch.linalg.vector_norm(r, dim=1).max()))
        if cents is not None:
            rows.append(cents.float())  # (B, sum n)
            sizes = {k: x.shape[1] for k, x in b.inputs.items()}
    if not centroids:
        return PublicBounds(c)
    every = torch.cat(rows).double()  # (P, sum n)
    if len(every) < 2:
        raise BadValue(f"a public centre and C_c need at least 2 public examples, got {len(every)}")
    p = every.mean(0)  # (sum n,)
    cc = float(torch.linalg.vector_norm(every - p, dim=1).max())
    return PublicBounds(c, cc, dict(zip(sizes, p.split(list(sizes.values())))))


def dp_release(sums: ClippedSums, g: Guarantee,
               generator: torch.Generator | None = None) -> tuple[dict[str, NormStats], dict | None]:
    """The noisy release of `sums` under `g`: per layer NormStats (count = examples, carrying `g`) and, when
    `g` covers them, the centroids (layer -> (n,) float32). `generator` defaults to one seeded from OS entropy."""
    gen = noise_generator() if generator is None else generator
    layers = list(sums.stats)
    mu, sigma = release_moments(torch.stack([sums.stats[k] for k in layers]), g, gen)  # (L,) each
    n = g.examples
    stats = {k: NormStats(count=n, mean=float(m), m2=n * float(s) ** 2, privacy=g)
             for k, m, s in zip(layers, mu, sigma)}
    if g.centroid_clip is None:
        return stats, None
    p = sums.center or {}
    return stats, {k: (release_centroids(v, g, gen) + p.get(k, 0.0)).float()  # (n,) each: the noisy mean + p
                   for k, v in sums.centroids.items()}


def dp_calibrate(model, tokenizer, adapter_dir: str | Path, examples, dp: DPConfig, *, centroids: bool = True,
                 noise: float = 0.0, seed: int = 0, batch_size: int = 8, progress: bool = True,
                 scoring: str = "choices", tokens: str = "all",
                 generator: torch.Generator | None = None) -> dict[str, NormStats]:
    """Calibrate under (dp.epsilon, dp.delta)-DP and write the release into the adapter dir like `calibrate`:
    stats without quantiles and without a token count, each layer's record carrying the guarantee, and the
    centroids released under DP too (or withheld, `centroids=False`; the whole budget then goes to the stats)."""
    g = dp.guarantee(len(examples), centroids=centroids)  # refuses bad values before the model runs
    sums = dp_sums(model, tokenizer, adapter_dir, examples, g.clip, g.centroid_clip, tokens=tokens,
                   centroid_center=dp.centroid_center if centroids else None, batch_size=batch_size,
                   progress=progress, scoring=scoring)
    stats, means = dp_release(sums, g, generator)
    return ship(adapter_dir, stats, means, noise=noise, seed=seed, examples=len(examples), tokens=None,
                token_set=tokens, privacy=g.to_dict())


def add_dp_args(p) -> None:
    """`seqr calibrate`'s differential-privacy options."""
    g = p.add_argument_group("differential privacy (seqr.core.privacy: Gaussian mechanism, one example, replace-one)")
    g.add_argument("--dp-epsilon", type=float, metavar="E",
                   help="release mu, sigma (and the centroids) (E, D)-differentially private per training example: "
                        "Gaussian noise on clipped per-example sums; no quantiles, no token count")
    g.add_argument("--dp-delta", type=float, metavar="D",
                   help="the delta of the guarantee, in (0, 1); below 1 / examples")
    g.add_argument("--dp-clip", type=float, metavar="C",
                   help="L2 bound on each example's row of per-layer (mean norm, mean squared norm): rows above it "
                        "are scaled down (bias), the noise grows with it. A public choice, never read off the "
                        "private data: given here, or set by --dp-public")
    g.add_argument("--dp-centroid-clip", type=float, metavar="C_c",
                   help="L2 bound on each example's mean input, all layers concatenated (DP centroids)")
    g.add_argument("--dp-public", metavar="TASK",
                   help="set C (and C_c) not given to the largest per-example row norm on a public sample: "
                        "TASK's train split (another task than --task, data the silo may publish); the centroid "
                        "rows are then clipped around the sample's mean row (much less noise)")
    g.add_argument("--dp-public-examples", type=int, default=16, metavar="N", help="size of that public sample")
    g.add_argument("--dp-accountant", choices=("pld", "rdp"), default="pld", help="dp-accounting's accountant")


def dp_request(p, a, examples: int) -> tuple[DPConfig | None, list | None]:
    """The DP request in `seqr calibrate`'s arguments, checked before any model loads (one line, exit 2): the
    config (None: no DP) and the public sample C is to be taken from (None: C is given)."""
    from seqr.silo.tasks import check_task

    if a.dp_epsilon is None:
        extra = [k for k in ("dp_delta", "dp_clip", "dp_centroid_clip", "dp_public") if getattr(a, k) is not None]
        if extra:
            p.error(f"--{extra[0].replace('_', '-')} needs --dp-epsilon")
        return None, None
    if a.dp_delta is None:
        p.error("--dp-epsilon needs --dp-delta D in (0, 1), e.g. 1e-5 (below 1 / examples)")
    centroids = not a.withhold_centroids
    if a.dp_public is None and (a.dp_clip is None or centroids and a.dp_centroid_clip is None):
        p.error("--dp-epsilon needs clip bounds chosen without the private data: --dp-clip C"
                + (" and --dp-centroid-clip C_c (or --withhold-centroids)" if centroids else "")
                + ", or --dp-public TASK to take them from a public sample")
    cfg = DPConfig(a.dp_epsilon, a.dp_delta, a.dp_clip, a.dp_centroid_clip if centroids else None, a.dp_accountant)
    check_examples(examples)
    if a.dp_public is None:
        return cfg, None
    if a.dp_public == a.task:
        p.error(f"--dp-public {a.dp_public!r} is the silo's own task; C must come from public data")
    if a.dp_public_examples < (2 if centroids else 1):
        need = "at least 2 (centroids are clipped around the sample's mean row)" if centroids else "a positive integer"
        p.error(f"--dp-public-examples must be {need}, got {a.dp_public_examples}")
    return cfg, check_task(p, a.dp_public, a.data, a.dp_public_examples, a.seed)


def with_public_clip(cfg: DPConfig, model, tokenizer, a, public) -> DPConfig:
    """`cfg` with the clip bounds it lacks taken from the public sample (`public_clip`), the rule recorded."""
    centroids = not a.withhold_centroids
    b = public_clip(model, tokenizer, a.adapter, public, tokens=a.tokens, centroids=centroids,
                    batch_size=a.batch_size, scoring=a.scoring, progress=False)
    rule = f"largest per-example row norm on {len(public)} public examples of {a.dp_public}"
    centred = centroids and not cfg.centroid_clip  # a given C_c bounds the rows themselves (centre 0)
    return replace(cfg, clip=cfg.clip or b.clip, centroid_clip=cfg.centroid_clip or b.centroid_clip,
                   clip_rule=f"C: {'given' if cfg.clip else rule}" + (
                       f"; C_c: {'given' if cfg.centroid_clip else rule + ' from their mean'}" if centroids else ""),
                   centroid_center=b.center if centred else None,
                   center_rule=f"the mean of {len(public)} public examples of {a.dp_public}" if centred else None)
