// LayerNorm over the last axis for XLA:CPU, forward and backward, as XLA FFI handlers.
//
// Why: XLA:CPU lowers LayerNorm's row statistics and normalisation as several loop fusions
// that reduce along the minor axis one element at a time; its backward adds two column
// reductions. Here each task takes 64 rows, keeps each row in L1 and does it in 16-float
// vectors: at ViT-S/16 sizes forward + backward is several times faster (RESULTS.md round 8).
//
// Operands: x, y, dy, dx: float32 (rows, D), D a multiple of 16; scale, bias, dscale, dbias:
// float32 (D,); mean, rstd: float32 (rows,), saved by the forward for the backward, which
// recomputes xhat = (x - mean) * rstd from x instead of storing it. The variance is two-pass,
// as in models/common.layer_norm_fn. dscale and dbias are summed per task and the task sums
// added in task order, so results do not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace bvl;  // NOLINT: the shared vector helpers

inline float hsum(vf v) { float s = 0.f; for (int l = 0; l < kW; ++l) s += v[l]; return s; }

constexpr int64_t kRowsPerItem = 64;  // rows per task

ffi::Error check_width(const ffi::Buffer<ffi::F32>& x, int64_t D) {
  const auto dims = x.dimensions();
  if (dims.size() == 0 || dims.back() != D)
    return ffi::Error::InvalidArgument("x's last dimension must equal the size of scale");
  if (D % kW) return ffi::Error::InvalidArgument("the width must be a multiple of 16");
  return ffi::Error::Success();
}

ffi::Error LnFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                 ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                 ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd, float eps) {
  const int64_t D = scale.element_count();
  if (ffi::Error e = check_width(x, D); e.failure()) return e;
  const int64_t rows = x.element_count() / D;
  const float *X = x.typed_data(), *S = scale.typed_data(), *B = bias.typed_data();
  float *Y = y->typed_data(), *M = mean->typed_data(), *R = rstd->typed_data();
  const int64_t items = (rows + kRowsPerItem - 1) / kRowsPerItem;
  parallel_for(pool, items, 0, [&](int64_t item, float*) {
    const int64_t r1 = std::min(rows, (item + 1) * kRowsPerItem);
    for (int64_t r = item * kRowsPerItem; r < r1; ++r) {
      const float* xr = X + r * D;
      vf acc = splat(0.f);
      for (int64_t c = 0; c < D; c += kW) acc += load(xr + c);
      const float mu = hsum(acc) / D;
      const vf vmu = splat(mu);
      acc = splat(0.f);
      for (int64_t c = 0; c < D; c += kW) { vf d = load(xr + c) - vmu; acc += d * d; }
      const float rs = 1.f / std::sqrt(hsum(acc) / D + eps);
      const vf vrs = splat(rs);
      float* yr = Y + r * D;
      for (int64_t c = 0; c < D; c += kW)
        store(yr + c, (load(xr + c) - vmu) * vrs * load(S + c) + load(B + c));
      M[r] = mu; R[r] = rs;
    }
  });
  return ffi::Error::Success();
}

ffi::Error LnBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                 ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                 ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                 ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias) {
  const int64_t D = scale.element_count();
  if (ffi::Error e = check_width(x, D); e.failure()) return e;
  const int64_t rows = x.element_count() / D;
  const float *X = x.typed_data(), *S = scale.typed_data(), *M = mean.typed_data();
  const float *R = rstd.typed_data(), *DY = dy.typed_data();
  float *DX = dx->typed_data(), *DS = dscale->typed_data(), *DB = dbias->typed_data();
  const int64_t items = (rows + kRowsPerItem - 1) / kRowsPerItem;
  std::vector<float> part(items * 2 * D);
  parallel_for(pool, items, 0, [&](int64_t item, float*) {
    float* ps = part.data() + item * 2 * D;
    float* pb = ps + D;
    std::memset(ps, 0, 2 * D * sizeof(float));
    const int64_t r1 = std::min(rows, (item + 1) * kRowsPerItem);
    for (int64_t r = item * kRowsPerItem; r < r1; ++r) {
      const float *xr = X + r * D, *dyr = DY + r * D;
      const vf vmu = splat(M[r]), vrs = splat(R[r]);
      vf a1 = splat(0.f), a2 = splat(0.f);
      for (int64_t c = 0; c < D; c += kW) {
        const vf xh = (load(xr + c) - vmu) * vrs, d = load(dyr + c), g = d * load(S + c);
        a1 += g; a2 += g * xh;
        store(ps + c, load(ps + c) + d * xh);
        store(pb + c, load(pb + c) + d);
      }
      const vf m1 = splat(hsum(a1) / D), m2 = splat(hsum(a2) / D);
      float* dxr = DX + r * D;
      for (int64_t c = 0; c < D; c += kW) {
        const vf xh = (load(xr + c) - vmu) * vrs, g = load(dyr + c) * load(S + c);
        store(dxr + c, vrs * (g - m1 - xh * m2));
      }
    }
  });
  std::memset(DS, 0, D * sizeof(float));
  std::memset(DB, 0, D * sizeof(float));
  for (int64_t i = 0; i < items; ++i) {
    const float* ps = part.data() + i * 2 * D;
    for (int64_t c = 0; c < D; c += kW) {
      store(DS + c, load(DS + c) + load(ps + c));
      store(DB + c, load(DB + c) + load(ps + D + c));
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BvlLayerNormFwd, LnFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BvlLayerNormBwd, LnBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
