"""Standard peft LoRA adapter directories in and out (adapter_config.json + adapter_model.safetensors)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seqr.core.argfmt import PathNotFound
from seqr.store import files
from seqr.core.stats import NormStats

PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@dataclass
class PeftAdapter:
    """One adapter as read from disk: A (r, n) and scaled B (m, r) per layer, plus what seqr knows of it."""

    name: str
    path: Path
    rank: int
    base_model: str | None
    target_modules: list[str]
    fan_in_fan_out: bool
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]  # LoRA scaling already folded in
    stats: dict[str, NormStats] | None = None
    meta: dict = field(default_factory=dict)
    centroids: dict[str, torch.Tensor] | None = None  # layer -> (n,) mean input on the silo's own data


def lora_scaling(config: dict) -> float:
    """peft's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r, alpha = config["r"], config.get("lora_alpha", 8)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _check_config_types(cfg: dict, where: str) -> None:
    """The peft config fields seqr reads, with the types peft writes; errors name the field and the value."""
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{where}: lora_alpha must be a positive number, got {alpha!r}")
    for key in ("use_rslora", "fan_in_fan_out"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise ValueError(f"{where}: {key} must be true or false, got {cfg[key]!r}")
    tm = cfg.get("target_modules")
    if tm is not None and not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
        raise ValueError(f"{where}: target_modules must be a string or a list of strings, got {tm!r}")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"{where}: base_model_name_or_path must be a string, got {base!r}")


def read_peft_adapter(path: str | Path, name: str | None = None) -> PeftAdapter:
    """Read a peft LoRA adapter directory; every unsupported or malformed piece raises naming the dir."""
    path = Path(path)
    name = name or path.name
    where = f"adapter {name!r} ({path})"
    if not path.is_dir():
        raise PathNotFound(f"{where}: not a directory")
    cfg = files.read_json(path / files.PEFT_CONFIG, f"{where}: peft config")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type must be LORA, got {cfg.get('peft_type')!r}")
    for key in ("use_dora", "lora_bias"):
        if cfg.get(key):
            raise ValueError(f"{where}: {key}=True is not supported by seqr routing")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{where}: per-module {key} is not supported (all layers must share one rank)")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{where}: rank r must be a positive integer, got {r!r}")
    _check_config_types(cfg, f"{where}: {files.PEFT_CONFIG}")
    sd = files.read_tensors(path / files.PEFT_WEIGHTS, f"{where}: weights")
    scale = lora_scaling(cfg)
    A, B = {}, {}
    for key, t in sd.items():
        if not key.startswith(PREFIX) or not key.endswith((A_SUFFIX, B_SUFFIX)):
            raise ValueError(f"{where}: unexpected tensor {key!r} (only LoRA A/B weights are supported)")
        layer = key[len(PREFIX):-len(A_SUFFIX)]
        (A if key.endswith(A_SUFFIX) else B)[layer] = t
    problems = sorted(set(A) ^ set(B))
    if problems:
        raise ValueError(f"{where}: layers with only one of lora_A / lora_B: {problems}")
    if not A:
        raise ValueError(f"{where}: no LoRA weights found in {files.PEFT_WEIGHTS}")
    for layer in A:
        a, b = A[layer], B[layer]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"{where}, layer {layer}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                             f"do not match rank {r}")
        for t, w in ((a, "lora_A"), (b, "lora_B")):
            if not torch.isfinite(t).all():
                raise ValueError(f"{where}, layer {layer}: {w} contains NaN or inf")
        A[layer] = a.float()
        B[layer] = b.float() * scale
    tm = cfg.get("target_modules") or []
    stats = None
    if (path / files.STATS_FILE).exists():
        stats = read_stats(path / files.STATS_FILE, where)
    meta = files.read_json(path / files.ADAPTER_META, f"{where}: seqr meta") if (path / files.ADAPTER_META).exists() else {}
    centroids = None
    if (path / files.CENTROIDS_FILE).exists():
        centroids = files.read_tensors(path / files.CENTROIDS_FILE, f"{where}: centroids")
    return PeftAdapter(name=name, path=path, rank=r, base_model=cfg.get("base_model_name_or_path"),
                       target_modules=sorted([tm] if isinstance(tm, str) else tm),
                       fan_in_fan_out=bool(cfg.get("fan_in_fan_out")), A=A, B=B, stats=stats, meta=meta,
                       centroids=centroids)


def read_stats(path: Path, where: str) -> dict[str, NormStats]:
    obj = files.read_json(path, f"{where}: stats")
    layers = obj.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{where}: stats file {path} has no 'layers' object")
    return {layer: stats_record(d, f"{where}: stats file {path}, layer {layer}") for layer, d in layers.items()}


def stats_record(d, where: str) -> NormStats:
    """NormStats.from_dict with `where` (file, adapter, layer) in front of its error."""
    try:
        return NormStats.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def stats_json(stats: dict[str, NormStats], **extra) -> dict:
    return {"layers": {layer: s.to_dict() for layer, s in stats.items()}, **extra}


def write_centroids(path: Path, centroids: dict[str, torch.Tensor]) -> None:
    """An adapter dir's centroids (layer -> (n,) mean input), replaced atomically."""
    files.atomic_write_bytes(path / files.CENTROIDS_FILE,
                             files.tensors_to_bytes({k: v.contiguous() for k, v in centroids.items()}))


def write_peft_adapter(path: str | Path, *, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor], rank: int,
                       target_modules: list[str], base_model: str | None, fan_in_fan_out: bool = False,
                       stats: dict[str, NormStats] | None = None, meta: dict | None = None,
                       centroids: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a standard peft adapter (scaling folded into B, so lora_alpha = r and scaling is 1).

    Each file is replaced atomically; weights are written before the config that points at them.
    """
    from peft import LoraConfig  # heavy import, only when exporting

    path = Path(path)
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules), lora_dropout=0.0,
                     base_model_name_or_path=base_model, fan_in_fan_out=fan_in_fan_out, inference_mode=True)
    cfg_dict = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.to_dict().items()}
    cfg_dict["peft_type"] = "LORA"
    tensors = {}
    for layer in A:
        tensors[PREFIX + layer + A_SUFFIX] = A[layer]
        tensors[PREFIX + layer + B_SUFFIX] = B[layer]
    files.atomic_write_bytes(path / files.PEFT_WEIGHTS, files.tensors_to_bytes(tensors))
    if stats is not None:
        files.atomic_write_json(path / files.STATS_FILE, stats_json(stats))
    if centroids is not None:
        write_centroids(path, centroids)
    if meta:
        files.atomic_write_json(path / files.ADAPTER_META, meta)
    files.atomic_write_json(path / files.PEFT_CONFIG, _jsonable(cfg_dict))
    return path


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in (sorted(obj) if isinstance(obj, set) else obj)]
    if hasattr(obj, "value") and not isinstance(obj, (int, float, str, bool)):  # enums
        return obj.value
    return obj
