// Fused softmax attention for XLA:CPU, forward and backward, as XLA FFI handlers.
//
// Why: XLA:CPU runs attention as separate batched dots (each (batch, head) matmul on one
// thread, in sequence) plus max/exp/sum passes over the (B, H, L, L) tensor and head-major
// transposes around them. Here every (batch, head) pair is one task that keeps its L x L
// block in L2, reads q/k/v in their token-major (..., L, H, D) layout, and the tasks share
// XLA's own intra-op thread pool.
//
// Operands: q, k, v, o, do: float32 (..., L, H, D), q pre-scaled; lse: float32 (..., H, L),
// the log-sum-exp of each softmax row, saved by the forward for the backward (which recomputes
// the probabilities from it, as flash attention does). No mask: callers with a mask use XLA.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "kernel_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace bvl;  // NOLINT: the shared vector helpers

typedef int32_t vi __attribute__((vector_size(kW * sizeof(int32_t))));

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// exp for x <= 0 (all callers subtract the row max first): Cody-Waite range reduction and a
// degree-6 polynomial, ~2 ulp; x below ~-87 flushes to 0.
inline vf exp_neg(vf x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer in float arithmetic.
  const vf n = (x * splat(1.44269504088896341f) + splat(12582912.f)) - splat(12582912.f);
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.f);
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale; std::memcpy(&scale, &e, sizeof(scale));
  vf out = p * scale;
  return x <= splat(-87.f) ? splat(0.f) : out;
}

// C[i, j] = sum_k A[i * a_rs + k * a_ks] * B[k * ldb + j] for i < MR, j < NV * kW.
// A is read by broadcasts, so a transposed A costs nothing; B rows are contiguous.
template <int MR, int NV>
inline void micro(const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t ldb,
                  float* C, int64_t ldc, int64_t K) {
  vf c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * kW);
    for (int r = 0; r < MR; ++r) {
      const vf a = splat(A[r * a_rs + k * a_ks]);
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * kW, c[r][v]);
}

template <int NV>
void gemm_cols(const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t ldb,
               float* C, int64_t ldc, int64_t M, int64_t K) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) micro<6, NV>(A + i * a_rs, a_rs, a_ks, B, ldb, C + i * ldc, ldc, K);
  for (; i + 2 <= M; i += 2) micro<2, NV>(A + i * a_rs, a_rs, a_ks, B, ldb, C + i * ldc, ldc, K);
}

// C (M x N) = A (M x K) @ B (K x N); M % 2 == 0, N % kW == 0.
void gemm(const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t ldb, float* C,
          int64_t ldc, int64_t M, int64_t N, int64_t K) {
  const int64_t nv = N / kW;
  int64_t j = 0;
  for (; j + 4 <= nv; j += 4) gemm_cols<4>(A, a_rs, a_ks, B + j * kW, ldb, C + j * kW, ldc, M, K);
  switch (nv - j) {
    case 3: gemm_cols<3>(A, a_rs, a_ks, B + j * kW, ldb, C + j * kW, ldc, M, K); break;
    case 2: gemm_cols<2>(A, a_rs, a_ks, B + j * kW, ldb, C + j * kW, ldc, M, K); break;
    case 1: gemm_cols<1>(A, a_rs, a_ks, B + j * kW, ldb, C + j * kW, ldc, M, K); break;
    default: break;
  }
}

struct Dims {
  int64_t batch, L, H, D, P;  // P: L padded to a multiple of kW (and of kMR)
  int64_t row() const { return H * D; }  // stride between tokens in q/k/v/o
};

Dims dims_of(const ffi::Buffer<ffi::F32>& q) {
  auto d = q.dimensions();
  const size_t n = d.size();
  Dims out;
  out.D = d[n - 1]; out.H = d[n - 2]; out.L = d[n - 3];
  out.batch = 1;
  for (size_t i = 0; i + 3 < n; ++i) out.batch *= d[i];
  out.P = round_up(out.L, kW);
  return out;
}

// Copies the (L, D) slice of one head into a zero-padded (P, D) block.
void pack_rows(const float* src, const Dims& d, float* dst) {
  for (int64_t i = 0; i < d.L; ++i) std::memcpy(dst + i * d.D, src + i * d.row(), d.D * 4);
  std::memset(dst + d.L * d.D, 0, (d.P - d.L) * d.D * 4);
}

// Transposes the (L, D) slice of one head into a zero-padded (D, P) block.
void pack_cols(const float* src, const Dims& d, float* dst) {
  for (int64_t c = 0; c < d.D; ++c) {
    float* out = dst + c * d.P;
    for (int64_t i = 0; i < d.L; ++i) out[i] = src[i * d.row() + c];
    for (int64_t i = d.L; i < d.P; ++i) out[i] = 0.f;
  }
}

// Rows i < L of S hold logits; on return they hold exp(S - lse_i) (masked past L), rows past
// L are zero. With `lse_out`, lse is computed and stored; otherwise read from `lse_in`.
void softmax_rows(float* S, const Dims& d, float* lse_out, const float* lse_in) {
  const int64_t nv = d.P / kW;
  const int64_t tail = d.L - (nv - 1) * kW;  // valid lanes in the last vector
  vf last_mask;
  for (int l = 0; l < kW; ++l) last_mask[l] = l < tail ? 1.f : 0.f;
  for (int64_t i = 0; i < d.L; ++i) {
    float* s = S + i * d.P;
    float m;
    if (lse_out) {
      vf mv = splat(-INFINITY);
      for (int64_t v = 0; v + 1 < nv; ++v) {
        const vf x = load(s + v * kW);
        mv = x > mv ? x : mv;
      }
      m = -INFINITY;
      for (int l = 0; l < kW; ++l) m = std::max(m, mv[l]);
      for (int64_t j = (nv - 1) * kW; j < d.L; ++j) m = std::max(m, s[j]);
    } else {
      m = lse_in[i];
    }
    const vf mv = splat(m);
    vf sum = splat(0.f);
    for (int64_t v = 0; v < nv; ++v) {
      vf e = exp_neg(load(s + v * kW) - mv);
      if (v == nv - 1) e *= last_mask;
      store(s + v * kW, e);
      sum += e;
    }
    if (lse_out) {
      float total = 0.f;
      for (int l = 0; l < kW; ++l) total += sum[l];
      const vf inv = splat(1.f / total);
      for (int64_t v = 0; v < nv; ++v) store(s + v * kW, load(s + v * kW) * inv);
      lse_out[i] = m + std::log(total);
    }
  }
  std::memset(S + d.L * d.P, 0, (d.P - d.L) * d.P * 4);
}

ffi::Error AttnFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse) {
  const Dims d = dims_of(q);
  if (d.D % kW) return ffi::Error::InvalidArgument("head dim must be a multiple of 16");
  const float *Q = q.typed_data(), *K = k.typed_data(), *V = v.typed_data();
  float *O = o->typed_data(), *LSE = lse->typed_data();
  const size_t scratch = d.P * d.D * 3 + d.P * d.P;
  parallel_for(pool, d.batch * d.H, scratch, [&](int64_t item, float* buf) {
    const int64_t b = item / d.H, h = item % d.H;
    const int64_t off = b * d.L * d.row() + h * d.D;
    float *qp = buf, *kt = qp + d.P * d.D, *op = kt + d.P * d.D, *S = op + d.P * d.D;
    pack_rows(Q + off, d, qp);
    pack_cols(K + off, d, kt);
    gemm(qp, d.D, 1, kt, d.P, S, d.P, d.P, d.P, d.D);
    softmax_rows(S, d, LSE + item * d.L, nullptr);
    gemm(S, d.P, 1, V + off, d.row(), op, d.D, d.P, d.D, d.L);
    for (int64_t i = 0; i < d.L; ++i) std::memcpy(O + off + i * d.row(), op + i * d.D, d.D * 4);
  });
  return ffi::Error::Success();
}

ffi::Error AttnBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                   ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                   ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  const Dims d = dims_of(q);
  if (d.D % kW) return ffi::Error::InvalidArgument("head dim must be a multiple of 16");
  const float *Q = q.typed_data(), *K = k.typed_data(), *V = v.typed_data();
  const float *O = o.typed_data(), *LSE = lse.typed_data(), *DO = dout.typed_data();
  float *DQ = dq->typed_data(), *DK = dk->typed_data(), *DV = dv->typed_data();
  const size_t scratch = d.P * d.D * 5 + d.P * d.P * 2 + d.P;
  parallel_for(pool, d.batch * d.H, scratch, [&](int64_t item, float* buf) {
    const int64_t b = item / d.H, h = item % d.H;
    const int64_t off = b * d.L * d.row() + h * d.D;
    float *qp = buf, *kt = qp + d.P * d.D, *dop = kt + d.P * d.D, *vt = dop + d.P * d.D;
    float *out = vt + d.P * d.D, *P = out + d.P * d.D, *dS = P + d.P * d.P, *di = dS + d.P * d.P;
    pack_rows(Q + off, d, qp);
    pack_cols(K + off, d, kt);
    pack_rows(DO + off, d, dop);
    pack_cols(V + off, d, vt);
    gemm(qp, d.D, 1, kt, d.P, P, d.P, d.P, d.P, d.D);
    softmax_rows(P, d, nullptr, LSE + item * d.L);
    auto copy_out = [&](float* dst) {
      for (int64_t i = 0; i < d.L; ++i) std::memcpy(dst + off + i * d.row(), out + i * d.D, d.D * 4);
    };
    // dV = P^T dO
    gemm(P, 1, d.P, dop, d.D, out, d.D, d.P, d.D, d.L);
    copy_out(DV);
    // dS = P * (dO V^T - rowsum(dO * O))
    for (int64_t i = 0; i < d.L; ++i) {
      const float* oi = O + off + i * d.row();
      vf acc = splat(0.f);
      for (int64_t c = 0; c < d.D; c += kW) acc += load(dop + i * d.D + c) * load(oi + c);
      float s = 0.f;
      for (int l = 0; l < kW; ++l) s += acc[l];
      di[i] = s;
    }
    gemm(dop, d.D, 1, vt, d.P, dS, d.P, d.P, d.P, d.D);
    for (int64_t i = 0; i < d.P; ++i) {
      const vf dii = splat(i < d.L ? di[i] : 0.f);
      for (int64_t c = 0; c < d.P; c += kW)
        store(dS + i * d.P + c, load(P + i * d.P + c) * (load(dS + i * d.P + c) - dii));
    }
    // dQ = dS K, dK = dS^T Q (q is pre-scaled, so no scale here)
    gemm(dS, d.P, 1, K + off, d.row(), out, d.D, d.P, d.D, d.L);
    copy_out(DQ);
    gemm(dS, 1, d.P, Q + off, d.row(), out, d.D, d.P, d.D, d.L);
    copy_out(DK);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BvlAttentionFwd, AttnFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BvlAttentionBwd, AttnBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
