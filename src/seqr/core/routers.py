"""Pure routing math: no I/O, no modules, no files.

Notation follows the paper. One adapted linear layer W (m x n) carries N LoRA updates B_i A_i with
B_i (m x r) and A_i (r x n). A token x (n,) is routed to one adapter by a score per adapter:

- SEQR (shared A):   z = A x;  B_i = Q_i R_i;  ||B_i A x|| = ||R_i z||,  ||R_i z||^2 = z^T G_i z, G_i = R_i^T R_i
- SPECTR:            B_i A_i = U_i S_i V_i^T;  score ||S_i V_i^T x||  (= ||B_i A_i x||)
- ARROW:             v_i = top right singular vector of B_i A_i;  score |v_i . x|
- naive:             ||B_i A_i x|| computed directly.

Every function takes flat token batches x (T, n) and returns (T, N) or (T,) tensors.
"""
from __future__ import annotations

import functools

import torch

# Element budget of one temporary block (about 64 MiB of fp32); hot paths chunk tokens to stay under it.
BLOCK_ELEMENTS = 1 << 24
# LAG gathers k*r*n singular-vector entries per token that no other token reuses: memory-bound, so its
# blocks stay cache-sized (4 MiB of fp32), measured 7x faster than 64 MiB blocks at N=1000, n=4096, k=20.
GATHER_ELEMENTS = 1 << 20
# LAG with at most LAG_DENSE_PER_K * k adapters scores every adapter with one (T, n) @ (n, N*r) GEMM instead:
# per token N*r*n reused MACs against k*r*n gathered entries; 3x-45x faster at N=10-100, k=3 (SmolLM2 q, r=32),
# about even at N=300 (timed side by side on a 2-core AVX2 CPU), so the gather pays off only for large libraries.
LAG_DENSE_PER_K = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores are computed in fp32 at least (bf16/fp16 lose the ordering of close norms), fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def in_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in compute_dtype (fp32 under a bf16/fp16 model, like peft's adapters), without a dispatch when it is."""
    cdt = compute_dtype(x.dtype)
    return x if x.dtype == cdt else x.to(cdt)


def compiling() -> bool:
    """Under torch.compile: then every size-dependent choice takes one path for every number of tokens T, as a
    compiler may trace once and reuse the graph for all batch sizes (vLLM compiles once and drops the guards
    that would otherwise recompile on another branch), and nothing reads a value back to the host."""
    return torch.compiler.is_compiling()


def token_chunks(T: int, per_token: int, block: int | None = None):
    """Yield slices of the token axis so that each chunk's temporary holds at most `block` elements
    (default: the module's BLOCK_ELEMENTS, read at call time); one slice of all T when `compiling()`."""
    if compiling():
        yield slice(0, T)
        return
    step = max(1, (BLOCK_ELEMENTS if block is None else block) // max(1, per_token))
    for start in range(0, T, step):
        yield slice(start, min(T, start + step))


# ---------------------------------------------------------------------------------------------------
# Offline preprocessing
# ---------------------------------------------------------------------------------------------------

def qr_positive(B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR of every B_i in one batched call, with R_i's diagonal made non-negative (deterministic)."""
    Q, R = torch.linalg.qr(B, mode="reduced")  # (N, m, r), (N, r, r)
    sign = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(R.dtype)  # (N, r)
    return Q * sign[:, None, :], R * sign[:, :, None]  # flip column j of Q and row j of R together


@functools.lru_cache(maxsize=64)
def triu_pairs(r: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (j, k) with j <= k: the r(r+1)/2 coordinates of a packed symmetric r x r matrix (cached:
    every routed layer asks for them on every call)."""
    iu = torch.triu_indices(r, r, device=device)  # (2, P)
    return iu[0], iu[1]


def pack_gram(R: torch.Tensor) -> torch.Tensor:
    """G_i = R_i^T R_i packed to its upper triangle, off-diagonal entries doubled: (N, r, r) -> (N, P)."""
    r = R.shape[-1]
    G = R.transpose(-2, -1) @ R  # (N, r, r)
    j, k = triu_pairs(r, R.device)
    weight = torch.where(j == k, 1.0, 2.0).to(R.dtype)  # (P,)
    return G[:, j, k] * weight  # (N, P)


def pack_outer(z: torch.Tensor) -> torch.Tensor:
    """Packed outer products z_j z_k for j <= k: (T, r) -> (T, P)."""
    j, k = triu_pairs(z.shape[-1], z.device)
    return z[:, j] * z[:, k]  # (T, P)


def svd_factors(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and right singular vectors of every B_i A_i, through the rank-r factors only.

    B_i A_i = Q_i R_i (P_i T_i)^T with A_i^T = P_i T_i (QR), so B_i A_i = Q_i (R_i T_i^T) P_i^T and the SVD of the
    small r x r core R_i T_i^T = U' S W^T gives V_i = P_i W. No m x n matrix is ever formed.
    Returns S (N, r) descending and Vt (N, r, n): row j of Vt_i is the j-th right singular vector v_ij, so
    the rows of all adapters stack into one (N*r, n) matrix for SPECTR and gather per token for LAG.
    """
    _, R = qr_positive(B)  # (N, r, r)
    At = A.transpose(-2, -1)  # (n, r) shared, or (N, n, r)
    P, T_ = torch.linalg.qr(At, mode="reduced")  # (…, n, r), (…, r, r)
    core = R @ T_.transpose(-2, -1)  # (N, r, r)
    _, S, Wh = torch.linalg.svd(core)  # (N, r), (N, r, r)
    Vt = Wh @ P.transpose(-2, -1)  # (N, r, n) = (P W)^T
    return S, Vt.contiguous()


# ---------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------

def seqr_norms(z: torch.Tensor, G_packed: torch.Tensor) -> torch.Tensor:
    """||R_i z|| for all adapters from ONE product of packed outer products with the packed Grams."""
    sq = pack_outer(z) @ G_packed.T  # (T, N)
    return sq.clamp_min_(0).sqrt_()  # (T, N)


def fold_zscore(G_packed: torch.Tensor, mu: torch.Tensor | None, sigma: torch.Tensor | None):
    """Fold the z-score into the Grams: (||R_i z|| - mu_i) / sigma_i = sqrt(z^T (G_i / sigma_i^2) z) - mu_i / sigma_i.
    Returns (scaled packed Grams (N, P), offsets mu_i / sigma_i (N,) or None), so SEQR's scores cost one product,
    one sqrt and one subtraction."""
    if mu is None:
        return G_packed, None
    return G_packed / (sigma * sigma)[:, None], mu / sigma  # (N, P), (N,)


def seqr_scores(z: torch.Tensor, G_scaled: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """SEQR's z-scored scores from `fold_zscore`'s output (raw norms when offset is None)."""
    s = seqr_norms(z, G_scaled)  # (T, N)
    return s if offset is None else s.sub_(offset)


def stack_r(R: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    """(R_i / sigma_i)^T of every adapter side by side, (N, r, r) -> (r, N*r): the few-token form of SEQR's
    scores (`seqr_scores_few`), with the z-score's division folded in like `fold_zscore` folds it into G."""
    N, r, _ = R.shape
    Rs = R if sigma is None else R / sigma[:, None, None]  # (N, r, r)
    return Rs.transpose(1, 2).permute(1, 0, 2).reshape(r, N * r).contiguous()  # (r, N*r): column block i = (R_i/s_i)^T


def seqr_scores_few(z: torch.Tensor, R_stacked: torch.Tensor, offset: torch.Tensor | None,
                    r: int | None = None) -> torch.Tensor:
    """SEQR's scores ||R_i z|| / sigma_i - mu_i / sigma_i for a few tokens (a decode step): every R_i z from one
    (T, r) @ (r, N*r) product and their norms, 3 ops where the Gram form takes 7. It costs N r^2 MACs per token
    instead of N r(r+1)/2 and a (T, N*r) temporary, which only pays off while T is small. Packed parts
    (`PackedBank`) pass z (T, P*r) and a block-diagonal (P*r, P*N*r) stack with their rank r: (T, P*N)."""
    T, r = z.shape[0], z.shape[1] if r is None else r
    s = torch.linalg.vector_norm((z @ R_stacked).view(T, R_stacked.shape[1] // r, r), dim=-1)  # (T, N)
    return s if offset is None else s.sub_(offset)


def rz_norms(z: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Reference path: materialise R_i z for every adapter and take its norm."""
    Rz = torch.einsum("nab,tb->tna", R, z)  # (T, N, r)
    return Rz.norm(dim=-1)  # (T, N)


def spectr_norms(x: torch.Tensor, S: torch.Tensor, Vt: torch.Tensor) -> torch.Tensor:
    """||S_i V_i^T x|| with the explicit right singular vectors Vt (N, r, n), as SPECTR computes it."""
    N, r, n = Vt.shape
    proj = x @ Vt.view(N * r, n).T  # (T, N*r)
    return (proj.view(-1, N, r) * S).norm(dim=-1)  # (T, N)


def spectr_norms_at(x: torch.Tensor, S: torch.Tensor, Vt: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """SPECTR norms of only the k adapters idx (T, k) of each token: one batched (k*r x n) @ x per token."""
    T, k = idx.shape
    r, n = Vt.shape[1:]
    Vg = Vt.index_select(0, idx.reshape(-1)).view(T, k * r, n)  # (T, k*r, n): candidates' vectors, per token
    proj = torch.bmm(Vg, x[:, :, None]).view(T, k, r)  # (T, k, r)
    return (proj * S[idx]).norm(dim=-1)  # (T, k)


def arrow_scores(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """|v_i . x| for prototypes v (N, n): ARROW's routing logits."""
    return (x @ v.T).abs_()  # (T, N)


def cosine_scores(x: torch.Tensor, c_unit: torch.Tensor) -> torch.Tensor:
    """cos(x, c_i) for unit centroids c_unit (N, n): the centroid router's scores (0 for a zero x)."""
    dots = x @ c_unit.T  # (T, N)
    return dots.div_(torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(torch.finfo(x.dtype).tiny))


def masked_mean(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per row, the mean of x (B, T, n) over its real tokens real (B, T) bool: (B, n)."""
    w = real.to(x.dtype)[..., None]  # (B, T, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min_(1)  # (B, n)


def unit_rows(c: torch.Tensor) -> torch.Tensor:
    """Rows of c (N, n), none of them zero (the caller checks, naming the adapter), scaled to unit length."""
    return c / torch.linalg.vector_norm(c, dim=-1, keepdim=True)  # (N, n)


def naive_norms(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||B_i A_i x|| computed directly, adapter block by adapter block (never a (T, N, m) tensor)."""
    N, m, r = B.shape
    T = x.shape[0]
    out = x.new_empty(T, N)
    a_step = N if compiling() else max(1, min(N, BLOCK_ELEMENTS // max(1, T * (m + r))))
    for a0 in range(0, N, a_step):
        a = slice(a0, min(N, a0 + a_step))
        Ab = A if A.dim() == 2 else A[a]  # (r, n) or (b, r, n)
        z = x @ Ab.T if A.dim() == 2 else torch.einsum("brn,tn->btr", Ab, x)  # (T, r) or (b, T, r)
        if z.dim() == 2:
            y = torch.einsum("bmr,tr->btm", B[a], z)  # (b, T, m)
        else:
            y = torch.bmm(z, B[a].transpose(1, 2))  # (b, T, m)
        out[:, a] = y.norm(dim=-1).T  # (T, b)
    return out


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what torch's grouped_mm takes


def _grouped_mm_ok(t: torch.Tensor) -> bool:
    """grouped_mm takes fp32/bf16/fp16 tensors whose non-unit strides and start are 16-byte aligned."""
    es = t.element_size()
    return (t.dtype in GROUPED_MM_DTYPES and t.data_ptr() % 16 == 0
            and all(st * es % 16 == 0 for st in t.stride() if st != 1))


GATHER_TOKENS = 32  # up to this many tokens, gather each token's matrix and bmm (decode steps, small batches)


def grouped_matmul(z: torch.Tensor, idx: torch.Tensor, Wt: torch.Tensor) -> torch.Tensor:
    """Per-token product with the token's own matrix: out_t = z_t @ Wt[idx_t], (T, a) x (G, a, b) -> (T, b).

    Only the matrices some token uses are touched (and cast to z's dtype: half-precision weights stay half in
    memory). A few tokens (a decode step), or any number under torch.compile: gather each token's matrix and
    one bmm. Many tokens: sort them by matrix and run one grouped GEMM over the used matrices only (CPU grouped_mm
    loops over every group, empty ones included); what grouped_mm does not take (fp64, sizes not 16-byte aligned)
    falls back to one product per used matrix.
    """
    uniform = compiling()  # no host read, no data-dependent shape: the gather for any T
    if not uniform and z.shape[0] == 1 and z.device.type == "cpu":  # one token: its matrix by a cheap host read
        return z @ Wt[int(idx[0])].to(z.dtype)  # (1, b)
    if uniform or z.shape[0] <= GATHER_TOKENS:
        return torch.bmm(z[:, None, :], Wt.index_select(0, idx).to(z.dtype))[:, 0]  # (T, b)
    order = torch.argsort(idx, stable=True)  # (T,) tokens grouped by matrix
    counts = torch.bincount(idx, minlength=Wt.shape[0])  # (G,)
    used = counts.nonzero()[:, 0]  # (U,) the matrices some token uses, ascending like the sorted tokens
    zs, Wu, cu = z[order], Wt.index_select(0, used).to(z.dtype), counts[used]  # (T, a), (U, a, b), (U,)
    if _grouped_mm_ok(zs) and _grouped_mm_ok(Wu):
        ys = torch.nn.functional.grouped_mm(zs, Wu, offs=torch.cumsum(cu, 0).to(torch.int32))  # (T, b)
    else:
        ys = torch.cat([blk @ W for W, blk in zip(Wu, torch.split(zs, cu.tolist()))])  # (T, b)
    out = torch.empty_like(ys)
    out[order] = ys
    return out


def zscore_(norms: torch.Tensor, mu: torch.Tensor | None, sigma: torch.Tensor | None) -> torch.Tensor:
    """s_i = (norm_i - mu_i) / sigma_i in place, or the raw norms when the bank is uncalibrated."""
    if mu is None:
        return norms
    return norms.sub_(mu).div_(sigma)  # (T, N)


def probit(p: torch.Tensor) -> torch.Tensor:
    """The standard normal quantile function Phi^-1(p)."""
    return torch.special.ndtri(p)


def percentile_scores(s: torch.Tensor, knots: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each adapter's score through its own empirical CDF, read as a normal quantile: the piecewise-linear
    map through (knots[i, j], target[j]) (knots strictly increasing per adapter, target = probit of the levels),
    continued linearly past the end knots. Strictly increasing per adapter, so its argmax stays exact."""
    N, Q = knots.shape
    st = s.T.contiguous()  # (N, T)
    j = torch.searchsorted(knots, st).clamp_(1, Q - 1)  # (N, T) right end of each value's segment
    k0, k1 = knots.gather(1, j - 1), knots.gather(1, j)  # (N, T)
    t0, t1 = target[j - 1], target[j]  # (N, T)
    return (t0 + (st - k0) / (k1 - k0) * (t1 - t0)).T  # (T, N)


# ---------------------------------------------------------------------------------------------------
# Choice
# ---------------------------------------------------------------------------------------------------

def sanitize_(scores: torch.Tensor) -> torch.Tensor:
    """NaN and -inf scores become the lowest finite value (+inf stays): every allowed adapter then ranks strictly
    above the -inf given to disallowed ones, whatever a silo's statistics did to its scores."""
    lo = torch.finfo(scores.dtype).min
    return scores.nan_to_num_(nan=lo, posinf=float("inf"), neginf=lo)


def masked_argmax_(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Index of the best score per token among allowed adapters: never a disallowed one, whatever the scores hold
    (NaN, +-inf, overflow): NaN and -inf rank below every finite allowed score but above every disallowed
    adapter, so a token whose allowed scores are all NaN gets its first allowed adapter. Every mask row must
    allow at least one adapter. Overwrites `scores` in place."""
    sanitize_(scores)  # (T, N)
    if mask is not None:
        check_nonempty(mask)
        scores.masked_fill_(~mask, float("-inf"))  # (T, N)
    return scores.argmax(dim=-1)  # (T,)


def check_nonempty(mask: torch.Tensor) -> None:
    """Every token's allowed set holds an adapter. Compiled (torch.compile, e.g. inside vLLM's graph): an assert
    op in the graph, no host read that would break it (RuntimeError); eager: a ValueError."""
    if compiling():
        torch._assert_async(mask.any(dim=-1).all(), "masked_argmax_: a token's allowed set is empty")
    elif not bool(mask.any(dim=-1).all()):
        raise ValueError("masked_argmax_: a token's allowed set is empty, so no adapter can be chosen")


def masked_topk_(scores: torch.Tensor, mask: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (values, indices) per token with allowed adapters first, ranked as in `masked_argmax_` (all k
    are allowed when k is at most the smallest allowed set). Overwrites `scores` in place."""
    sanitize_(scores)  # (T, N)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return scores.topk(k, dim=-1)  # (T, k), (T, k)


def lag_route(x: torch.Tensor, v: torch.Tensor, S: torch.Tensor, Vt: torch.Tensor, k: int,
              mask: torch.Tensor | None, mu: torch.Tensor | None, sigma: torch.Tensor | None) -> torch.Tensor:
    """LAG: ARROW's top-k candidates, then SPECTR's (z-scored) argmax among them."""
    if lag_dense(Vt.shape[0], k):  # few adapters: every SPECTR norm from one GEMM, then the shortlist
        return shortlist_argmax(arrow_scores(x, v), zscore_(spectr_norms(x, S, Vt), mu, sigma), k, mask)  # (T,)
    top = masked_topk_(arrow_scores(x, v), mask, k).indices  # (T, k) the allowed candidates first
    s = spectr_norms_at(x, S, Vt, top)  # (T, k)
    if mu is not None:
        s = (s - mu[top]) / sigma[top]  # (T, k)
    keep = None if mask is None else mask.expand(x.shape[0], -1).gather(1, top)  # (T, k)
    return top.gather(1, masked_argmax_(s, keep)[:, None])[:, 0]  # (T,)


def lag_dense(N: int, k: int) -> bool:
    """Whether LAG scores all N adapters densely (see LAG_DENSE_PER_K) rather than gathering k per token."""
    return N <= LAG_DENSE_PER_K * k


def shortlist_argmax(short: torch.Tensor, final: torch.Tensor, k: int, mask: torch.Tensor | None) -> torch.Tensor:
    """The top-k allowed adapters by `short` (T, N), then the argmax of `final` (T, N) among them: (T,).
    Overwrites `short`."""
    top = masked_topk_(short, mask, k).indices  # (T, k) the allowed candidates first
    keep = None if mask is None else mask.expand(short.shape[0], -1).gather(1, top)  # (T, k)
    return top.gather(1, masked_argmax_(final.gather(1, top), keep)[:, None])[:, 0]  # (T,)
