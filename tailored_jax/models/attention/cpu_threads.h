// Shared by the native CPU kernels (cpu_native.cc, cpu_decode.cc): thread-local scratch and a
// parallel loop over XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace tailored_jax {

// Thread-local scratch, grown on demand and 64-byte aligned.
struct Scratch {
  std::vector<float> data;
  float* get(size_t n) {
    if (data.size() < n + 16) data.resize(n + 16);
    auto p = reinterpret_cast<uintptr_t>(data.data());
    return reinterpret_cast<float*>((p + 63) & ~uintptr_t(63));
  }
};

// Runs fn(0..items-1) on the caller and XLA's intra-op pool. The caller claims items too and
// waits only for items already claimed by running helpers, so it never waits on a queued task.
inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t items, std::function<void(int64_t)> fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t items;
    std::function<void(int64_t)> fn;
  };
  auto state = std::make_shared<State>();
  state->items = items;
  state->fn = std::move(fn);
  auto work = [](State& s) {
    for (int64_t i; (i = s.next.fetch_add(1)) < s.items;) {
      s.fn(i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state, work] { work(*state); });
  work(*state);
  while (state->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

// exp(x) for the float32 lanes of a GCC vector type V (I: its int32 twin); Cephes' polynomial,
// 0 below -87.3, where expf underflows to denormals anyway.
template <typename V, typename I>
inline V vexp(V x) {
  auto splat = [](float c) { return V{} + c; };
  const V lo = splat(-87.33654f), hi = splat(88.37626f);
  I under = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V magic = splat(12582912.f);
  V n = (x * splat(1.44269504088896341f) + magic) - magic;
  V r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  V p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.f);
  I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V out = p * (V)bits;
  return under ? splat(0.f) : out;
}

}  // namespace tailored_jax
