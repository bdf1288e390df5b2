// Causal grouped-query flash attention for XLA:CPU training (forward and backward), registered
// with jax.ffi by tailored_jax/models/attention/cpu_native.py, which compiles this file on first use.
// Layouts are the models' own: queries, outputs and their gradients [batch, tokens, heads,
// head_dim]; keys and values [batch, tokens, kv_heads, head_dim]; the key mask [batch, tokens]
// (1 real, 0 padding); the log-sum-exp [batch, heads, tokens]; optionally a read-only context
// the rows continue (keys and values [groups, kv_heads, slots, head_dim] shared by groups of
// consecutive rows, its mask per row [batch, slots]) seen by every token under one softmax.
// Float32 throughout. Semantics are layers._flash_attention's (masked scores -1e30,
// probabilities exp(score - lse)).
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "cpu_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using tailored_jax::parallel_for;
using tailored_jax::Scratch;

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64)));
typedef int32_t i16u __attribute__((vector_size(64), aligned(4)));

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

inline v16 vexp(v16 x) { return tailored_jax::vexp<v16, i16>(x); }

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

struct Dims {
  int64_t batch, tokens, heads, kv_heads, head_dim;
  int64_t groups, slots;  // a read-only context: groups of consecutive rows, its keys per group
  int64_t group() const { return heads / kv_heads; }
};

// A block of queries [q0, q0 + rows) and the key-table columns it reads, [first_key, keys_end).
struct QueryBlock {
  int64_t q0, rows, first_key, keys_end;
};

struct Inputs {
  Dims d;
  const float *q, *k, *v, *key_real, *context_k, *context_v, *context_real;
  float scale;
  int64_t window;
  int64_t q_row() const { return d.heads * d.head_dim; }
  int64_t kv_row() const { return d.kv_heads * d.head_dim; }
  int64_t padded_head_dim() const { return round_up(d.head_dim, 16); }
  // the key table's columns: the context's slots, then the row's own tokens
  int64_t own_start() const { return round_up(d.slots, 16); }
  int64_t table_keys() const { return own_start() + round_up(d.tokens, kBlock); }
  int64_t blocks() const { return (d.tokens + kBlock - 1) / kBlock; }
  QueryBlock block(int64_t index) const {
    const int64_t q0 = index * kBlock, rows = std::min<int64_t>(kBlock, d.tokens - q0);
    // a window only without a context
    const int64_t first = window ? own_start() + std::max<int64_t>(0, q0 - window + 1) / 16 * 16 : 0;
    return QueryBlock{q0, rows, first, own_start() + q0 + rows};
  }
};

// Transposes rows x cols of `src` (leading dimension lds) into `dst` (leading dimension ldd),
// 16 x 16 tiles at a time, so that neither side strides through more cache lines than a tile.
void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
               int64_t ldd) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t r1 = std::min<int64_t>(r0 + 16, rows);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t c1 = std::min<int64_t>(c0 + 16, cols);
      float tile[16][16];
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) tile[c - c0][r - r0] = src[r * lds + c];
      for (int64_t c = c0; c < c1; ++c)
        std::memcpy(dst + c * ldd + r0, tile[c - c0], sizeof(float) * (r1 - r0));
    }
  }
}

// One row's and kv head's keys (or values): the context's slots, then its own tokens, as
// [table keys, padded head_dim] rows and (given `transposed`) transposed; zero where padded.
void pack_table(const float* own, const float* context, const Inputs& in, int64_t b,
                int64_t kvh, float* rows, float* transposed) {
  const int64_t h = in.d.head_dim, hp = in.padded_head_dim(), keys = in.table_keys();
  std::memset(rows, 0, sizeof(float) * keys * hp);
  if (in.d.slots) {
    const int64_t g = b / (in.d.batch / in.d.groups);
    const float* src = context + ((g * in.d.kv_heads + kvh) * in.d.slots) * h;
    for (int64_t s = 0; s < in.d.slots; ++s)
      std::memcpy(rows + s * hp, src + s * h, sizeof(float) * h);
  }
  for (int64_t t = 0; t < in.d.tokens; ++t)
    std::memcpy(rows + (in.own_start() + t) * hp,
                own + (b * in.d.tokens + t) * in.kv_row() + kvh * h, sizeof(float) * h);
  if (transposed) {
    std::memset(transposed, 0, sizeof(float) * hp * keys);
    transpose(rows, hp, keys, hp, transposed, keys);
  }
}

// Which key-table columns are real (1) and their positions: context slots before every token
// (-1), own tokens at their index.
void key_columns(const Inputs& in, int64_t b, float* real, int32_t* pos) {
  const int64_t keys = in.table_keys(), start = in.own_start();
  for (int64_t j = 0; j < keys + 16; ++j) {
    real[j] = 0.f;
    pos[j] = j < start ? -1 : int32_t(j - start);
  }
  for (int64_t s = 0; s < in.d.slots; ++s) real[s] = in.context_real[b * in.d.slots + s];
  for (int64_t t = 0; t < in.d.tokens; ++t) real[start + t] = in.key_real[b * in.d.tokens + t];
}

// One row's and one kv head's key table in this thread's scratch: keys as rows and transposed,
// values as rows (and transposed, for the backward), which columns are real and their positions.
struct RowKeys {
  float *kt, *kp, *vp, *vt, *real;
  const int32_t* pos;
};

RowKeys row_keys(const Inputs& in, int64_t b, int64_t kvh, bool transposed_values) {
  thread_local Scratch kt_s, kp_s, vp_s, vt_s, real_s;
  thread_local std::vector<int32_t> pos;
  const int64_t hp = in.padded_head_dim(), keys = in.table_keys();
  pos.resize(keys + 16);
  RowKeys out{kt_s.get(hp * keys), kp_s.get(keys * hp), vp_s.get(keys * hp),
              transposed_values ? vt_s.get(hp * keys) : nullptr, real_s.get(keys + 16), pos.data()};
  pack_table(in.k, in.context_k, in, b, kvh, out.kp, out.kt);
  pack_table(in.v, in.context_v, in, b, kvh, out.vp, out.vt);
  key_columns(in, b, out.real, pos.data());
  return out;
}

// Scales one block of scores and masks it (-1e30): a key is seen when it is real, at or before
// the query (token q0 + r) and, with a window, within it. Key-table columns [k0, k0 + cols).
inline void mask_scores(float* s, int64_t lds, int64_t rows, int64_t cols, int64_t q0,
                        int64_t k0, const float* real, const int32_t* pos, int64_t window,
                        float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t q = q0 + r;
    float* row = s + r * lds;
    for (int64_t j = 0; j < cols; j += 16) {
      const i16 key = *reinterpret_cast<const i16u*>(pos + k0 + j);
      i16 seen = (key <= isplat(q)) & (load(real + k0 + j) > 0.5f);
      if (window) seen &= key > isplat(q - window);
      store(row + j, seen ? load(row + j) * scale : splat(kNegInf));
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

// exp(row - shift) over key-table columns [k0, k0 + width), zero from column `end` on (not
// keys of this block); returns the sum.
inline float exp_row(float* row, int64_t width, int64_t k0, int64_t end, float shift) {
  v16 acc = splat(0.f);
  for (int64_t j = 0; j < width; j += 16) {
    v16 e = vexp(load(row + j) - shift);
    e = iota() + int32_t(k0 + j) < isplat(end) ? e : splat(0.f);
    store(row + j, e);
    acc += e;
  }
  return hsum(acc);
}

void forward(ffi::ThreadPool& pool, const Inputs& in, float* out, float* lse) {
  const Dims d = in.d;
  const int64_t h = d.head_dim, hp = in.padded_head_dim(), keys = in.table_keys();
  // one item: a row and a kv head, every block of queries of each query head of its group
  parallel_for(pool, d.batch * d.kv_heads, [&](int64_t item) {
    thread_local Scratch q_s, s_s, o_s;
    const int64_t kvh = item % d.kv_heads, b = item / d.kv_heads;
    const RowKeys t = row_keys(in, b, kvh, false);
    float* qb = q_s.get(kBlock * hp);
    float* s = s_s.get(kBlock * keys);
    float* o = o_s.get(kBlock * hp);
    for (int64_t g = 0; g < d.group(); ++g) {
      const int64_t n = kvh * d.group() + g;
      for (int64_t blk = 0; blk < in.blocks(); ++blk) {
        const auto [q0, rows, k0, keys_end] = in.block(blk);
        const int64_t width = round_up(keys_end - k0, 16);
        pack_rows(in.q + b * d.tokens * in.q_row(), in.q_row(), n * h, q0, rows, h, hp, qb);
        gemm<false>(s, width, qb, hp, 1, t.kt + k0, keys, kBlock, width, hp);
        mask_scores(s, width, rows, width, q0, k0, t.real, t.pos, in.window, in.scale);
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
          maxes[r] = hmax(m);
          sums[r] = exp_row(row, width, k0, keys_end, maxes[r]);
        }
        gemm<false>(o, hp, s, width, 1, t.vp + k0 * hp, hp, kBlock, hp, keys_end - k0);
        for (int64_t r = 0; r < rows; ++r) {
          float* dst = out + (b * d.tokens + q0 + r) * in.q_row() + n * h;
          for (int64_t e = 0; e < h; ++e) dst[e] = o[r * hp + e] / sums[r];
          lse[(b * d.heads + n) * d.tokens + q0 + r] = maxes[r] + std::log(sums[r]);
        }
      }
    }
  });
}

struct Gradients {
  float *dq, *dk, *dv, *context_dk, *context_dv;
};

void backward(ffi::ThreadPool& pool, const Inputs& in, const float* out, const float* lse,
              const float* dout, const float* dlse, Gradients grads) {
  const Dims d = in.d;
  const int64_t h = d.head_dim, hp = in.padded_head_dim(), keys = in.table_keys();
  // one item: a row and a kv head, all its query heads (their dK, dV summed in place)
  parallel_for(pool, d.batch * d.kv_heads, [&](int64_t item) {
    thread_local Scratch dk_s, dv_s, q_s, do_s, dq_s, s_s, dp_s;
    const int64_t kvh = item % d.kv_heads, b = item / d.kv_heads;
    const RowKeys t = row_keys(in, b, kvh, true);
    float* dk_acc = dk_s.get(keys * hp);
    float* dv_acc = dv_s.get(keys * hp);
    std::memset(dk_acc, 0, sizeof(float) * keys * hp);
    std::memset(dv_acc, 0, sizeof(float) * keys * hp);
    float* qb = q_s.get(kBlock * hp);
    float* dob = do_s.get(kBlock * hp);
    float* dqb = dq_s.get(kBlock * hp);
    float* p = s_s.get(kBlock * kBlock);
    float* dp = dp_s.get(kBlock * kBlock);
    for (int64_t g = 0; g < d.group(); ++g) {
      const int64_t n = kvh * d.group() + g;
      for (int64_t blk = 0; blk < in.blocks(); ++blk) {
        const auto [q0, rows, k_first, keys_end] = in.block(blk);
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
          const int64_t block_keys = std::min<int64_t>(kBlock, keys_end - k0);
          const int64_t width = round_up(block_keys, 16);
          gemm<false>(p, width, qb, hp, 1, t.kt + k0, keys, kBlock, width, hp);
          mask_scores(p, width, kBlock, width, q0, k0, t.real, t.pos, in.window, in.scale);
          for (int64_t r = 0; r < kBlock; ++r) {
            if (r < rows)
              exp_row(p + r * width, width, k0, keys_end, row_lse[r]);
            else
              std::memset(p + r * width, 0, sizeof(float) * width);
          }
          // dV[keys] += P^T dO
          gemm<true>(dv_acc + k0 * hp, hp, p, 1, width, dob, hp, width, hp, kBlock);
          gemm<false>(dp, width, dob, hp, 1, t.vt + k0, keys, kBlock, width, hp);
          for (int64_t r = 0; r < kBlock; ++r) {
            const v16 dl = splat(delta[r]);
            for (int64_t j = 0; j < width; j += 16) {
              v16 ds = load(p + r * width + j) * (load(dp + r * width + j) - dl) * in.scale;
              store(dp + r * width + j, ds);
            }
          }
          // dQ += dS K; dK[keys] += dS^T Q
          gemm<true>(dqb, hp, dp, width, 1, t.kp + k0 * hp, hp, kBlock, hp, block_keys);
          gemm<true>(dk_acc + k0 * hp, hp, dp, 1, width, qb, hp, width, hp, kBlock);
        }
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(grads.dq + (b * d.tokens + q0 + r) * in.q_row() + n * h, dqb + r * hp,
                      sizeof(float) * h);
      }
    }
    for (int64_t t = 0; t < d.tokens; ++t) {
      const int64_t at = (b * d.tokens + t) * in.kv_row() + kvh * h;
      std::memcpy(grads.dk + at, dk_acc + (in.own_start() + t) * hp, sizeof(float) * h);
      std::memcpy(grads.dv + at, dv_acc + (in.own_start() + t) * hp, sizeof(float) * h);
    }
    for (int64_t s = 0; s < d.slots; ++s) {  // per row: [batch, kv_heads, slots, head_dim]
      const int64_t at = ((b * d.kv_heads + kvh) * d.slots + s) * h;
      std::memcpy(grads.context_dk + at, dk_acc + s * hp, sizeof(float) * h);
      std::memcpy(grads.context_dv + at, dv_acc + s * hp, sizeof(float) * h);
    }
  });
}

using F32 = ffi::Buffer<ffi::F32>;

ffi::ErrorOr<Inputs> inputs_of(F32& q, F32& k, F32& v, F32& key_real, F32& context_k,
                               F32& context_v, F32& context_real, float scale, int64_t window) {
  auto qd = q.dimensions(), kd = k.dimensions(), cd = context_k.dimensions();
  const Dims d{qd[0], qd[1], qd[2], kd[2], qd[3], cd[0], cd[2]};
  if (d.kv_heads <= 0 || d.heads % d.kv_heads)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "cpu flash attention: query heads must be a multiple of kv heads"));
  if (d.slots && (d.groups <= 0 || d.batch % d.groups || window))
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "cpu flash attention: a context needs rows a multiple of its groups and no window"));
  return Inputs{d, q.typed_data(), k.typed_data(), v.typed_data(), key_real.typed_data(),
                context_k.typed_data(), context_v.typed_data(), context_real.typed_data(), scale,
                window};
}

ffi::Error FlashForwardImpl(ffi::ThreadPool pool, F32 q, F32 k, F32 v, F32 key_real,
                            F32 context_k, F32 context_v, F32 context_real, float scale,
                            int64_t window, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse) {
  auto in = inputs_of(q, k, v, key_real, context_k, context_v, context_real, scale, window);
  if (in.has_error()) return in.error();
  forward(pool, in.value(), out->typed_data(), lse->typed_data());
  return ffi::Error::Success();
}

ffi::Error FlashBackwardImpl(ffi::ThreadPool pool, F32 q, F32 k, F32 v, F32 key_real,
                             F32 context_k, F32 context_v, F32 context_real, F32 out, F32 lse,
                             F32 dout, F32 dlse, float scale, int64_t window,
                             ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                             ffi::ResultBuffer<ffi::F32> dv,
                             ffi::ResultBuffer<ffi::F32> context_dk,
                             ffi::ResultBuffer<ffi::F32> context_dv) {
  auto in = inputs_of(q, k, v, key_real, context_k, context_v, context_real, scale, window);
  if (in.has_error()) return in.error();
  backward(pool, in.value(), out.typed_data(), lse.typed_data(), dout.typed_data(),
           dlse.typed_data(),
           Gradients{dq->typed_data(), dk->typed_data(), dv->typed_data(),
                     context_dk->typed_data(), context_dv->typed_data()});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TjFlashForward, FlashForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()  // q [batch, tokens, heads, head_dim]
                                  .Arg<F32>()  // k [batch, tokens, kv_heads, head_dim]
                                  .Arg<F32>()  // v
                                  .Arg<F32>()  // key_real [batch, tokens]
                                  .Arg<F32>()  // context_k [groups, kv_heads, slots, head_dim]
                                  .Arg<F32>()  // context_v
                                  .Arg<F32>()  // context_real [batch, slots]
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Ret<F32>()  // out [batch, tokens, heads, head_dim]
                                  .Ret<F32>());  // lse [batch, heads, tokens]

XLA_FFI_DEFINE_HANDLER_SYMBOL(TjFlashBackward, FlashBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()  // q
                                  .Arg<F32>()  // k
                                  .Arg<F32>()  // v
                                  .Arg<F32>()  // key_real
                                  .Arg<F32>()  // context_k
                                  .Arg<F32>()  // context_v
                                  .Arg<F32>()  // context_real
                                  .Arg<F32>()  // out
                                  .Arg<F32>()  // lse
                                  .Arg<F32>()  // dout
                                  .Arg<F32>()  // dlse
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Ret<F32>()  // dq
                                  .Ret<F32>()  // dk
                                  .Ret<F32>()  // dv
                                  .Ret<F32>()  // context_dk per row [batch, kv_heads, slots, head_dim]
                                  .Ret<F32>());  // context_dv per row
