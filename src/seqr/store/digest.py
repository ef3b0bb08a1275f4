"""Short content digests of what routes a token: an adapter's weights (a changed adapter is a new one to anything
that caches it, e.g. vLLM's LoRA ids) and a set of adapters' calibration (what a reply's routing manifest names)."""
from __future__ import annotations

import hashlib

from seqr.store.library import LoraLibrary


def weights_digest(library: LoraLibrary, name: str) -> str:
    """16 hex digits of adapter `name`'s A and B over every layer (float32 bytes)."""
    h = hashlib.sha256()
    A, B = library.adapter_weights(name)
    for layer in library.layers:
        h.update(layer.encode())
        h.update(A[layer].detach().float().contiguous().numpy().tobytes())
        h.update(B[layer].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def calibration_digest(library: LoraLibrary, names) -> str:
    """16 hex digits of the calibration (count, mean, std per layer) of adapters `names`, in name order: equal for
    equal stats, whatever else changed; 'uncalibrated' adapters hash as such."""
    h = hashlib.sha256()
    for name in sorted(names):
        stats = library.stats(name)
        h.update(name.encode())
        for layer in library.layers:
            s = None if stats is None else stats.get(layer)
            h.update(f"{layer}:{None if s is None else (s.count, repr(s.mean), repr(s.std))}".encode())
    return h.hexdigest()[:16]
