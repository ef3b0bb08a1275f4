"""transformers' moving argument names in one place: the KV cache is `cache` in transformers >= 5.2x and
`past_key_values` before; `logits_to_keep` skips the LM head where the forward takes it."""
from __future__ import annotations

import inspect


def forward_params(model) -> set[str]:
    """Names the model's forward takes (a peft wrapper's base model's: the wrapper passes kwargs on)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def cache_kw(params: set[str]) -> str:
    """The name under which this forward takes a KV cache."""
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(output):
    """The KV cache a forward returned (named like the argument: `cache` or `past_key_values`)."""
    return output["cache"] if "cache" in output else output.get("past_key_values")


def passed_cache(kwargs: dict):
    """The KV cache a forward was called with (a forward pre-hook's kwargs), if any."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def keep_last(params: set[str]) -> dict:
    """`logits_to_keep=1` when the forward takes it (skips the LM head on every prompt position)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def cache_arg(model, cache) -> dict:
    """The keyword argument that hands `cache` to this model's forward (`model(ids, **cache_arg(model, c))`)."""
    return {cache_kw(forward_params(model)): cache}
