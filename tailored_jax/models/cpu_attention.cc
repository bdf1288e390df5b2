// Causal grouped-query flash attention for XLA:CPU training (forward and backward), registered
// with jax.ffi by tailored_jax/models/cpu_attention.py, which compiles this file on first use.
// Layouts are the models' own: queries, outputs and their gradients [batch, tokens, heads,
// head_dim]; keys and values [batch, tokens, kv_heads, head_dim]; the key mask [batch, tokens]
// (1 real, 0 padding); the log-sum-exp [batch, heads, tokens]. Float32 throughout. Semantics
// are layers._flash_attention's (masked scores -1e30, probabilities exp(score - lse)).
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64)));

constexpr int kBlock = 64;  // queries and keys per block
constexpr float kNegInf = -1e30f;

inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }
inline v16 splat(float x) { return v16{} + x; }
inline i16 isplat(int64_t x) { return i16{} + int32_t(x); }
inline i16 iota() { return i16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }
inline float hsum(v16 x) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += x[i];
  return s;
}
inline float hmax(v16 x) {
  float m = x[0];
  for (int i = 1; i < 16; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// exp(x) for float32 lanes (Cephes' polynomial; 0 below -87.3, where expf underflows to
// denormals anyway).
inline v16 vexp(v16 x) {
  const v16 lo = splat(-87.33654f), hi = splat(88.37626f);
  i16 under = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const v16 magic = splat(12582912.f);
  v16 n = (x * splat(1.44269504088896341f) + magic) - magic;
  v16 r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  v16 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.f);
  i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
  v16 out = p * (v16)bits;
  return under ? splat(0.f) : out;
}

// C[m, :n] (+)= sum_k A(m, k) * B[k, :n] for 4 rows of C; A(m, k) = a[m * a_row + k * a_col];
// n = 16 * NV columns; ADD: accumulate into C, else overwrite it.
template <int NV, bool ADD>
inline void micro(float* c, int64_t ldc, const float* a, int64_t a_row, int64_t a_col,
                  const float* b, int64_t ldb, int64_t depth) {
  v16 acc[4][NV];
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = ADD ? load(c + r * ldc + 16 * v) : splat(0.f);
  for (int64_t k = 0; k < depth; ++k) {
    v16 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(b + k * ldb + 16 * v);
    for (int r = 0; r < 4; ++r) {
      const float x = a[r * a_row + k * a_col];
      for (int v = 0; v < NV; ++v) acc[r][v] += x * bv[v];
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) store(c + r * ldc + 16 * v, acc[r][v]);
}

// C[rows, cols] (+)= A(rows, depth) @ B[depth, cols]; rows a multiple of 4, cols of 16.
template <bool ADD>
void gemm(float* c, int64_t ldc, const float* a, int64_t a_row, int64_t a_col, const float* b,
          int64_t ldb, int64_t rows, int64_t cols, int64_t depth) {
  for (int64_t j = 0; j < cols; j += 64) {
    const int64_t width = cols - j < 64 ? cols - j : 64;
    for (int64_t i = 0; i < rows; i += 4) {
      float* cc = c + i * ldc + j;
      const float* aa = a + i * a_row;
      switch (width / 16) {
        case 4: micro<4, ADD>(cc, ldc, aa, a_row, a_col, b + j, ldb, depth); break;
        case 3: micro<3, ADD>(cc, ldc, aa, a_row, a_col, b + j, ldb, depth); break;
        case 2: micro<2, ADD>(cc, ldc, aa, a_row, a_col, b + j, ldb, depth); break;
        default: micro<1, ADD>(cc, ldc, aa, a_row, a_col, b + j, ldb, depth); break;
      }
    }
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

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
void parallel_for(ffi::ThreadPool& pool, int64_t items, std::function<void(int64_t)> fn) {
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

struct Dims {
  int64_t batch, tokens, heads, kv_heads, head_dim;
  int64_t group() const { return heads / kv_heads; }
};

// Masks one block of scores in place and scales it: key s of query row r (token q0 + r) is seen
// when it is real, at or before the query and, with a window, within it. Keys [k0, k0 + cols).
inline void mask_scores(float* s, int64_t lds, int64_t rows, int64_t cols, int64_t q0,
                        int64_t k0, int64_t keys_end, const float* key_real, int64_t window,
                        float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t q = q0 + r;
    const int64_t hi = std::min(q + 1, keys_end), lo = window ? q - window + 1 : 0;
    float* row = s + r * lds;
    for (int64_t j = 0; j < cols; j += 16) {
      v16 x = load(row + j) * scale;
      const i16 key = iota() + int32_t(k0 + j);
      const i16 seen = (key < isplat(hi)) & (key >= isplat(lo)) & (load(key_real + k0 + j) > 0.5f);
      store(row + j, seen ? x : splat(kNegInf));
    }
  }
}

struct Inputs {
  Dims d;
  const float *q, *k, *v, *key_real;
  float scale;
  int64_t window;
  int64_t q_row() const { return d.heads * d.head_dim; }
  int64_t kv_row() const { return d.kv_heads * d.head_dim; }
  int64_t padded_tokens() const { return round_up(d.tokens, kBlock); }
  int64_t padded_head_dim() const { return round_up(d.head_dim, 16); }
  int64_t first_key(int64_t q0) const {
    return window ? std::max<int64_t>(0, q0 - window + 1) / 16 * 16 : 0;
  }
};

// Key mask padded with zeros to a multiple of the block (so vector loads past the end read 0).
std::vector<float> padded_key_real(const Inputs& in, int64_t b) {
  std::vector<float> out(in.padded_tokens() + 64, 0.f);
  std::memcpy(out.data(), in.key_real + b * in.d.tokens, in.d.tokens * sizeof(float));
  return out;
}

// Keys (or values) of one row and kv head as [padded tokens, padded head_dim], zero-padded.
void pack_kv(const float* x, const Inputs& in, int64_t b, int64_t kvh, float* out) {
  const int64_t h = in.d.head_dim, hp = in.padded_head_dim();
  std::memset(out, 0, sizeof(float) * in.padded_tokens() * hp);
  for (int64_t t = 0; t < in.d.tokens; ++t)
    std::memcpy(out + t * hp, x + (b * in.d.tokens + t) * in.kv_row() + kvh * h, sizeof(float) * h);
}

// Transposed keys (or values) of one row and kv head: [padded head_dim, padded tokens],
// zero-padded; 16 x 16 tiles, so that neither side strides through more cache lines than a tile.
void pack_transposed(const float* x, const Inputs& in, int64_t b, int64_t kvh, float* out,
                     int64_t ld) {
  const int64_t h = in.d.head_dim, tokens = in.d.tokens, stride = in.kv_row();
  std::memset(out, 0, sizeof(float) * in.padded_head_dim() * ld);
  const float* src = x + b * tokens * stride + kvh * h;
  for (int64_t t0 = 0; t0 < tokens; t0 += 16) {
    const int64_t t1 = std::min<int64_t>(t0 + 16, tokens);
    for (int64_t e0 = 0; e0 < h; e0 += 16) {
      const int64_t e1 = std::min<int64_t>(e0 + 16, h);
      float tile[16][16];
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t e = e0; e < e1; ++e) tile[e - e0][t - t0] = src[t * stride + e];
      for (int64_t e = e0; e < e1; ++e)
        std::memcpy(out + e * ld + t0, tile[e - e0], sizeof(float) * (t1 - t0));
    }
  }
}

// Rows [t0, t0 + rows) of one head of a [batch, tokens, heads, head_dim] array into a [kBlock,
// hp] buffer, zero past the end and past head_dim.
void pack_rows(const float* x, int64_t row_stride, int64_t offset, int64_t t0, int64_t rows,
               int64_t h, int64_t hp, float* out) {
  std::memset(out, 0, sizeof(float) * kBlock * hp);
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(out + r * hp, x + (t0 + r) * row_stride + offset, sizeof(float) * h);
}

void forward(ffi::ThreadPool& pool, const Inputs& in, float* out, float* lse) {
  const Dims d = in.d;
  const int64_t h = d.head_dim, hp = in.padded_head_dim(), tp = in.padded_tokens();
  const int64_t blocks = (d.tokens + kBlock - 1) / kBlock;
  // one item: a row and a kv head, every block of queries of each query head of its group
  parallel_for(pool, d.batch * d.kv_heads, [&](int64_t item) {
    thread_local Scratch kt_s, v_s, q_s, s_s, o_s;
    const int64_t kvh = item % d.kv_heads, b = item / d.kv_heads;
    const std::vector<float> real = padded_key_real(in, b);
    float* kt = kt_s.get(hp * tp);
    float* vp = v_s.get(tp * hp);
    pack_transposed(in.k, in, b, kvh, kt, tp);
    pack_kv(in.v, in, b, kvh, vp);
    float* qb = q_s.get(kBlock * hp);
    float* s = s_s.get(kBlock * tp);
    float* o = o_s.get(kBlock * hp);
    for (int64_t g = 0; g < d.group(); ++g) {
      const int64_t n = kvh * d.group() + g;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t q0 = blk * kBlock, rows = std::min<int64_t>(kBlock, d.tokens - q0);
        const int64_t k0 = in.first_key(q0), keys_end = q0 + rows;
        const int64_t width = round_up(keys_end - k0, 16);
        pack_rows(in.q + b * d.tokens * in.q_row(), in.q_row(), n * h, q0, rows, h, hp, qb);
        gemm<false>(s, width, qb, hp, 1, kt + k0, tp, kBlock, width, hp);
        mask_scores(s, width, rows, width, q0, k0, keys_end, real.data(), in.window, in.scale);
        float sums[kBlock] = {}, maxes[kBlock] = {};
        for (int64_t r = 0; r < kBlock; ++r) {
          float* row = s + r * width;
          if (r >= rows) {
            std::memset(row, 0, sizeof(float) * width);
            continue;
          }
          v16 m = splat(kNegInf);
          for (int64_t j = 0; j < width; j += 16) {
            v16 x = load(row + j);
            m = x > m ? x : m;
          }
          const float top = hmax(m);
          v16 acc = splat(0.f);
          for (int64_t j = 0; j < width; j += 16) {
            // columns past the keys' end are no keys at all
            v16 e = vexp(load(row + j) - top);
            e = iota() + int32_t(k0 + j) < isplat(keys_end) ? e : splat(0.f);
            store(row + j, e);
            acc += e;
          }
          maxes[r] = top;
          sums[r] = hsum(acc);
        }
        gemm<false>(o, hp, s, width, 1, vp + k0 * hp, hp, kBlock, hp, keys_end - k0);
        for (int64_t r = 0; r < rows; ++r) {
          float* dst = out + (b * d.tokens + q0 + r) * in.q_row() + n * h;
          for (int64_t e = 0; e < h; ++e) dst[e] = o[r * hp + e] / sums[r];
          lse[(b * d.heads + n) * d.tokens + q0 + r] = maxes[r] + std::log(sums[r]);
        }
      }
    }
  });
}

void backward(ffi::ThreadPool& pool, const Inputs& in, const float* out, const float* lse,
              const float* dout, const float* dlse, float* dq, float* dk, float* dv) {
  const Dims d = in.d;
  const int64_t h = d.head_dim, hp = in.padded_head_dim(), tp = in.padded_tokens();
  const int64_t blocks = (d.tokens + kBlock - 1) / kBlock;
  // one item: a row and a kv head, all its query heads (their dK, dV summed in place)
  parallel_for(pool, d.batch * d.kv_heads, [&](int64_t item) {
    thread_local Scratch kt_s, vt_s, k_s, dk_s, dv_s, q_s, do_s, dq_s, s_s, dp_s;
    const int64_t kvh = item % d.kv_heads, b = item / d.kv_heads;
    const std::vector<float> real = padded_key_real(in, b);
    float* kt = kt_s.get(hp * tp);
    float* vt = vt_s.get(hp * tp);
    float* kp = k_s.get(tp * hp);
    pack_transposed(in.k, in, b, kvh, kt, tp);
    pack_transposed(in.v, in, b, kvh, vt, tp);
    pack_kv(in.k, in, b, kvh, kp);
    float* dk_acc = dk_s.get(tp * hp);
    float* dv_acc = dv_s.get(tp * hp);
    std::memset(dk_acc, 0, sizeof(float) * tp * hp);
    std::memset(dv_acc, 0, sizeof(float) * tp * hp);
    float* qb = q_s.get(kBlock * hp);
    float* dob = do_s.get(kBlock * hp);
    float* dqb = dq_s.get(kBlock * hp);
    float* p = s_s.get(kBlock * kBlock);
    float* dp = dp_s.get(kBlock * kBlock);
    for (int64_t g = 0; g < d.group(); ++g) {
      const int64_t n = kvh * d.group() + g;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t q0 = blk * kBlock, rows = std::min<int64_t>(kBlock, d.tokens - q0);
        const int64_t k_first = in.first_key(q0), keys_end = q0 + rows;
        pack_rows(in.q + b * d.tokens * in.q_row(), in.q_row(), n * h, q0, rows, h, hp, qb);
        pack_rows(dout + b * d.tokens * in.q_row(), in.q_row(), n * h, q0, rows, h, hp, dob);
        float delta[kBlock] = {}, row_lse[kBlock] = {};
        for (int64_t r = 0; r < rows; ++r) {
          const float* o_row = out + (b * d.tokens + q0 + r) * in.q_row() + n * h;
          float acc = 0.f;
          for (int64_t e = 0; e < h; ++e) acc += dob[r * hp + e] * o_row[e];
          const int64_t at = (b * d.heads + n) * d.tokens + q0 + r;
          delta[r] = acc - dlse[at];
          row_lse[r] = lse[at];
        }
        std::memset(dqb, 0, sizeof(float) * kBlock * hp);
        for (int64_t k0 = k_first; k0 < keys_end; k0 += kBlock) {
          const int64_t keys = std::min<int64_t>(kBlock, keys_end - k0);
          const int64_t width = round_up(keys, 16);
          gemm<false>(p, width, qb, hp, 1, kt + k0, tp, kBlock, width, hp);
          mask_scores(p, width, kBlock, width, q0, k0, keys_end, real.data(), in.window,
                      in.scale);
          for (int64_t r = 0; r < kBlock; ++r) {
            float* row = p + r * width;
            const v16 l = splat(row_lse[r]);
            for (int64_t j = 0; j < width; j += 16) {
              v16 e = vexp(load(row + j) - l);
              e = iota() + int32_t(k0 + j) < isplat(keys_end) ? e : splat(0.f);
              store(row + j, r < rows ? e : splat(0.f));
            }
          }
          // dV[keys] += P^T dO
          gemm<true>(dv_acc + k0 * hp, hp, p, 1, width, dob, hp, width, hp, kBlock);
          gemm<false>(dp, width, dob, hp, 1, vt + k0, tp, kBlock, width, hp);
          for (int64_t r = 0; r < kBlock; ++r) {
            const v16 dl = splat(delta[r]);
            for (int64_t j = 0; j < width; j += 16) {
              v16 ds = load(p + r * width + j) * (load(dp + r * width + j) - dl) * in.scale;
              store(dp + r * width + j, ds);
            }
          }
          // dQ += dS K; dK[keys] += dS^T Q
          gemm<true>(dqb, hp, dp, width, 1, kp + k0 * hp, hp, kBlock, hp, keys);
          gemm<true>(dk_acc + k0 * hp, hp, dp, 1, width, qb, hp, width, hp, kBlock);
        }
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(dq + (b * d.tokens + q0 + r) * in.q_row() + n * h, dqb + r * hp,
                      sizeof(float) * h);
      }
    }
    for (int64_t t = 0; t < d.tokens; ++t) {
      std::memcpy(dk + (b * d.tokens + t) * in.kv_row() + kvh * h, dk_acc + t * hp,
                  sizeof(float) * h);
      std::memcpy(dv + (b * d.tokens + t) * in.kv_row() + kvh * h, dv_acc + t * hp,
                  sizeof(float) * h);
    }
  });
}

Dims dims_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions(), kd = k.dimensions();
  return Dims{qd[0], qd[1], qd[2], kd[2], qd[3]};
}

ffi::Error check(const Dims& d) {
  if (d.kv_heads <= 0 || d.heads % d.kv_heads)
    return ffi::Error::InvalidArgument(
        "cpu flash attention: query heads must be a multiple of kv heads");
  return ffi::Error::Success();
}

ffi::Error FlashForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::F32> key_real, float scale, int64_t window,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  const Dims d = dims_of(q, k);
  if (auto e = check(d); e.failure()) return e;
  Inputs in{d, q.typed_data(), k.typed_data(), v.typed_data(), key_real.typed_data(), scale,
            window};
  forward(pool, in, out->typed_data(), lse->typed_data());
  return ffi::Error::Success();
}

ffi::Error FlashBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                             ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                             ffi::Buffer<ffi::F32> key_real, ffi::Buffer<ffi::F32> out,
                             ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                             ffi::Buffer<ffi::F32> dlse, float scale, int64_t window,
                             ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                             ffi::ResultBuffer<ffi::F32> dv) {
  const Dims d = dims_of(q, k);
  if (auto e = check(d); e.failure()) return e;
  Inputs in{d, q.typed_data(), k.typed_data(), v.typed_data(), key_real.typed_data(), scale,
            window};
  backward(pool, in, out.typed_data(), lse.typed_data(), dout.typed_data(), dlse.typed_data(),
           dq->typed_data(), dk->typed_data(), dv->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TjFlashForward, FlashForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TjFlashBackward, FlashBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
