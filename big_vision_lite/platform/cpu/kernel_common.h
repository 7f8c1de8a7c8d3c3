// Shared by the XLA:CPU FFI kernels in this folder: 16-float vectors in GCC vector extensions
// and a parallel loop on XLA's intra-op thread pool. Part of each kernel's build cache key.
#ifndef BIG_VISION_LITE_KERNELS_CPU_KERNEL_COMMON_H_
#define BIG_VISION_LITE_KERNELS_CPU_KERNEL_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace bvl {

namespace ffi = xla::ffi;

constexpr int kW = 16;  // floats per vector
typedef float vf __attribute__((vector_size(kW * sizeof(float))));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
// -0.0 + x == x for every x, so this folds to a plain broadcast (0.0 + x would not).
inline vf splat(float x) { return -vf{} + x; }

// Runs fn(item, scratch) for item in [0, n) on the calling thread and XLA's intra-op pool.
// Helpers that start after the work is gone return at once; the state they touch is shared
// so it outlives this call.
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t n, size_t scratch_floats, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, scratch_floats, &fn]() {
    std::vector<float> scratch;
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      if (scratch.empty()) scratch.resize(scratch_floats);
      fn(i, scratch.data());
      state->done.fetch_add(1);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  // A helper must not touch `fn` (a reference into this frame) once all items are done; it
  // only reaches fn after claiming an item, and this call waits for every claimed item.
  for (int64_t t = 0; t < helpers; ++t) {
    auto copy = work;
    pool.Schedule(std::move(copy));
  }
  work();
  while (state->done.load() < n) std::this_thread::yield();
}

}  // namespace bvl

#endif  // BIG_VISION_LITE_KERNELS_CPU_KERNEL_COMMON_H_
