// SEQR's routing step for a few tokens (a decode step), fused into one call; tokens split over torch's threads.
//
// For every token t and packed part p (q | k | v of one attention block share their input x):
//   z_p      = A_p x_t                                   (one (n, sum r_p) product for every part)
//   s_{p,i}  = ||R'_{p,i} z_p|| - o_{p,i}                R' = R / sigma, o = mu / sigma (or R, 0 uncalibrated)
//   i*_p     = argmax over the token's allowed adapters, NaN and -inf ranked as the lowest finite score
//   upd_p    = B_{p,i*} z_p                              (no update for a token that carries no set)
// exactly the eager step (seqr/core/step.py with a PackedBank), without its ~30 tiny tensor ops per module:
// a decode step of SmolLM2 runs 60 of them, each op costing more in dispatch than it computes.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>
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

// The parts' arguments, checked once per call, as raw pointers for the token loop.
struct Parts {
  int64_t P, N, r, R, M;
  std::vector<const float*> Rp, op;
  std::vector<torch::Tensor> Bts;
  std::vector<int64_t> sizes, starts;
};

Parts parts_of(const torch::Tensor& At, const std::vector<torch::Tensor>& Rs, const std::vector<torch::Tensor>& offs,
               const std::vector<torch::Tensor>& Bts, int64_t n) {
  Parts ps;
  ps.P = static_cast<int64_t>(Rs.size()), ps.R = At.size(1);
  TORCH_CHECK(At.scalar_type() == torch::kFloat && At.is_contiguous() && At.size(0) == n, "At must be float32 (n, R)");
  TORCH_CHECK(ps.P > 0 && ps.R % ps.P == 0 && offs.size() == Rs.size() && Bts.size() == Rs.size(),
              "one R, offset, B per part");
  ps.r = ps.R / ps.P, ps.N = Bts[0].size(0);  // adapters: the first part's B^T is (N, r, m)
  ps.sizes.resize(ps.P), ps.starts.resize(ps.P);
  ps.M = check_parts(Rs, offs, Bts, ps.N, ps.r, ps.sizes, ps.starts);
  for (int64_t p = 0; p < ps.P; ++p) {
    ps.Rp.push_back(Rs[p].data_ptr<float>());
    ps.op.push_back(offs[p].numel() ? offs[p].data_ptr<float>() : nullptr);
  }
  ps.Bts = Bts;
  return ps;
}

// One token: z = A x (zt (R,), zeroed by the caller), each part's choice into it (P,), and with `own` the chosen
// updates added to acc (M,). Returns how many parts found the allowed set empty (none chosen, nothing applied).
int64_t route_token(const Parts& ps, const float* xt, int64_t n, const float* Ap, const bool* mt, bool own,
                    float* zt, int64_t* it, float* acc, float* w) {
  for (int64_t k = 0; k < n; ++k) {  // z = x At, row by row (contiguous inner loop)
    const float xv = xt[k];
    const float* Ak = Ap + k * ps.R;
    for (int64_t j = 0; j < ps.R; ++j) zt[j] += xv * Ak[j];
  }
  int64_t empty = 0;
  for (int64_t p = 0; p < ps.P; ++p) {
    const float* zpp = zt + p * ps.r;
    const int64_t best = choose(zpp, ps.Rp[p], ps.op[p], mt, ps.N, ps.r, w);
    it[p] = best < 0 ? 0 : best;
    if (best < 0) {
      ++empty;
    } else if (own) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ps.Bts[p].scalar_type(), "seqr_apply", [&] {
        apply_part<scalar_t>(zpp, ps.Bts[p].data_ptr<scalar_t>(), best, ps.sizes[p], ps.r, acc + ps.starts[p]);
      });
    }
  }
  return empty;
}

// Tokens per thread: at least `min_work` multiply-adds each (0: every token on the calling thread).
int64_t grain(const Parts& ps, int64_t n, int64_t min_work) {
  if (min_work <= 0) return std::numeric_limits<int64_t>::max();
  const int64_t per_token = n * ps.R + ps.P * ps.N * ps.r * ps.r + ps.M * ps.r;
  return std::max<int64_t>(1, min_work / std::max<int64_t>(per_token, 1));
}

// mask (T or 1, N) bool or empty; has (T,) bool or empty: the pointers route_token reads, checked.
std::pair<const bool*, int64_t> mask_of(const torch::Tensor& mask, int64_t T, int64_t N) {
  if (!mask.defined() || mask.numel() == 0) return {nullptr, 0};
  TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.is_contiguous() && mask.size(1) == N &&
              (mask.size(0) == T || mask.size(0) == 1), "mask must be contiguous bool (T or 1, N)");
  return {mask.data_ptr<bool>(), mask.size(0) == T ? N : 0};
}

const bool* has_of(const torch::Tensor& has, int64_t T) {
  if (!has.defined() || has.numel() == 0) return nullptr;
  TORCH_CHECK(has.scalar_type() == torch::kBool && has.numel() == T, "has must be bool (T,)");
  return has.data_ptr<bool>();
}

// Every token routed, split over torch's threads when each gets `min_work` multiply-adds; `row(t, x, z, acc)` gives token t's input row (float32), and
// its z and update rows; `done(t, acc)` runs once its update is in acc. Returns the empty-set count.
template <typename Row, typename Done>
int64_t route_all(const Parts& ps, int64_t T, int64_t n, const float* Ap, const torch::Tensor& mask,
                  const torch::Tensor& has, int64_t* ip, int64_t min_work, Row row, Done done) {
  const std::pair<const bool*, int64_t> m = mask_of(mask, T, ps.N);  // (pointer, row stride)
  const bool* mp = m.first;
  const int64_t mstride = m.second;
  const bool* hp = has_of(has, T);
  std::atomic<int64_t> empty{0};
  at::parallel_for(0, T, grain(ps, n, min_work), [&](int64_t b, int64_t e) {
    std::vector<float> w(ps.N * ps.r), xbuf(n), zbuf(ps.R), abuf(ps.M);  // this thread's scratch
    int64_t local = 0;
    for (int64_t t = b; t < e; ++t) {
      const bool own = hp == nullptr || hp[t];  // the token carries a set: routed within it and updated
      const bool* mt = (mp != nullptr && own) ? mp + t * mstride : nullptr;  // no set: any adapter, no update
      const auto rows = row(t, xbuf.data(), zbuf.data(), abuf.data());  // (x_t, z_t, acc_t)
      local += route_token(ps, std::get<0>(rows), n, Ap, mt, own, std::get<1>(rows), ip + t * ps.P,
                           std::get<2>(rows), w.data());
      done(t, std::get<2>(rows));
    }
    empty += local;
  });
  return empty.load();
}

}  // namespace

// x (T, n) f32; At (n, P r) f32; Rs[p] (r, N r) f32; offs[p] (N,) f32 or empty; Bts[p] (N, r, m_p);
// mask (T or 1, N) bool or empty (all allowed); has (T,) bool or empty (every token updated).
// Returns idx (T, P) int64, upd (T, sum m_p) f32, z (T, P r) f32 and the number of tokens routed with an empty
// allowed set (none chosen, nothing applied: the caller refuses them).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, int64_t> seqr_step(
    torch::Tensor x, torch::Tensor At, std::vector<torch::Tensor> Rs, std::vector<torch::Tensor> offs,
    std::vector<torch::Tensor> Bts, torch::Tensor mask, torch::Tensor has, int64_t min_work) {
  const int64_t T = x.size(0), n = x.size(1);
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be contiguous float32 (T, n)");
  const Parts ps = parts_of(At, Rs, offs, Bts, n);
  auto idx = torch::empty({T, ps.P}, torch::kLong);
  auto upd = torch::zeros({T, ps.M}, torch::kFloat);
  auto z = torch::zeros({T, ps.R}, torch::kFloat);
  const float* xp = x.data_ptr<float>();
  float* up = upd.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  const int64_t empty = route_all(
      ps, T, n, At.data_ptr<float>(), mask, has, idx.data_ptr<int64_t>(), min_work,
      [&](int64_t t, float*, float*, float*) { return std::make_tuple(xp + t * n, zp + t * ps.R, up + t * ps.M); },
      [](int64_t, float*) {});
  return {idx, upd, z, empty};
}

// The same step added into a layer's output in place: x (T, n) in the model's dtype (rows contiguous), read as
// float32; y (T, sum m_p) contiguous, y_t <- round(y_t + upd_t) to y's dtype (one rounding, as (y + upd).to(y.dtype)).
// Returns idx (T, P) and the empty-set count.
std::tuple<torch::Tensor, int64_t> seqr_step_into(
    torch::Tensor x, torch::Tensor y, torch::Tensor At, std::vector<torch::Tensor> Rs, std::vector<torch::Tensor> offs,
    std::vector<torch::Tensor> Bts, torch::Tensor mask, torch::Tensor has, int64_t min_work) {
  const int64_t T = x.size(0), n = x.size(1);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be (T, n) with contiguous rows");
  const Parts ps = parts_of(At, Rs, offs, Bts, n);
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && y.size(0) == T && y.size(1) == ps.M,
              "y must be contiguous (T, ", ps.M, ")");
  auto idx = torch::empty({T, ps.P}, torch::kLong);
  int64_t empty = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "seqr_x", [&] {
    using x_t = scalar_t;
    const x_t* xp = x.data_ptr<x_t>();
    const int64_t xs = x.stride(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "seqr_y", [&] {
      scalar_t* yp = y.data_ptr<scalar_t>();
      empty = route_all(
          ps, T, n, At.data_ptr<float>(), mask, has, idx.data_ptr<int64_t>(), min_work,
          [&](int64_t t, float* xb, float* zb, float* ab) {
            for (int64_t k = 0; k < n; ++k) xb[k] = static_cast<float>(xp[t * xs + k]);
            std::fill(zb, zb + ps.R, 0.f);
            std::fill(ab, ab + ps.M, 0.f);
            return std::make_tuple(static_cast<const float*>(xb), zb, ab);
          },
          [&](int64_t t, float* acc) {
            scalar_t* yt = yp + t * ps.M;
            for (int64_t j = 0; j < ps.M; ++j) yt[j] = static_cast<scalar_t>(static_cast<float>(yt[j]) + acc[j]);
          });
    });
  });
  return {idx, empty};
}
