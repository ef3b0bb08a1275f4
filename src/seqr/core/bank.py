"""`AdapterBank`: the validated tensors of one adapted layer and the routers over them."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from seqr.core import registry
from seqr.core import routers as rt
from seqr.core.inputs import check_finite, check_inputs, first_nonfinite, shape_of
from seqr.core.rows import Rows


class AdapterBank:
    """N rank-r LoRA updates of one linear layer (m x n), prepared for routing.

    A: (r, n) shared by all adapters (SEQR), or (N, r, n) one per adapter (baselines only).
    B: (N, m, r) with the LoRA scaling already folded in.
    mu, sigma: (N,) activation-norm statistics of each adapter on its own data (optional).
    quantiles: (N, Q) each adapter's norms at stats.QUANTILE_LEVELS (optional, with mu and sigma): the norm
    routers then score by the adapter's own percentile (as a normal quantile) instead of the z-score.
    centroids: (N, n) each adapter's mean input on its own data (optional; the centroid routers), kept as unit rows.

    Stored: A, B, and for a shared A the packed Grams G_i = R_i^T R_i (r(r+1)/2 numbers per adapter), i.e.
    n*r + N*(m*r + r(r+1)/2) numbers. SVD factors for the baselines are computed on first use.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, *, mu=None, sigma=None, quantiles=None, centroids=None,
                 names: Sequence[str] | None = None):
        self.names: list[str] = check_inputs(A, B, names)  # B (N, m, r), A (r, n) or (N, r, n): finite, named
        N, m, r = B.shape
        names = self.names
        self.index = {n: i for i, n in enumerate(names)}
        # B (N, m, r) is kept as a view of a contiguous (N, r, m): the update gathers each token's B^T whole.
        # B, a unique A and the centroids are the first N rows of stores with spare rows (`append`, `remove`)
        self._Bt = Rows(B.transpose(1, 2).contiguous())  # (N, r, m)
        self.A, self.B = A, self._Bt.view.transpose(1, 2)
        self.shared_a = A.dim() == 2
        self._A = None if self.shared_a else Rows(A)  # (N, r, n)
        self.mu, self.sigma = self._check_stats(mu, sigma, N, B)
        self._cdf = self._check_quantiles(quantiles, N, B)  # None, or (knots (N, Q) in z units, target (Q,))
        c = self._check_centroids(centroids, N, A.shape[-1], B)  # (N, n) unit rows, or None
        self._C = None if c is None else Rows(c)
        self.centroids = c
        self._casts: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._svd_rows: tuple[Rows, Rows, Rows] | None = None  # S (N, r), Vt (N, r, n), prototypes (N, n): lazy
        if self.shared_a:
            _, R = rt.qr_positive(B.to(rt.compute_dtype(B.dtype)))  # (N, r, r)
            self._G_scored, self._offset = rt.fold_zscore(rt.pack_gram(R), self.mu, self.sigma)  # (N, r(r+1)/2)
            self._R_stacked = rt.stack_r(R, self.sigma)  # (r, N*r): the few-token form of the same scores
            if self.mu is not None:
                self._check_overflow(self._G_scored, "G / sigma^2", self.mu, self.sigma)

    def _check_stats(self, mu, sigma, N, B):
        if (mu is None) != (sigma is None):
            raise ValueError("mu and sigma must be given together")
        if mu is None:
            return None, None
        cdt = rt.compute_dtype(B.dtype)
        mu = torch.as_tensor(mu, dtype=cdt, device=B.device)
        sigma = torch.as_tensor(sigma, dtype=cdt, device=B.device)
        for t, what in ((mu, "mu"), (sigma, "sigma")):
            if t.shape != (N,):
                raise ValueError(f"{what} must have shape ({N},), got {tuple(t.shape)}")
            check_finite(t[:, None], what, self.names)
        if (sigma <= 0).any():
            i = int((sigma <= 0).nonzero()[0])
            raise ValueError(f"sigma of adapter {self.names[i]!r} must be positive, got {float(sigma[i])}")
        for t, what in ((mu / sigma, "mu / sigma"), (1 / (sigma * sigma), "1 / sigma^2")):
            self._check_overflow(t[:, None], what, mu, sigma)
        return mu, sigma

    def _check_overflow(self, t: torch.Tensor, what: str, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        """Statistics are checked jointly: each finite on its own, they must also z-score without overflow."""
        i = first_nonfinite(t)
        if i is not None:
            raise ValueError(f"stats of adapter {self.names[i]!r} overflow {t.dtype} when z-scoring: {what} is not "
                             f"finite (mu={float(mu[i]):.6g}, sigma={float(sigma[i]):.6g})")

    def _check_centroids(self, centroids, N: int, n: int, B: torch.Tensor) -> torch.Tensor | None:
        if centroids is None:
            return None
        c = torch.as_tensor(centroids, dtype=rt.compute_dtype(B.dtype), device=B.device)
        if c.shape != (N, n):
            raise ValueError(f"centroids must have shape ({N}, {n}), got {tuple(c.shape)}")
        check_finite(c, "centroid", self.names)
        zero = (c == 0).all(dim=1)  # (N,)
        if zero.any():
            raise ValueError(f"centroid of adapter {self.names[int(zero.nonzero()[0])]!r} is the zero vector")
        return rt.unit_rows(c)  # (N, n)

    def _check_quantiles(self, quantiles, N, B):
        if quantiles is None:
            return None
        if self.mu is None:
            raise ValueError("quantiles need mu and sigma too (they are read in z-score units)")
        from seqr.core.stats import QUANTILE_LEVELS

        q = torch.as_tensor(quantiles, dtype=self.mu.dtype, device=B.device)
        if q.shape != (N, len(QUANTILE_LEVELS)):
            raise ValueError(f"quantiles must have shape ({N}, {len(QUANTILE_LEVELS)}), got {tuple(q.shape)}")
        check_finite(q, "quantiles", self.names)
        bad = (q[:, 1:] < q[:, :-1]).any(dim=1)  # (N,)
        if bad.any():
            raise ValueError(f"quantiles of adapter {self.names[int(bad.nonzero()[0])]!r} are not non-decreasing")
        knots = (q - self.mu[:, None]) / self.sigma[:, None]  # (N, Q) in the z-score's units
        knots = knots + 1e-9 * torch.arange(q.shape[1], dtype=q.dtype, device=q.device)  # strictly increasing
        target = rt.probit(torch.tensor(QUANTILE_LEVELS, dtype=q.dtype, device=q.device))  # (Q,)
        return knots, target

    # ----------------------------------------------------------------------------------------------
    @property
    def num_adapters(self) -> int:
        return self.B.shape[0]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, m, n, r)."""
        N, m, r = self.B.shape
        return N, m, self.A.shape[-1], r

    @property
    def G_packed(self) -> torch.Tensor:
        """The packed Grams G_i = R_i^T R_i, (N, r(r+1)/2), shared A only: derived from the z-scored ones held."""
        return self._G_scored if self.sigma is None else self._G_scored * (self.sigma * self.sigma)[:, None]

    @property
    def numel(self) -> int:
        """Numbers held for routing and updates: A, B and the packed Grams (held with the z-score folded in; not
        counting the stats, the R blocks derived with them, or the lazily built baseline factors)."""
        return self.A.numel() + self.B.numel() + (self._G_scored.numel() if self.shared_a else 0)

    def prepare(self, *methods: str) -> "AdapterBank":
        """Build the lazy factors that the given methods need now (e.g. before timing, or before serving)."""
        for method in methods:
            if "svd" in self._router(method).needs:
                self.svd
        return self

    @property
    def svd(self) -> tuple[torch.Tensor, torch.Tensor]:
        """SVD factors of every update B_i A_i, found through the rank-r factors: S (N, r), Vt (N, r, n); built
        on first use, then kept in step with `append` and `remove`."""
        if self._svd_rows is None:
            cdt = rt.compute_dtype(self.B.dtype)
            S, Vt = rt.svd_factors(self.B.to(cdt), self.A.to(cdt))  # (N, r), (N, r, n)
            self._svd_rows = (Rows(S), Rows(Vt), Rows(Vt[:, 0, :].contiguous()))  # prototypes (N, n)
        return self._svd_rows[0].view, self._svd_rows[1].view

    @property
    def prototypes(self) -> torch.Tensor:
        """ARROW's prototypes: each update's top right singular vector, (N, n) unit rows."""
        self.svd
        return self._svd_rows[2].view

    # ----------------------------------------------------------------------------------------------
    def _flat(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        n = self.A.shape[-1]
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != n:
            raise ValueError(f"x must have shape (..., {n}), got {shape_of(x)}")
        return x.reshape(-1, n), tuple(x.shape[:-1])

    def z(self, x: torch.Tensor) -> torch.Tensor:
        """The shared projection z = A x, computed once per token: (..., n) -> (..., r)."""
        if not self.shared_a:
            raise ValueError("z = A x needs a shared A; this bank has one A per adapter")
        return x @ self._cast(x.dtype)[2]  # (..., r)

    def scores(self, x: torch.Tensor, method: str = "seqr", *, z: torch.Tensor | None = None) -> torch.Tensor:
        """(…, N) routing scores. Norm methods are z-scored with mu/sigma when set; arrow gives |v_i.x|."""
        xf, lead = self._flat(x)
        if self._router(method).kind != "score":
            raise ValueError(f"method {method!r} routes by its own rule and has no score vector; scores are "
                             f"given by {registry.names('score')}")
        out = torch.empty(xf.shape[0], self.num_adapters, dtype=rt.compute_dtype(self.B.dtype), device=xf.device)
        for c, s in self._score_chunks(xf, method, z):
            out[c] = s  # (t, N)
        return out.view(*lead, self.num_adapters)

    def _score_chunks(self, xf: torch.Tensor, method: str, z: torch.Tensor | None):
        """Yield (token slice, fresh (t, N) score tensor) over memory-bounded token chunks."""
        zf = self._z_cdt(z)  # (T, r) or None
        for c in rt.token_chunks(xf.shape[0], self._width(method)):
            zc = None if zf is None else zf[c]  # (t, r)
            yield c, self._scores_flat(_as(xf[c], rt.compute_dtype(self.B.dtype)), method, zc)

    def _width(self, method: str) -> int:
        """Temporary elements per token of one method's scores (for token_chunks)."""
        N, m, n, r = self.shape
        return registry.get(method).width(N, m, n, r)

    def _z_cdt(self, z: torch.Tensor | None) -> torch.Tensor | None:
        return None if z is None else _as(z.reshape(-1, z.shape[-1]), rt.compute_dtype(self.B.dtype))  # (T, r)

    def _scores_flat(self, x: torch.Tensor, method: str, z: torch.Tensor | None) -> torch.Tensor:
        router = registry.get(method)
        s = self._router_scores(x, method, z)  # (T, N)
        if self._cdf is None or not router.percentile:
            return s
        return rt.percentile_scores(s, *(t.to(s.dtype) for t in self._cdf))  # (T, N)

    def _router_scores(self, x: torch.Tensor, method: str, z: torch.Tensor | None) -> torch.Tensor:
        """The registered router's own scores of tokens x (T, n): the one place a score function is called."""
        return registry.get(method).score(self, x, z)  # (T, N)

    def seqr_scores(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """SEQR's calibrated scores (T, N) from z = A x (computed from x when not given)."""
        z = self.z(x) if z is None else z  # (T, r)
        if rt.compiling() or z.shape[0] <= rt.GATHER_TOKENS:
            return rt.seqr_scores_few(z, self._R_stacked, self._offset)  # (T, N)
        return rt.seqr_scores(z, self._G_scored, self._offset)  # (T, N)

    def seqr_factors(self):
        """SEQR's few-token score factors (see `seqr_scores_few`): R_stacked (r, N*r), offsets mu/sigma (N,) or
        None, and the percentile map (knots (N, Q), target (Q,)) or None. Needs a shared A."""
        if not self.shared_a:
            raise ValueError("SEQR's factors need a shared A; this bank has one A per adapter")
        return self._R_stacked, self._offset, self._cdf

    def route(self, x: torch.Tensor, method: str = "seqr", *, k: int | None = None, allowed=None,
              z: torch.Tensor | None = None) -> torch.Tensor:
        """Chosen adapter index per token, (…,) LongTensor. `allowed`: names, indices or a bool mask
        of shape (N,) or (…, N); an adapter outside it is never chosen. Shortlist routers (`lag`) take k."""
        xf, lead = self._flat(x)
        router = self._router(method)
        mask = self.allowed_mask(allowed, xf.shape[0], lead)  # None, (1, N) or (T, N)
        if not router.takes_k and k is not None:
            raise ValueError(f"k is only used by the shortlist methods {[r.name for r in registry.routers() if r.takes_k]}"
                             f", got k={k} with method {method!r}")
        if router.takes_k:
            N = self.num_adapters
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
                raise ValueError(f"{method} needs an integer k in [1, {N}], got k={k!r}")
            if self._cdf is not None:
                raise ValueError(f"{method} ranks its candidates by z-score; it does not take the percentile score")
        return self.choose(xf, method, mask, k=k, z=z).view(lead)

    def choose(self, xf: torch.Tensor, method: str, mask: torch.Tensor | None, *, k: int | None = None,
               z: torch.Tensor | None = None) -> torch.Tensor:
        """`route` on already validated input: flat tokens xf (T, n), a routing method, a bool mask (1, N) or (T, N)
        or None, z = A x (T, r) or None. The routed layers' hot path. Returns (T,)."""
        router = registry.get(method)
        if router.kind == "shortlist":
            return self._shortlist(xf, router, mask, k, z)
        if rt.compiling() or xf.shape[0] * self._width(method) <= rt.BLOCK_ELEMENTS:  # one chunk: no slicing
            xc = _as(xf, rt.compute_dtype(self.B.dtype))  # (T, n) in the scores' dtype
            return rt.masked_argmax_(self._scores_flat(xc, method, self._z_cdt(z)), mask)
        idx = torch.empty(xf.shape[0], dtype=torch.long, device=xf.device)  # (T,)
        for c, s in self._score_chunks(xf, method, z):
            idx[c] = rt.masked_argmax_(s, None if mask is None else mask if mask.shape[0] == 1 else mask[c])
        return idx

    def _shortlist(self, xf: torch.Tensor, router, mask, k: int, z) -> torch.Tensor:
        N, m, n, r = self.shape
        xf, zf = _as(xf, rt.compute_dtype(self.B.dtype)), self._z_cdt(z)  # (T, n), (T, r) or None
        idx = torch.empty(xf.shape[0], dtype=torch.long, device=xf.device)  # (T,)
        for c in rt.token_chunks(xf.shape[0], router.width(N, m, n, r, k), rt.GATHER_ELEMENTS):
            mc = None if mask is None else (mask if mask.shape[0] == 1 else mask[c])
            idx[c] = router.route(self, xf[c], mc, k, None if zf is None else zf[c])  # (t,)
        return idx

    def allowed_mask(self, allowed, T: int, lead: tuple[int, ...] = ()) -> torch.Tensor | None:
        """Normalise `allowed` to a bool mask of shape (1, N) or (T, N); None means every adapter."""
        if allowed is None:
            return None
        N = self.num_adapters
        if isinstance(allowed, torch.Tensor) and allowed.dtype == torch.bool:
            if allowed.shape[-1] != N or allowed.shape[:-1] not in ((), (1,), lead, (T,)):
                raise ValueError(f"allowed mask must have shape ({N},) or {(*lead, N)}, got {tuple(allowed.shape)}")
            mask = allowed.reshape(-1, N).to(self.B.device)
        else:
            mask = torch.zeros(1, N, dtype=torch.bool, device=self.B.device)
            mask[0, self.indices(allowed)] = True
        empty = ~mask.any(dim=-1)
        if empty.any():
            raise ValueError(f"allowed set is empty for token {int(empty.nonzero()[0])}: no adapter can be chosen")
        return mask

    def indices(self, items: Iterable) -> list[int]:
        """Adapter names or indices -> indices, with an error naming every unknown item."""
        if isinstance(items, torch.Tensor) or hasattr(items, "ndim"):
            items = torch.as_tensor(items).reshape(-1)
        elif isinstance(items, (str, int)):
            items = [items]
        out, unknown = [], []
        for it in (items.tolist() if isinstance(items, torch.Tensor) else items):
            if isinstance(it, str):
                (out.append(self.index[it]) if it in self.index else unknown.append(it))
            elif isinstance(it, int) and not isinstance(it, bool) and 0 <= it < self.num_adapters:
                out.append(it)
            else:
                unknown.append(it)
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}; known: {self.names}")
        return out

    # ----------------------------------------------------------------------------------------------
    def delta(self, x: torch.Tensor, index, *, z: torch.Tensor | None = None) -> torch.Tensor:
        """The chosen adapter's update B_i A x per token: (…, n) -> (…, m). `index`: an int, a name, or
        a LongTensor of the leading shape. Only the adapters actually chosen are touched."""
        xf, lead = self._flat(x)
        T = xf.shape[0]
        if isinstance(index, (int, str)) or (hasattr(index, "ndim") and index.ndim == 0):
            index = index if isinstance(index, str) else int(index)
            idx = torch.full((T,), self.indices(index)[0], dtype=torch.long, device=xf.device)
        else:
            idx = torch.as_tensor(index, device=xf.device).reshape(-1)
            if idx.shape[0] != T:
                raise ValueError(f"index must have shape {lead}, got {tuple(torch.as_tensor(index).shape)}")
            if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_adapters):
                raise ValueError(f"index out of range [0, {self.num_adapters}): {idx.min()}..{idx.max()}")
        return self.apply(xf, idx, z=z).view(*lead, -1)  # (…, m)

    def apply(self, xf: torch.Tensor, idx: torch.Tensor, *, z: torch.Tensor | None = None) -> torch.Tensor:
        """`delta` on already validated input: flat tokens xf (T, n), indices idx (T,) in range, z = A x or None.
        The routed layers' hot path. Returns (T, m)."""
        A, Bt, At = self._cast(xf.dtype)  # (r, n) or (N, n, r); (N, r, m); (n, r) or None
        if self.shared_a:
            zf = xf @ At if z is None else _as(z.reshape(xf.shape[0], -1), xf.dtype)  # (T, r)
        else:
            zf = rt.grouped_matmul(xf, idx, A)  # (T, r): each token's own A_i x
        return rt.grouped_matmul(zf, idx, Bt)  # (T, m)

    def mean_delta(self, x: torch.Tensor, allowed=None) -> torch.Tensor:
        """MU baseline: the mean of the N updates, (1/|S|) sum_{i in S} B_i A_i x, over the allowed set S of
        each token (all adapters by default), without forming any m x n matrix."""
        xf, lead = self._flat(x)
        N, m, n, r = self.shape
        mask = self.allowed_mask(allowed, xf.shape[0], lead)
        mask = torch.ones(1, N, dtype=torch.bool, device=xf.device) if mask is None else mask
        pats, inv = torch.unique(mask, dim=0, return_inverse=True)  # (P, N) distinct allowed sets, (T or 1,)
        w = pats.to(xf.dtype) / pats.sum(dim=1, keepdim=True)  # (P, N) averaging weights
        inv = inv.expand(xf.shape[0]) if inv.shape[0] == 1 else inv  # (T,)
        A, Bt, _ = self._cast(xf.dtype)
        if self.shared_a:
            mean_Bt = (w @ Bt.reshape(N, r * m).to(w.dtype)).view(-1, r, m)  # (P, r, m)
            return rt.grouped_matmul(xf @ A.T, inv, mean_Bt).view(*lead, m)
        A = A.to(xf.dtype)  # (N, n, r)
        zs = (xf @ A.permute(0, 2, 1).reshape(N * r, n).T).view(-1, N, r) * w[inv][:, :, None]  # (T, N, r)
        return (zs.reshape(-1, N * r) @ Bt.reshape(N * r, m).to(zs.dtype)).view(*lead, m)  # (…, m)

    def _cast(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A, B^T and the shared A^T in the activations' dtype (cached): A (r, n) or (N, n, r), Bt (N, r, m),
        At (n, r) contiguous (z = x @ At without a transpose per call) or None. A shared A is held once, as At:
        the A returned is its transposed view."""
        if dtype not in self._casts:
            # half-precision B (and unique A) under float32 activations stay as held: the update casts only the
            # rows it gathers
            keep = self.B.element_size() < 4 and dtype == torch.float32
            Bt = (self.B if keep else self.B.to(dtype)).transpose(1, 2)  # (N, r, m)
            if self.shared_a:
                At = self.A.to(dtype).T.contiguous()  # (n, r): the one copy in dtype
                self._casts[dtype] = (At.T, Bt, At)
            else:
                self._casts[dtype] = ((self.A if keep else self.A.to(dtype)).transpose(1, 2), Bt, None)  # (N, n, r)
        return self._casts[dtype]

    # ---------------------------------------------------------------------------------------------- changes
    def append(self, name: str, B: torch.Tensor, *, A: torch.Tensor | None = None, mu=None, sigma=None,
               quantiles=None, centroid: torch.Tensor | None = None) -> bool:
        """Add one adapter in place: B (m, r), A (r, n) for a bank with one A per adapter, its stats and centroid
        (n,) when the bank has them. Its rows are written into spare capacity (O(m r), amortised) and only the
        small per-adapter state (stats, Grams, R blocks: O(N r^2)) is rebuilt; checked like the constructor.
        True when a store was reallocated (views of the old rows are stale)."""
        return self.append_row(name, self._single(name, B, A, mu, sigma, quantiles, centroid), 0)

    @property
    def row_kind(self) -> tuple:
        """What one adapter's row of this bank is made of: banks of equal `row_kind` can take the rows of one bank
        built for all of them at once (`append_row`; a shared A's SVD rows need this bank's own A)."""
        N, m, n, r = self.shape
        own_a = self.shared_a and self._svd_rows is not None
        return (self.B.device, self.B.dtype, m, n, r, self.shared_a, self.mu is not None, self._cdf is not None,
                self.centroids is not None, id(self) if own_a else None)

    def append_row(self, name: str, src: "AdapterBank", i: int) -> bool:
        """Add adapter `name` as row `i` of `src`, a bank of the same `row_kind` whose constructor built and checked
        the row (its Gram, R block, z-score terms, unit centroid): O(m r) here, amortised. True when a store was
        reallocated (views of the old rows are stale)."""
        if name in self.index:
            raise ValueError(f"adapter {name!r} is already in this bank")
        if src.row_kind[:-1] != self.row_kind[:-1] or (self.row_kind[-1] is not None and src.A is not self.A):
            raise ValueError(f"adapter {name!r}: its rows were built for another kind of bank ({src!r}, not {self!r})")
        grew = self._Bt.append(src._Bt.view[i])  # (r, m)
        self.B = self._Bt.view.transpose(1, 2)  # (N+1, m, r)
        if self._A is not None:
            grew |= self._A.append(src.A[i])  # (r, n)
            self.A = self._A.view
        if self._C is not None:
            self._C.append(src.centroids[i])  # (n,)
            self.centroids = self._C.view
        if self._svd_rows is not None:
            for rows, t in zip(self._svd_rows, (*src.svd, src.prototypes)):
                rows.append(t[i])
        cat = lambda a, b: None if a is None else torch.cat([a, b[i:i + 1]])  # noqa: E731 (N+1, ...)
        self.mu, self.sigma = cat(self.mu, src.mu), cat(self.sigma, src.sigma)  # (N+1,)
        self._cdf = None if self._cdf is None else (cat(self._cdf[0], src._cdf[0]), self._cdf[1])
        if self.shared_a:
            self._G_scored, self._offset = cat(self._G_scored, src._G_scored), cat(self._offset, src._offset)
            r = self.shape[3]
            self._R_stacked = torch.cat([self._R_stacked, src._R_stacked[:, i * r:(i + 1) * r]], dim=1)  # (r, (N+1)r)
        self.names.append(name)
        self.index[name] = len(self.names) - 1
        self._casts.clear()
        return grew

    def _single(self, name, B, A, mu, sigma, quantiles, centroid) -> "AdapterBank":
        """The one-adapter bank of an adapter to append: validated, with its Gram, R block and unit centroid."""
        if name in self.index:
            raise ValueError(f"adapter {name!r} is already in this bank")
        N, m, n, r = self.shape
        if not isinstance(B, torch.Tensor) or tuple(B.shape) != (m, r):
            raise ValueError(f"B of adapter {name!r} must have shape ({m}, {r}), got {shape_of(B)}")
        have = {"mu and sigma": self.mu is not None, "quantiles": self._cdf is not None,
                "a centroid": self.centroids is not None, "its own A": not self.shared_a}
        given = {"mu and sigma": mu is not None and sigma is not None, "quantiles": quantiles is not None,
                 "a centroid": centroid is not None, "its own A": A is not None}
        for what in have:
            if have[what] != given[what]:
                raise ValueError(f"adapter {name!r}: this bank's adapters {'have' if have[what] else 'have no'} "
                                 f"{what}, so the one added must {'have' if have[what] else 'not have'} them too")
        one = lambda v: None if v is None else torch.as_tensor(v, dtype=torch.float64)[None]  # noqa: E731 (1, ...)
        return AdapterBank(self.A if self.shared_a else A[None], B[None], mu=one(mu), sigma=one(sigma),
                           quantiles=one(quantiles), centroids=None if centroid is None else centroid[None],
                           names=[name])

    def remove(self, name: str) -> int:
        """Remove one adapter in place: the last adapter's rows move into its slot (O(m r)) and the small
        per-adapter state is rebuilt (O(N r^2)). Returns the index the moved adapter had (the removed one's
        own index when it was last); indices of every other adapter are unchanged."""
        if name not in self.index:
            raise KeyError(f"unknown adapter {name!r}; the bank holds {self.names}")
        N, i = self.num_adapters, self.index[name]
        if N == 1:
            raise ValueError(f"cannot remove {name!r}: an AdapterBank needs at least one adapter")
        last = self._Bt.swap_remove(i)
        self.B = self._Bt.view.transpose(1, 2)  # (N-1, m, r)
        for rows in (self._A, self._C, *(self._svd_rows or ())):
            if rows is not None:
                rows.swap_remove(i)
        self.A = self.A if self._A is None else self._A.view
        self.centroids = None if self._C is None else self._C.view
        order = torch.arange(last, device=self.B.device)  # (N-1,): every row stays, but the last moves into i
        if i < last:
            order[i] = last
        pick = lambda t: None if t is None else t.index_select(0, order)  # noqa: E731
        self.mu, self.sigma = pick(self.mu), pick(self.sigma)  # (N-1,)
        self._cdf = None if self._cdf is None else (pick(self._cdf[0]), self._cdf[1])
        if self.shared_a:
            self._G_scored, self._offset = pick(self._G_scored), pick(self._offset)  # (N-1, r(r+1)/2), (N-1,)
            r = self.shape[3]
            blocks = self._R_stacked.view(r, N, r).index_select(1, order)  # (r, N-1, r)
            self._R_stacked = blocks.reshape(r, (N - 1) * r).contiguous()  # (r, (N-1)*r)
        del self.index[name]
        if i < last:  # the last adapter's name moves into the slot: O(1), not a new index of N names
            self.names[i] = self.names[last]
            self.index[self.names[i]] = i
        self.names.pop()
        self._casts.clear()
        return last

    # ----------------------------------------------------------------------------------------------
    def _router(self, method: str):
        """The registered routing method `method`, checked against what this bank holds."""
        router = registry.get(method)
        if not router.routes:
            raise ValueError(f"method {method!r} does not route tokens; a bank routes with "
                             f"{registry.names(('score', 'shortlist'))}")
        router.check(shared_a=self.shared_a, centroids=self.centroids is not None, where="this bank")
        return router

    def __repr__(self) -> str:
        N, m, n, r = self.shape
        return (f"AdapterBank(N={N}, m={m}, n={n}, r={r}, shared_a={self.shared_a}, "
                f"calibrated={self.mu is not None}, dtype={self.B.dtype})")


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, without a dispatch when it already is (the routed layers' hot path calls this per layer)."""
    return t if t.dtype == dtype else t.to(dtype)
