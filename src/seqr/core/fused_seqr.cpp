// SEQR's routing step for a few tokens (a decode step), fused into one call on one CPU thread.
//
// For every token t and packed part p (q | k | v of one attention block share their input x):
//   z_p      = A_p x_t                                   (one (n, sum r_p) product for every part)
//   s_{p,i}  = ||R'_{p,i} z_p|| - o_{p,i}                R' = R / sigma, o = mu / sigma (or R, 0 uncalibrated)
//   i*_p     = argmax over the token's allowed adapters, NaN and -inf ranked as the lowest finite score
//   upd_p    = B_{p,i*} z_p                              (no update for a token that carries no set)
// exactly the eager step (seqr/core/step.py with a PackedBank), without its ~30 tiny tensor ops per module:
// a decode step of SmolLM2 runs 60 of them, each op costing more in dispatch than it computes.
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// A score as the eager path ranks it (routers.sanitize_): NaN and -inf become the lowest finite value.
inline float ranked(float s) {
  const float lo = std::numeric_limits<float>::lowest();
  return (std::isnan(s) || s == -std::numeric_limits<float>::infinity()) ? lo : s;
}

// out (m,) = B_i z from B_i^T (r, m) row-major (the bank's own layout): r contiguous multiply-adds of length m.
template <typename scalar_t>
void apply_part(const float* __restrict zp, const scalar_t* __restrict Bt, int64_t i, int64_t m, int64_t r,
                float* __restrict out) {
  const scalar_t* Bi = Bt + i * r * m;  // (r, m): the chosen adapter's B^T
  for (int64_t c = 0; c < r; ++c) {
    const float zc = zp[c];
    const scalar_t* row = Bi + c * m;
    for (int64_t j = 0; j < m; ++j) out[j] += zc * static_cast<float>(row[j]);
  }
}

// i* = argmax_i ||R'_i z_p|| - o_i over the allowed adapters (mt: (N,) bool, or null: all); -1 when none is.
// A set of one is its adapter, whatever its score (NaN included), as in the eager step.
int64_t choose(const float* __restrict zp, const float* __restrict Rp, const float* op, const bool* mt, int64_t N,
               int64_t r, float* __restrict w) {
  if (mt != nullptr) {  // a set of one (request-level serving narrows each request's set to its adapter): no scores
    int64_t only = -1, allowed = 0;
    for (int64_t i = 0; i < N && allowed < 2; ++i) {
      if (mt[i]) only = i, ++allowed;
    }
    if (allowed <= 1) return only;  // its one adapter, or -1: an empty set
  }
  std::fill(w, w + N * r, 0.f);
  for (int64_t k = 0; k < r; ++k) {  // w = z_p R'_stacked: every R'_i z_p at once, (N r,)
    const float zk = zp[k];
    const float* Rk = Rp + k * N * r;
    for (int64_t c = 0; c < N * r; ++c) w[c] += zk * Rk[c];
  }
  int64_t best = -1;
  float best_s = 0.f;
  for (int64_t i = 0; i < N; ++i) {
    if (mt != nullptr && !mt[i]) continue;
    float ss = 0.f;
    for (int64_t c = 0; c < r; ++c) ss += w[i * r + c] * w[i * r + c];
    const float s = ranked(std::sqrt(ss) - (op ? op[i] : 0.f));
    if (best < 0 || s > best_s) best = i, best_s = s;  // the first of equal scores, as torch.argmax
  }
  return best;
}

// Each part's arguments checked; its output width m_p and first output column. Returns sum m_p.
int64_t check_parts(const std::vector<torch::Tensor>& Rs, const std::vector<torch::Tensor>& offs,
                    const std::vector<torch::Tensor>& Bts, int64_t N, int64_t r, std::vector<int64_t>& sizes,
                    std::vector<int64_t>& starts) {
  int64_t M = 0;
  for (size_t p = 0; p < Rs.size(); ++p) {
    TORCH_CHECK(Rs[p].scalar_type() == torch::kFloat && Rs[p].is_contiguous() && Rs[p].size(0) == r &&
                Rs[p].size(1) == N * r, "R stack of part ", p, " must be contiguous float32 (r, N r)");
    TORCH_CHECK(offs[p].numel() == 0 || (offs[p].scalar_type() == torch::kFloat && offs[p].numel() == N),
                "offsets of part ", p, " must be float32 (N,)");
    TORCH_CHECK(Bts[p].is_contiguous() && Bts[p].dim() == 3 && Bts[p].size(0) == N && Bts[p].size(1) == r,
                "B^T of part ", p, " must be contiguous (N, r, m)");
    sizes[p] = Bts[p].size(2);
    starts[p] = M;
    M += sizes[p];
  }
  return M;
}

}  // namespace

// x (T, n) f32; At (n, P r) f32; Rs[p] (r, N r) f32; offs[p] (N,) f32 or empty; Bts[p] (N, r, m_p);
// mask (T or 1, N) bool or empty (all allowed); has (T,) bool or empty (every token updated).
// Returns idx (T, P) int64, upd (T, sum m_p) f32, z (T, P r) f32 and the number of tokens routed with an empty
// allowed set (none chosen, nothing applied: the caller refuses them).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, int64_t> seqr_step(torch::Tensor x, torch::Tensor At, std::vector<torch::Tensor> Rs,
                                     std::vector<torch::Tensor> offs, std::vector<torch::Tensor> Bts,
                                     torch::Tensor mask, torch::Tensor has) {
  const int64_t T = x.size(0), n = x.size(1), R = At.size(1), P = static_cast<int64_t>(Rs.size());
  TORCH_CHECK(x.scalar_type() == torch::kFloat && At.scalar_type() == torch::kFloat, "x and At must be float32");
  TORCH_CHECK(x.is_contiguous() && At.is_contiguous() && At.size(0) == n, "x (T, n) and At (n, R) contiguous");
  TORCH_CHECK(P > 0 && R % P == 0 && offs.size() == Rs.size() && Bts.size() == Rs.size(), "one R, offset, B per part");
  const int64_t r = R / P, N = Rs[0].size(1) / r;
  const bool masked = mask.defined() && mask.numel() > 0, gated = has.defined() && has.numel() > 0;
  TORCH_CHECK(!masked || (mask.scalar_type() == torch::kBool && mask.is_contiguous() && mask.size(1) == N &&
                          (mask.size(0) == T || mask.size(0) == 1)), "mask must be contiguous bool (T or 1, N)");
  TORCH_CHECK(!gated || (has.scalar_type() == torch::kBool && has.numel() == T), "has must be bool (T,)");
  std::vector<int64_t> sizes(P), starts(P);
  const int64_t M = check_parts(Rs, offs, Bts, N, r, sizes, starts);
  auto idx = torch::empty({T, P}, torch::kLong);
  auto upd = torch::zeros({T, M}, torch::kFloat);
  auto z = torch::zeros({T, R}, torch::kFloat);
  const float* xp = x.data_ptr<float>();
  const float* Ap = At.data_ptr<float>();
  const bool* mp = masked ? mask.data_ptr<bool>() : nullptr;
  const bool* hp = gated ? has.data_ptr<bool>() : nullptr;
  const int64_t mstride = masked && mask.size(0) == T ? N : 0;
  int64_t* ip = idx.data_ptr<int64_t>();
  float* up = upd.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  int64_t empty_sets = 0;
  std::vector<float> w(N * r);  // one part's R'_i z for every adapter i (one thread: tiny beside the base GEMMs)
  for (int64_t t = 0; t < T; ++t) {
    float* zt = zp + t * R;
    for (int64_t k = 0; k < n; ++k) {  // z = x At, row by row (contiguous inner loop)
      const float xv = xp[t * n + k];
      const float* Ak = Ap + k * R;
      for (int64_t j = 0; j < R; ++j) zt[j] += xv * Ak[j];
    }
    const bool own = hp == nullptr || hp[t];  // the token carries a set: routed within it and updated
    const bool* mt = (mp != nullptr && own) ? mp + t * mstride : nullptr;  // no set: any adapter, no update
    for (int64_t p = 0; p < P; ++p) {
      const float* zpp = zt + p * r;
      const float* op = offs[p].numel() ? offs[p].data_ptr<float>() : nullptr;
      const int64_t best = choose(zpp, Rs[p].data_ptr<float>(), op, mt, N, r, w.data());
      ip[t * P + p] = best < 0 ? 0 : best;
      if (best < 0) {
        ++empty_sets;
        continue;
      }
      if (own) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Bts[p].scalar_type(), "seqr_apply", [&] {
          apply_part<scalar_t>(zpp, Bts[p].data_ptr<scalar_t>(), best, sizes[p], r, up + t * M + starts[p]);
        });
      }
    }
  }
  return {idx, upd, z, empty_sets};
}
