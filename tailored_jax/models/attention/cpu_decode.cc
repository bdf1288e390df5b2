// One-token decode attention for XLA:CPU over one part of the keys (a context or a row's own
// buffer), registered with jax.ffi by tailored_jax/models/attention/cpu_native.py: the blockwise
// XLA form copies every 32-slot chunk of the cache out before its small batched matmuls, and
// that was half of SmolLM2's decode step. Here each (row, kv head) reads its valid slots in
// place. Layouts are the cache's: queries [batch, kv_heads, x, head_dim] (x: the query heads of
// a kv head); keys and values [groups, kv_heads, slots, head_dim] shared by groups of
// consecutive rows (groups = batch: each row its own); the mask [batch, slots]. Outputs are a
// softmax part over the slots a row's mask keeps, in slot order: the scaled scores' maximum
// (-1e30 where none is kept), the sum of exp(score - max) and the weighted sum of values
// ([batch, kv_heads, x] and [batch, kv_heads, x, head_dim]), merged with the other parts by
// attention/cached.py. A row's numbers depend only on its kept slots' keys and values, never on
// the buffer's width or the other rows. Float32; head_dim a multiple of 8 (8-float vectors:
// AVX2 and AVX-512 alike).
#include <cstdint>
#include <cstring>

#include "cpu_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using tailored_jax::parallel_for;
using tailored_jax::Scratch;

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef int32_t i8 __attribute__((vector_size(32)));

constexpr float kNegInf = -1e30f;
constexpr int64_t kMaxQueries = 16;  // x: query heads per kv head

inline v8 load(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store(float* p, v8 x) { *reinterpret_cast<v8u*>(p) = x; }
inline float hsum(v8 x) {
  return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

struct Part {
  int64_t batch, kv_heads, queries, head_dim, groups, slots;
  const float *q, *k, *v;
  const bool* mask;
  float scale;
  float *max, *sum, *out;
};

void decode_part(ffi::ThreadPool& pool, const Part& p) {
  const int64_t h = p.head_dim, x = p.queries, s_all = p.slots, per_group = p.batch / p.groups;
  parallel_for(pool, p.batch * p.kv_heads, [&](int64_t item) {
    thread_local Scratch scores_s;
    thread_local std::vector<int32_t> kept;
    const int64_t row = item / p.kv_heads, head = item % p.kv_heads;
    const int64_t table = (row / per_group) * p.kv_heads + head;
    const float* k = p.k + table * s_all * h;
    const float* v = p.v + table * s_all * h;
    const bool* mask = p.mask + row * s_all;
    kept.clear();
    for (int64_t s = 0; s < s_all; ++s)
      if (mask[s]) kept.push_back(int32_t(s));
    const int64_t n = int64_t(kept.size()), stride = (n + 7) / 8 * 8;
    float* scores = scores_s.get(size_t(x * stride));
    const float* q = p.q + item * x * h;
    for (int64_t i = 0; i < n; ++i) {
      const float* key = k + kept[i] * h;
      v8 acc[kMaxQueries];
      for (int64_t j = 0; j < x; ++j) acc[j] = v8{};
      for (int64_t d = 0; d < h; d += 8) {
        const v8 kd = load(key + d);
        for (int64_t j = 0; j < x; ++j) acc[j] += load(q + j * h + d) * kd;
      }
      for (int64_t j = 0; j < x; ++j) scores[j * stride + i] = hsum(acc[j]) * p.scale;
    }
    for (int64_t j = 0; j < x; ++j) {
      float* sj = scores + j * stride;
      float top = kNegInf;
      for (int64_t i = 0; i < n; ++i) top = sj[i] > top ? sj[i] : top;
      for (int64_t i = n; i < stride; ++i) sj[i] = kNegInf;
      v8 total = v8{};
      for (int64_t i = 0; i < stride; i += 8) {
        const v8 w = tailored_jax::vexp<v8, i8>(load(sj + i) - top);
        store(sj + i, w);
        total += w;
      }
      p.max[item * x + j] = top;
      p.sum[item * x + j] = n ? hsum(total) : 0.f;
    }
    float* out = p.out + item * x * h;
    std::memset(out, 0, sizeof(float) * x * h);
    for (int64_t i = 0; i < n; ++i) {
      const float* value = v + kept[i] * h;
      for (int64_t j = 0; j < x; ++j) {
        const float w = scores[j * stride + i];
        float* o = out + j * h;
        for (int64_t d = 0; d < h; d += 8) store(o + d, load(o + d) + w * load(value + d));
      }
    }
  });
}

using F32 = ffi::Buffer<ffi::F32>;

ffi::Error DecodePartImpl(ffi::ThreadPool pool, F32 q, F32 k, F32 v, ffi::Buffer<ffi::PRED> mask,
                          float scale, ffi::ResultBuffer<ffi::F32> max,
                          ffi::ResultBuffer<ffi::F32> sum, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  const Part part{qd[0], qd[1], qd[2], qd[3], kd[0], kd[2], q.typed_data(), k.typed_data(),
                  v.typed_data(), mask.typed_data(), scale, max->typed_data(),
                  sum->typed_data(), out->typed_data()};
  if (part.head_dim % 8 || kd[3] != part.head_dim || kd[1] != part.kv_heads)
    return ffi::Error::InvalidArgument(
        "cpu decode attention: keys must be [groups, kv_heads, slots, head_dim] with the "
        "queries' kv_heads and a head_dim that is a multiple of 8");
  if (part.queries > kMaxQueries || part.groups <= 0 || part.batch % part.groups)
    return ffi::Error::InvalidArgument(
        "cpu decode attention: at most 16 query heads per kv head, and rows a multiple of the "
        "keys' groups");
  if (md[0] != part.batch || md[1] != part.slots)
    return ffi::Error::InvalidArgument("cpu decode attention: the mask must be [batch, slots]");
  decode_part(pool, part);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TjDecodePart, DecodePartImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()  // q [batch, kv_heads, x, head_dim]
                                  .Arg<F32>()  // k [groups, kv_heads, slots, head_dim]
                                  .Arg<F32>()  // v
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [batch, slots]
                                  .Attr<float>("scale")
                                  .Ret<F32>()  // max [batch, kv_heads, x]
                                  .Ret<F32>()  // sum [batch, kv_heads, x]
                                  .Ret<F32>());  // out [batch, kv_heads, x, head_dim]
