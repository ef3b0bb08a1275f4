"""`seqr calibrate`: a silo computes its adapter's activation-norm statistics on its own training data.

For adapter i, the model runs with adapter i active on i's training examples (prompt + gold answer), and
at every adapted layer the norm ||B_i A x|| of every real token feeds a streaming `NormStats`: mu_i and
sigma_i per layer, plus 32 quantiles of those norms (for the percentile score). Only the silo's own data is
read; what leaves the silo is stats, never data.

What mu and sigma reveal: per layer, the mean and spread of how strongly the adapter reacts to its own
data (two numbers per layer and a token count; the quantiles add 32 points of that norm's distribution, which
`--no-quantiles` withholds). They carry no text, but they are a fingerprint of the data distribution;
`--noise S` adds Gaussian noise of S standard deviations to each mu (the paper's Appendix E) to blur that
fingerprint, at some cost in routing accuracy (`seqr eval` measures it).

Centroids (for the centroid routers): per layer, the mean input x over the same real tokens, with the adapter
active, written to seqr_centroids.safetensors. A centroid is a whole mean activation vector per layer, so it says
more about the data than mu and sigma; `--withhold-centroids` keeps it in the silo.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from seqr.store import files
from seqr.hf.dtypes import add_arg as add_dtype_arg
from seqr.hf.layers import attach, detach, routing
from seqr.hf.models import add_device_arg, parse_device
from seqr.store.library import LoraLibrary
from seqr.store.peft_io import stats_json, write_centroids
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
    from tqdm import tqdm

    from seqr.silo.train import collate, encode

    bad = {k: v for k, v in sets.items() if v[0] not in TOKEN_SETS}
    if bad or not sets:
        raise ValueError(f"token sets must be some of {TOKEN_SETS}, got {bad or sets}")
    name = Path(adapter_dir).name
    lib = LoraLibrary.from_peft({name: adapter_dir})  # one adapter, no stats: traces give raw norms
    encoded = [encode(ex, tokenizer, scoring) for ex in examples]
    dev = next(model.parameters()).device
    plen = [sum(1 for y in labels if y == -100) for _, labels in encoded]  # prompt tokens per example
    pre, suf = _shared_ends([ids[:p] for (ids, _), p in zip(encoded, plen)])
    seen = {k: {layer: [] for layer in lib.layers} for k in sets}  # every kept norm (stats and quantiles at the end)
    counts = dict.fromkeys(sets, 0)
    attach(model, lib)
    sums = {layer: 0.0 for layer in lib.layers}  # layer -> (n,) float64 sum of the real tokens' inputs
    live = _InputSums(model, sums if centroids is not None else {})  # no hooks unless centroids are wanted
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
            row = torch.arange(start, start + B)[:, None]  # (B, 1) example index
            real = mask.bool()  # (B, L)
            select = {"all": real, "prompt": real & (pos < p), "answer": real & (pos >= p),
                      "content": real & ((pos >= pre) & (pos < p - suf) | (pos >= p))}
            keep = {k: (select[kind] & (row < (n if n is not None else len(encoded))))[real]  # (t,) of real tokens
                    for k, (kind, n) in sets.items()}
            for layer in lib.layers:
                norms = tr.layer(layer)["norm"][:, 0]  # (t,) ||B A x|| of the real tokens
                for k in sets:
                    seen[k][layer].append(norms[keep[k]].double())
            for k in sets:
                counts[k] += int(keep[k].sum())
            live.tokens += int(real.sum())
    finally:
        live.remove()
        detach(model)
    if centroids is not None:
        centroids.update({layer: (v / max(live.tokens, 1)).float().cpu() for layer, v in sums.items()})  # (n,) each
    stats = {k: {layer: _summary(torch.cat(v)) for layer, v in per.items()} for k, per in seen.items()}
    return stats, counts


class _InputSums:
    """Forward pre-hooks adding, per routed layer, the inputs of the current batch's real tokens (`mask`)."""

    def __init__(self, model, sums: dict):
        self.sums, self.mask, self.tokens = sums, None, 0
        self.handles = [model.get_submodule(layer).register_forward_pre_hook(self._hook(layer)) for layer in sums]

    def _hook(self, layer: str):
        def add(module, args):
            x = args[0]  # (B, L, n)
            self.sums[layer] = self.sums[layer] + x[self.mask].double().sum(0)  # (n,)
        return add

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
        out[layer] = NormStats(count=s.count, mean=s.mean + shift, m2=s.m2,
                               quantiles=None if s.quantiles is None else tuple(q + shift for q in s.quantiles))
    return out


def calibrate(model, tokenizer, adapter_dir: str | Path, examples, *, noise: float = 0.0, seed: int = 0,
              batch_size: int = 8, progress: bool = True, scoring: str = "choices",
              tokens: str = "all", quantiles: bool = True, centroids: bool = True) -> dict[str, NormStats]:
    """Compute the stats and write them atomically into the adapter dir (seqr_stats.json), and the centroids
    (seqr_centroids.safetensors) unless `centroids=False`; without `quantiles` only mu, sigma and counts leave
    the silo (the percentile score then cannot use this adapter)."""
    means = {} if centroids else None
    stats, count = norm_stats(model, tokenizer, adapter_dir, examples, batch_size=batch_size, progress=progress,
                              scoring=scoring, tokens=tokens, centroids=means)
    if centroids:
        write_centroids(Path(adapter_dir), means)
    else:
        (Path(adapter_dir) / files.CENTROIDS_FILE).unlink(missing_ok=True)  # withheld: none left from a past run
    if not quantiles:
        stats = {layer: NormStats(s.count, s.mean, s.m2) for layer, s in stats.items()}
    stats = add_noise(stats, noise, seed) if noise else stats
    files.atomic_write_json(Path(adapter_dir) / files.STATS_FILE,
                            stats_json(stats, examples=len(examples), tokens=count, noise=noise, seed=seed,
                                       token_set=tokens))
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
    add_dtype_arg(p)
    add_device_arg(p)
    a = p.parse_args(argv)
    device = parse_device(p, a.device)
    if not (Path(a.adapter) / files.PEFT_WEIGHTS).exists():
        p.error(f"{a.adapter} holds no adapter ({files.PEFT_WEIGHTS} missing); run seqr train first")
    from seqr.hf.dtypes import say_choice
    from seqr.hf.models import load_model
    from seqr.silo.tasks import check_task

    examples = check_task(p, a.task, a.data, a.max_examples, a.seed)  # before the model loads
    model, tok = load_model(a.model, dtype=say_choice(a.dtype, "seqr calibrate"), device=device)
    stats = calibrate(model, tok, a.adapter, examples, noise=a.noise, seed=a.seed, batch_size=a.batch_size,
                      scoring=a.scoring, tokens=a.tokens, quantiles=not a.no_quantiles,
                      centroids=not a.withhold_centroids)
    means = [s.mean for s in stats.values()]
    print(json.dumps({"adapter": a.adapter, "layers": len(stats), "examples": len(examples),
                      "mean_mu": sum(means) / len(means), "min_mu": min(means), "max_mu": max(means)}, indent=1))
    return 0
