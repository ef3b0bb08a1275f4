"""`seqr calibrate`: a silo computes its adapter's activation-norm statistics on its own training data.

For adapter i, the model runs with adapter i active on i's training examples (prompt + gold answer), and
at every adapted layer the norm ||B_i A x|| of every real token feeds a streaming `NormStats`: mu_i and
sigma_i per layer, plus 32 quantiles of those norms (for the percentile score). Only the silo's own data is
read; what leaves the silo is stats, never data.

What mu and sigma reveal: per layer, the mean and spread of how strongly the adapter reacts to its own
data (two numbers per layer and a token count; the quantiles add 32 points of that norm's distribution, which
`--no-quantiles` withholds). They carry no text, but they are a fingerprint of the data distribution;
`--noise S` adds Gaussian noise of S standard deviations to each mu (the paper's Appendix E) to blur that
fingerprint, at some cost in routing accuracy (`seqr eval` measures it). That noise carries no formal guarantee;
`--dp-epsilon E --dp-delta D` releases mu, sigma and the centroids (E, D)-differentially private per training
example instead (seqr.core.privacy has the mechanism, seqr.silo.private runs it), the guarantee recorded with
the stats.

Centroids (for the centroid routers): per layer, the mean input x over the same real tokens, with the adapter
active, written to seqr_centroids.safetensors. A centroid is a whole mean activation vector per layer, so it says
more about the data than mu and sigma; `--withhold-centroids` keeps it in the silo.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from seqr.store import files
from seqr.hf.dtypes import add_arg as add_dtype_arg
from seqr.hf.layers import attach, detach, routing
from seqr.hf.models import add_device_arg, parse_device
from seqr.store.library import LoraLibrary
from seqr.store.peft_io import stats_json, write_centroids
from seqr.core.privacy import DPConfig
from seqr.core.stats import NormStats, with_quantiles
from seqr.core.argfmt import Parser, existing_dir


TOKEN_SETS = ("all", "prompt", "answer", "content")  # which tokens feed mu, sigma (content: no template tokens)


def norm_stats(model, tokenizer, adapter_dir: str | Path, examples, *, batch_size: int = 8,
               progress: bool = True, scoring: str = "choices", tokens: str = "all",
               centroids: dict | None = None) -> tuple[dict[str, NormStats], int]:
    """(per-layer NormStats of ||B A x|| over the `tokens` of prompt + gold answer, token count); a `centroids`
    dict is filled with each layer's mean input."""
    stats, counts = norm_stats_sets(model, tokenizer, adapter_dir, examples, {tokens: (tokens, None)},
                                    batch_size=batch_size, progress=progress, scoring=scoring, centroids=centroids)
    return stats[tokens], counts[tokens]


def norm_stats_sets(model, tokenizer, adapter_dir: str | Path, examples, sets: dict[str, tuple[str, int | None]], *,
                    batch_size: int = 8, progress: bool = True, scoring: str = "choices",
                    centroids: dict | None = None):
    """Several calibrations from one traced pass: sets maps a label to (token set, first n examples or None).

    Token sets: "all" real tokens of prompt + gold answer (+ end of turn); "prompt"; "answer"; "content": all
    but the chat template's fixed tokens (the prefix and suffix every prompt of this silo shares).
    Returns ({label: per-layer NormStats}, {label: token count}). A `centroids` dict is filled with each layer's
    mean input (n,) over all real tokens of the same pass."""
    bad = {k: v for k, v in sets.items() if v[0] not in TOKEN_SETS}
    if bad or not sets:
        raise ValueError(f"token sets must be some of {TOKEN_SETS}, got {bad or sets}")
    seen = {k: {} for k in sets}  # label -> layer -> every kept norm (stats and quantiles at the end)
    counts = dict.fromkeys(sets, 0)
    sums, tokens = {}, 0  # layer -> (n,) float64 sum of the real tokens' inputs; their number
    for b in traced_batches(model, tokenizer, adapter_dir, examples, batch_size=batch_size, progress=progress,
                            scoring=scoring, inputs=centroids is not None):
        keep = {k: b.select[kind] & (b.example < (n if n is not None else len(examples)))  # (t,)
                for k, (kind, n) in sets.items()}
        for layer, norms in b.norms.items():
            for k in sets:
                seen[k].setdefault(layer, []).append(norms[keep[k]])
        for k in sets:
            counts[k] += int(keep[k].sum())
        for layer, x in b.inputs.items():
            sums[layer] = sums.get(layer, 0.0) + x.sum(0)  # (n,)
        tokens += int(b.tokens.sum())
    if centroids is not None:
        centroids.update({layer: (v / max(tokens, 1)).float().cpu() for layer, v in sums.items()})  # (n,) each
    stats = {k: {layer: _summary(torch.cat(v)) for layer, v in per.items()} for k, per in seen.items()}
    return stats, counts


@dataclass
class Batch:
    """One traced forward of a batch of examples; t counts the batch's real tokens (row-major)."""

    start: int  # index of the batch's first example
    example: torch.Tensor  # (t,) index into the examples of each real token
    select: dict[str, torch.Tensor]  # token set -> (t,) bool
    norms: dict[str, torch.Tensor]  # layer -> (t,) float64 ||B A x||
    inputs: dict[str, torch.Tensor]  # layer -> (B, n) float64 sum of each example's real tokens' inputs ({}: off)
    tokens: torch.Tensor  # (B,) real tokens per example


def traced_batches(model, tokenizer, adapter_dir: str | Path, examples, *, batch_size: int, progress: bool,
                   scoring: str, inputs: bool = False):
    """Run the model with the adapter at `adapter_dir` active over `examples` (prompt + gold answer), yielding a
    `Batch` per forward (with the inputs of every routed layer when `inputs`)."""
    from tqdm import tqdm

    from seqr.silo.train import collate, encode

    name = Path(adapter_dir).name
    lib = LoraLibrary.from_peft({name: adapter_dir})  # one adapter
    lib = lib if lib.uncalibrated else lib.normalised("raw")  # stats from a past run: traces still give raw norms
    encoded = [encode(ex, tokenizer, scoring) for ex in examples]
    dev = next(model.parameters()).device
    plen = [sum(1 for y in labels if y == -100) for _, labels in encoded]  # prompt tokens per example
    pre, suf = _shared_ends([ids[:p] for (ids, _), p in zip(encoded, plen)])
    attach(model, lib)
    live = _InputSums(model, lib.layers if inputs else [])  # no hooks unless inputs are wanted
    try:
        for start in tqdm(range(0, len(encoded), batch_size), desc=f"calibrate {name}", disable=not progress,
                          file=sys.stderr):
            ids, mask, _ = collate(encoded[start:start + batch_size], tokenizer.pad_token_id)  # (B, L) each
            B, L = ids.shape
            live.mask = mask.bool().to(dev)  # (B, L)
            with torch.no_grad(), routing(model, adapter=name, trace=True) as tr:
                model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
            pos = torch.arange(L)[None, :]  # (1, L)
            p = torch.tensor(plen[start:start + B])[:, None]  # (B, 1)
            real = mask.bool()  # (B, L)
            select = {"all": real, "prompt": real & (pos < p), "answer": real & (pos >= p),
                      "content": real & ((pos >= pre) & (pos < p - suf) | (pos >= p))}
            yield Batch(start=start, example=torch.arange(start, start + B)[:, None].expand(B, L)[real],  # (t,)
                         select={k: v[real] for k, v in select.items()},  # (t,) each
                         norms={layer: tr.layer(layer)["norm"][:, 0].double().cpu() for layer in lib.layers},
                         inputs=live.take(), tokens=real.sum(1))
    finally:
        live.remove()
        detach(model)


class _InputSums:
    """Forward pre-hooks summing, per routed layer, each example's real-token inputs (`mask`) of the current batch."""

    def __init__(self, model, layers: list[str]):
        self.layers, self.batch, self.mask = layers, {}, None
        self.handles = [model.get_submodule(layer).register_forward_pre_hook(self._hook(layer)) for layer in layers]

    def _hook(self, layer: str):
        def add(module, args):
            x = args[0]  # (B, L, n)
            self.batch[layer] = torch.where(self.mask[..., None], x, 0).double().sum(1).cpu()  # (B, n)
        return add

    def take(self) -> dict[str, torch.Tensor]:
        """The current batch's sums, in the order of `layers` (not the order the model ran them)."""
        out, self.batch = {layer: self.batch[layer] for layer in self.layers}, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _summary(norms: torch.Tensor) -> NormStats:
    """NormStats of every norm a calibration kept, with their quantiles (none for an empty set)."""
    s = NormStats().update(norms)
    return with_quantiles(s, norms) if s.count else s


def _shared_ends(prompts: list[list[int]]) -> tuple[int, int]:
    """Lengths of the token prefix and suffix every prompt shares (the chat template's fixed tokens)."""
    shortest = min(map(len, prompts))
    pre = next((i for i in range(shortest) if len({p[i] for p in prompts}) > 1), shortest)
    suf = next((i for i in range(shortest - pre) if len({p[-1 - i] for p in prompts}) > 1), shortest - pre)
    return (pre, suf) if len(prompts) > 1 else (0, 0)


def add_noise(stats: dict[str, NormStats], noise: float, seed: int = 0) -> dict[str, NormStats]:
    """mu + noise * sigma * eps per layer, eps ~ N(0, 1) seeded (Appendix E); sigma and counts unchanged."""
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer, s in stats.items():
        eps = float(torch.randn((), generator=g, dtype=torch.float64))
        shift = noise * s.std * eps  # the whole norm distribution moves with mu
        out[layer] = replace(s, mean=s.mean + shift,  # post-processing: a DP guarantee still holds
                             quantiles=None if s.quantiles is None else tuple(q + shift for q in s.quantiles))
    return out


def calibrate(model, tokenizer, adapter_dir: str | Path, examples, *, noise: float = 0.0, seed: int = 0,
              batch_size: int = 8, progress: bool = True, scoring: str = "choices", tokens: str = "all",
              quantiles: bool = True, centroids: bool = True, dp: DPConfig | None = None,
              generator: torch.Generator | None = None) -> dict[str, NormStats]:
    """Compute the stats and write them atomically into the adapter dir (seqr_stats.json), and the centroids
    (seqr_centroids.safetensors) unless `centroids=False`; without `quantiles` only mu, sigma and counts leave
    the silo (the percentile score then cannot use this adapter). With `dp` (a seqr.core.privacy.DPConfig) the
    release is differentially private instead (seqr.silo.private.dp_calibrate; `generator` draws its noise)."""
    if dp is not None:
        from seqr.silo.private import dp_calibrate

        return dp_calibrate(model, tokenizer, adapter_dir, examples, dp, noise=noise, seed=seed,
                            batch_size=batch_size, progress=progress, scoring=scoring, tokens=tokens,
                            centroids=centroids, generator=generator)
    means = {} if centroids else None
    stats, count = norm_stats(model, tokenizer, adapter_dir, examples, batch_size=batch_size, progress=progress,
                              scoring=scoring, tokens=tokens, centroids=means)
    if not quantiles:
        stats = {layer: NormStats(s.count, s.mean, s.m2) for layer, s in stats.items()}
    return ship(adapter_dir, stats, means, noise=noise, seed=seed, examples=len(examples), tokens=count,
                token_set=tokens)


def ship(adapter_dir: str | Path, stats: dict[str, NormStats], centroids: dict | None, *, noise: float, seed: int,
         **extra) -> dict[str, NormStats]:
    """What leaves the silo, written atomically into the adapter dir: the stats (with `noise` added, Appendix E)
    and the centroids, or no centroids file when they are withheld (None); `extra` goes into the stats file."""
    if centroids is not None:
        write_centroids(Path(adapter_dir), centroids)
    else:
        (Path(adapter_dir) / files.CENTROIDS_FILE).unlink(missing_ok=True)  # withheld: none left from a past run
    stats = add_noise(stats, noise, seed) if noise else stats
    files.atomic_write_json(Path(adapter_dir) / files.STATS_FILE,
                            stats_json(stats, noise=noise, seed=seed, **extra))
    return stats


def parse_calibration(spec: str) -> tuple[str, int]:
    """"TOKENS[@N]" -> (token set, training examples per silo; default 60), e.g. "answer@30"."""
    tokens, _, n = str(spec).partition("@")
    if tokens not in TOKEN_SETS or (n and not (n.isdigit() and int(n) > 0)):
        raise ValueError(f"calibration must be TOKENS[@N] with TOKENS one of {TOKEN_SETS} and N a positive "
                         f"integer, got {spec!r}")
    return tokens, int(n) if n else 60


def recalibrated(library: LoraLibrary, model, tokenizer, spec: str, *, data_dir=None, seed: int = 0,
                 scoring: str = "choices", progress: bool = True) -> LoraLibrary:
    """An unbound view of `library` with every adapter calibrated afresh by `spec` (parse_calibration) on its own
    task's training split (the adapter's name is its task): what each silo would ship with other settings."""
    import tempfile

    from seqr.silo.tasks import load_task

    tokens, n = parse_calibration(spec)
    stats = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in library.names:
            try:
                examples = load_task(name, "train", data_dir=data_dir, max_examples=n, seed=seed)
            except (FileNotFoundError, KeyError, ValueError) as e:
                raise ValueError(f"cannot recalibrate adapter {name!r}: its name must be a task with a train split "
                                 f"({e})") from None
            adapter_dir = library.to_peft(name, Path(tmp) / name)
            stats[name], _ = norm_stats(model, tokenizer, adapter_dir, examples, progress=progress, scoring=scoring,
                                        tokens=tokens)
    return library.with_stats(stats)


def main(argv: list[str] | None = None) -> int:
    from seqr.silo.private import add_dp_args

    p = Parser(prog="seqr calibrate",
               description="Per-layer activation-norm stats of one adapter on its own training data.")
    p.add_argument("--model", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="the adapter dir (seqr train's --out)")
    p.add_argument("--task", required=True, help="the adapter's own task: a name or a JSONL file")
    p.add_argument("--data", type=existing_dir,
                   help="directory laid out as <task>/{train,dev}.jsonl (default $SEQR_TASK_DATA)")
    p.add_argument("--max-examples", type=int, default=200, help="training examples to use (default 200)")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise on mu, in standard deviations")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the example subset and of the noise")
    p.add_argument("--scoring", choices=("choices", "letter"), default="choices", help="answer format (as trained)")
    p.add_argument("--tokens", choices=TOKEN_SETS, default="all",
                   help="tokens that feed mu, sigma: all (paper), prompt, answer, content (no chat-template tokens)")
    p.add_argument("--no-quantiles", action="store_true",
                   help="store only mu, sigma and counts (withholds the norm quantiles the percentile score needs)")
    p.add_argument("--withhold-centroids", action="store_true",
                   help="do not write the per-layer mean inputs the centroid routers need (they reveal more than mu)")
    add_dp_args(p)
    add_dtype_arg(p)
    add_device_arg(p)
    a = p.parse_args(argv)
    device = parse_device(p, a.device)
    if not (Path(a.adapter) / files.PEFT_WEIGHTS).exists():
        p.error(f"{a.adapter} holds no adapter ({files.PEFT_WEIGHTS} missing); run seqr train first")
    from seqr.hf.dtypes import say_choice
    from seqr.hf.models import load_model
    from seqr.silo.private import dp_request, with_public_clip
    from seqr.silo.tasks import check_task

    examples = check_task(p, a.task, a.data, a.max_examples, a.seed)  # before the model loads
    dp, public = dp_request(p, a, len(examples))  # so is the DP request
    model, tok = load_model(a.model, dtype=say_choice(a.dtype, "seqr calibrate"), device=device)
    dp = with_public_clip(dp, model, tok, a, public) if public else dp
    stats = calibrate(model, tok, a.adapter, examples, noise=a.noise, seed=a.seed, batch_size=a.batch_size,
                      scoring=a.scoring, tokens=a.tokens, quantiles=not a.no_quantiles,
                      centroids=not a.withhold_centroids, dp=dp)
    means = [s.mean for s in stats.values()]
    privacy = next(iter(stats.values())).privacy
    print(json.dumps({"adapter": a.adapter, "layers": len(stats), "examples": len(examples),
                      "mean_mu": sum(means) / len(means), "min_mu": min(means), "max_mu": max(means),
                      "privacy": None if privacy is None else privacy.to_dict()}, indent=1))
    return 0
