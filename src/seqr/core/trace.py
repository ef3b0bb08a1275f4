"""Routing traces: what every adapted layer decided for every real token, and what each router would have.

One pass with `seqr.routing(model, trace=True)` records, per (token, layer) decision, the adapter used,
its score margin over the runner-up, and two score vectors over the allowed adapters: the calibrated
norm scores (z-scored ||B_i A x||, exact: SEQR's when A is shared, SPECTR's otherwise) and ARROW's
|v_i . x|. The choice of every router whose registry trace rule is norm, arrow or lag follows from these two,
so one pass measures the routing accuracy of all of them against the norm-maximising adapter; a router with
its own scores (rule "own") has them recorded too when it is the one routing.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from seqr.core import registry


@dataclass
class Trace:
    """Decisions of one `routing(..., trace=True)` block, layer by layer, in call order."""

    names: list[str]
    method: str | tuple
    k: int | None = None
    light: bool = False  # recorded only rows and chosen adapters (routing(..., trace="choices"))
    router: str | None = None  # the registered method that routed (None: fixed adapters)
    allowed: torch.Tensor | None = None  # (R, N) bool: row r's allowed adapters (R = 1: every row's); None: all
    notes: dict = field(default_factory=dict)  # an engine's own counters (vLLM: forwards per mask source)
    _parts: dict = field(default_factory=dict, repr=False)  # layer -> key -> [tensor]: plain dicts, picklable
    _step: int = 0

    def record(self, layer: str, **tensors: torch.Tensor) -> None:
        """Append one layer call's records: rows, chosen, margin (t,), norm, arrow and maybe own (t, N)."""
        parts = self._parts.setdefault(layer, {})
        for key, t in tensors.items():
            parts.setdefault(key, []).append(t.detach().cpu())
        parts.setdefault("step", []).append(torch.full_like(tensors["rows"].cpu(), self._step))

    def next_step(self) -> None:
        """Called once per model forward (prefill, then each generated token)."""
        self._step += 1

    def to_state(self) -> dict:
        """The trace as plain data (lists, numbers, strings): what crosses vLLM's RPC, whose msgpack sends a
        dataclass as a map of its fields; `from_state` rebuilds it."""
        def plain(t: torch.Tensor) -> dict:
            return {"data": t.flatten().tolist(), "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        return {"names": self.names, "method": self.method if isinstance(self.method, str) else list(self.method),
                "k": self.k, "light": self.light, "router": self.router, "notes": self.notes, "step": self._step,
                "allowed": None if self.allowed is None else plain(self.allowed),
                "parts": {layer: {key: plain(torch.cat(v)) for key, v in parts.items()}
                          for layer, parts in self._parts.items()}}

    @classmethod
    def from_state(cls, d: dict) -> "Trace":
        def tensor(p: dict) -> torch.Tensor:
            return torch.tensor(p["data"], dtype=getattr(torch, p["dtype"])).reshape(p["shape"])
        tr = cls(list(d["names"]), d["method"] if isinstance(d["method"], str) else tuple(d["method"]), d["k"],
                 light=d["light"], router=d["router"], notes=dict(d["notes"]),
                 allowed=None if d["allowed"] is None else tensor(d["allowed"]))
        tr._step = d["step"]
        tr._parts = {layer: {key: [tensor(p)] for key, p in parts.items()} for layer, parts in d["parts"].items()}
        return tr

    # ------------------------------------------------------------------------------------------ access
    @property
    def layers(self) -> list[str]:
        return list(self._parts)

    def layer(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._parts:
            raise KeyError(f"no decisions recorded for layer {name!r}; traced layers: {self.layers[:4]}...")
        return {k: torch.cat(v) for k, v in self._parts[name].items()}

    def decisions(self) -> dict[str, torch.Tensor]:
        """Every (token, layer) decision, all layers concatenated, with a `layer` index column."""
        per = [self.layer(name) for name in self.layers]
        if not per:
            raise ValueError("the trace is empty: no routed layer ran inside the routing block")
        out = {k: torch.cat([p[k] for p in per]) for k in per[0]}
        out["layer"] = torch.cat([torch.full_like(p["rows"], i) for i, p in enumerate(per)])
        return out

    def __len__(self) -> int:
        return sum(sum(t.numel() for t in parts["rows"]) for parts in self._parts.values())

    # ------------------------------------------------------------------------------------------ analysis
    def choices(self, method: str | None = None, k: int | None = None) -> torch.Tensor:
        """The adapter each router picks for every decision: None gives what was actually used; a registered
        router by its trace rule (seqr/spectr/naive the calibrated norm-maximiser; arrow; lag with its k)."""
        d = self.decisions()
        if method is None:
            return d["chosen"]
        if self.light:
            raise ValueError("this trace recorded only the adapters used (trace='choices'); other routers' choices "
                             "need routing(..., trace=True)")
        router = registry.get(method)
        if router.trace == "own" and method != self.router:
            raise ValueError(f"router {method!r} keeps its own scores; its choices are traced only when it routes "
                             f"(this trace routed with {self.router!r})")
        used = router.used_scores(d, k)  # (D, N) by the router's trace rule
        return d["chosen"] if used is None else used.argmax(-1)

    def routing_accuracy(self, method: str | None = None, k: int | None = None) -> float:
        """Share of decisions on which `method` picks the calibrated norm-maximising adapter."""
        return (self.choices(method, k) == self.choices("seqr")).double().mean().item()

    def counts(self, row: int | None = None) -> dict[str, int]:
        """How many (token, layer) decisions actually went to each adapter (optionally one batch row's)."""
        if not self._parts:  # nothing routed while tracing
            return {}
        d = self.decisions()
        chosen = d["chosen"] if row is None else d["chosen"][d["rows"] == row]
        chosen = chosen[chosen >= 0]
        hist = torch.bincount(chosen, minlength=len(self.names)).tolist()
        return {name: c for name, c in zip(self.names, hist) if c}

    def outside(self, allowed_rows: list[set[str]] | None = None) -> list[int]:
        """Per batch row, the number of decisions routed to an adapter outside that row's set (default: the sets
        the trace recorded, `allowed`)."""
        if not self._parts:  # nothing routed while tracing
            return [0] * len(allowed_rows if allowed_rows is not None else self.sets())
        d = self.decisions()
        if allowed_rows is None:  # the recorded sets: one per row, or one for every row
            sets = self.sets()
            allowed_rows = sets if len(sets) > 1 else sets * (int(d["rows"].max()) + 1 if d["rows"].numel() else 1)
        out = []
        for row, allowed in enumerate(allowed_rows):
            chosen = d["chosen"][(d["rows"] == row) & (d["chosen"] >= 0)]
            ok = torch.tensor([n in allowed for n in self.names], dtype=torch.bool)
            out.append(int((~ok[chosen]).sum()))
        return out

    def sets(self) -> list[set[str]]:
        """Each row's allowed adapters as recorded (one set per row of `allowed`; [all] without it)."""
        if self.allowed is None:
            return [set(self.names)]
        return [{n for n, ok in zip(self.names, row.tolist()) if ok} for row in self.allowed]

    def by_set(self) -> list[list]:
        """[[allowed adapters, sorted], adapter used, decisions] for every pair seen: the decisions grouped by the
        set their token was routed among (both engines report this; a row's set from `allowed`)."""
        if not self._parts:  # nothing routed while tracing
            return []
        d = self.decisions()
        used = d["chosen"] >= 0
        rows = d["rows"][used] if self.allowed is not None and self.allowed.shape[0] > 1 else torch.zeros_like(
            d["rows"][used])  # (D,) the row whose set applies
        N, sets = len(self.names), self.sets()
        pairs = torch.bincount(rows * N + d["chosen"][used], minlength=len(sets) * N).view(len(sets), N)  # (R, N)
        out: Counter = Counter()
        for r, i in pairs.nonzero().tolist():
            out[(tuple(sorted(sets[r])), self.names[i])] += int(pairs[r, i])
        return [[list(s), n, c] for (s, n), c in sorted(out.items())]

    def summary(self) -> dict:
        """Decision count, adapter shares, mean margin, and every router's accuracy against the norm-max."""
        if self.light:
            raise ValueError("summary() needs routing(..., trace=True); this trace recorded only the adapters used")
        d = self.decisions()
        N, n_dec = len(self.names), d["rows"].numel()
        counts = self.counts()
        acc = {m: self.routing_accuracy(m) for m in ("seqr", "arrow")}
        if self.router is not None and registry.get(self.router).trace == "own":
            acc[self.router] = self.routing_accuracy(self.router, self.k)
        acc.update({f"lag@{k}": self.routing_accuracy("lag", k) for k in range(1, N + 1)})
        if (d["chosen"] >= 0).any():
            acc["used"] = self.routing_accuracy(None)
        margin = d["margin"][torch.isfinite(d["margin"])]
        return {"method": self.method if isinstance(self.method, str) else list(self.method), "decisions": n_dec,
                "layers": len(self.layers), "share": {n: c / n_dec for n, c in counts.items()},
                "mean_margin": margin.mean().item() if margin.numel() else None, "routing_accuracy": acc}
