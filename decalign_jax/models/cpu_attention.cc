// Fused softmax-dropout attention for XLA:CPU, called through the XLA FFI.
//
// The same math as `attention.py` (see there): per row of queries,
// logits = (q . k) / sqrt(C), causal / segment mask, softmax, dropout with
// the 16-bit Threefry draws of `dropout.random_bits16` (bit for bit), then
// weights x values. The backward is FlashAttention's, recomputing the
// weights from the saved row max and sum, so no [.., Q, K] array ever
// leaves the cache. Work is split over (batch x head) pairs on XLA's
// intra-op thread pool.
//
// Keys stay in their natural order, one vector per 16 keys; rows skip the
// vectors their mask leaves empty (a causal row of a time-concatenated
// context touches about half). The four 16-bit draws of a Threefry hash are
// interleaved into key order with shuffles. The backward keeps each pair's
// dlogits and dropped weights and forms dk, dv per key vector in registers.
// Operands are heads-first [..., T, C] or, with `heads_last`, [B, T, H, C].
// The same Threefry draws give `dropout.keep_mask` its masks (DropoutKeep).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int L = 16;  // lanes per vector
typedef float VF __attribute__((vector_size(64)));
typedef int32_t VI __attribute__((vector_size(64)));
typedef uint32_t VU __attribute__((vector_size(64)));
typedef float VF8 __attribute__((vector_size(32)));
typedef float VF4 __attribute__((vector_size(16)));

inline VF splat(float x) { return VF{} + x; }
inline VU splatu(uint32_t x) { return VU{} + x; }

// Pairwise (fixed-order) horizontal sum and max.
inline float hsum(VF v) {
  VF8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  VF4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) +
          __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
inline float hmax(VF v) {
  VF8 x = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  VF8 y = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  VF8 a = x > y ? x : y;
  VF4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3);
  VF4 d = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  VF4 b = c > d ? c : d;
  return std::max(std::max(b[0], b[2]), std::max(b[1], b[3]));
}

// exp by Cody-Waite range reduction and a degree-6 polynomial (Cephes
// expf), relative error ~1e-7. Inputs here are logits minus the row max
// (or the row's log-sum-exp), so <= 0 up to rounding.
inline VF exp_poly(VF x, VF n) {
  x = x - n * 0.693359375f;
  x = x - n * -2.12194440e-4f;
  VF z = x * x;
  VF y = splat(1.9875691500E-4f);
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  return y * z + x + 1.0f;
}

#if defined(__AVX512F__)
// n = round(x / ln 2) by vrndscaleps and 2^n by vscalefps, which also
// underflows to 0 past the float range: no lower clamp and no integer
// exponent arithmetic. The upper clamp stays: a fully masked row's logits
// minus its (-3e38) max must give a finite weight for its 0 mask to zero.
inline VF vexp(VF x) {
  x = x < splat(88.3762626647949f) ? x : splat(88.3762626647949f);
  const VF n = (VF)_mm512_roundscale_ps(
      (__m512)(x * 1.44269504088896341f),
      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return (VF)_mm512_scalef_ps((__m512)exp_poly(x, n), (__m512)n);
}
#else
// Clamped to [-87.3, 88.4], where 2^n is a normal float built in the
// exponent field.
inline VF vexp(VF x) {
  x = x < splat(88.3762626647949f) ? x : splat(88.3762626647949f);
  x = x > splat(-87.3365447504f) ? x : splat(-87.3365447504f);
  // n = round(x / ln 2) by the 1.5 * 2^23 shifter: adding it leaves n in
  // the low mantissa bits (Cephes' floor(x / ln 2 + 0.5), but for ties).
  const VF shifter = splat(12582912.f);
  const VF t = x * 1.44269504088896341f + shifter;
  const VF tf = t - shifter;
  VI ti, ts;
  std::memcpy(&ti, &t, sizeof(ti));
  std::memcpy(&ts, &shifter, sizeof(ts));
  ti -= ts;
  VI e = (ti + 127) << 23;
  VF pow2;
  std::memcpy(&pow2, &e, sizeof(pow2));
  return exp_poly(x, tf) * pow2;
}
#endif

inline VU rotl(VU x, int r) { return (x << r) | (x >> (32 - r)); }

// Threefry-2x32 (20 rounds, as jax.random) of NV vectors of counters
// (hi[v], lo0[v] + lane). The NV chains are independent, so their rounds'
// add-rotate-xor latencies overlap (one chain alone waits on each step).
template <int NV>
inline void threefry16(uint32_t k1, uint32_t k2, const uint32_t* hi,
                       const uint32_t* lo0, VU* y1, VU* y2) {
  const uint32_t ks[3] = {k1, k2, k1 ^ k2 ^ 0x1BD11BDAu};
  static constexpr int kRot[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
  VU lane;
  for (int i = 0; i < L; ++i) lane[i] = uint32_t(i);
  VU a[NV], b[NV];
  for (int v = 0; v < NV; ++v) {
    a[v] = splatu(hi[v] + ks[0]);
    b[v] = lane + (lo0[v] + ks[1]);
  }
#pragma GCC unroll 5
  for (int i = 0; i < 5; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      for (int v = 0; v < NV; ++v) {
        a[v] += b[v];
        b[v] = rotl(b[v], kRot[i % 2][j]) ^ a[v];
      }
    }
    for (int v = 0; v < NV; ++v) {
      a[v] += ks[(i + 1) % 3];
      b[v] += ks[(i + 2) % 3] + uint32_t(i + 1);
    }
  }
  for (int v = 0; v < NV; ++v) {
    y1[v] = a[v];
    y2[v] = b[v];
  }
}

// The four 16-bit draws of a vector of hashes against a keep threshold:
// kept[t] lane i is -1 where draw t of hash i (the low, then high 16 bits
// of y1, then of y2) is below it, else 0.
inline void draws_below(VU y1, VU y2, VU threshold, VI* kept) {
  kept[0] = (y1 & 0xFFFFu) < threshold;
  kept[1] = (y1 >> 16) < threshold;
  kept[2] = (y2 & 0xFFFFu) < threshold;
  kept[3] = (y2 >> 16) < threshold;
}

typedef uint8_t VB16 __attribute__((vector_size(16)));
typedef uint8_t VB32 __attribute__((vector_size(32)));
typedef uint8_t VB64 __attribute__((vector_size(64)));

// bytes[4 i + t] = 1 where kept[t] lane i is set, else 0: the draws of hash
// i in key order, by byte shuffles (a scalar loop over the 64 bytes took
// half of DropoutKeep's time for 64-wide rows).
inline void interleave_keeps(const VI* kept, uint8_t* bytes) {
  VB16 b[4];
  for (int t = 0; t < 4; ++t) b[t] = __builtin_convertvector(kept[t] & 1, VB16);
  const VB32 b01 = __builtin_shufflevector(
      b[0], b[1], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8,
      24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const VB32 b23 = __builtin_shufflevector(
      b[2], b[3], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8,
      24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const VB64 all = __builtin_shufflevector(
      b01, b23, 0, 1, 32, 33, 2, 3, 34, 35, 4, 5, 36, 37, 6, 7, 38, 39, 8, 9,
      40, 41, 10, 11, 42, 43, 12, 13, 44, 45, 14, 15, 46, 47, 16, 17, 48, 49,
      18, 19, 50, 51, 20, 21, 52, 53, 22, 23, 54, 55, 24, 25, 56, 57, 26, 27,
      58, 59, 28, 29, 60, 61, 30, 31, 62, 63);
  std::memcpy(bytes, &all, sizeof(all));
}

// Runs fn(begin, end) over chunks of [0, n) on the calling thread and on
// up to num_threads() pool tasks. The caller never waits on a chunk nobody
// has claimed, so a busy pool cannot deadlock it; late tasks find no work.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, int64_t chunk, F fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n = 0, chunk = 1, num_chunks = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  st->n = n;
  st->chunk = chunk;
  st->num_chunks = (n + chunk - 1) / chunk;
  if (st->num_chunks == 0) return;
  auto work = [st, fn]() {
    for (;;) {
      const int64_t c = st->next.fetch_add(1);
      if (c >= st->num_chunks) return;
      const int64_t b = c * st->chunk;
      fn(b, std::min(st->n, b + st->chunk));
      if (st->done.fetch_add(1) + 1 == st->num_chunks) {
        std::lock_guard<std::mutex> lock(st->mu);
        st->cv.notify_all();
      }
    }
  };
  const int64_t helpers =
      std::min<int64_t>(pool.num_threads(), st->num_chunks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == st->num_chunks; });
}

// Where the rows of one (batch, head) pair live. Heads-first operands are
// [..., T, C]: pair n starts at n*T*C and its rows are C apart. Heads-last
// operands are [B, T, H, C], the layout the q/k/v projections produce: pair
// n = b*H + h starts at b*T*H*C + h*C and its rows are H*C apart, which
// spares XLA the head transposes around the call. Keys sit in their natural
// order in `kp` slots (padded to whole vectors), so rows whose causal mask
// ends early skip whole vectors.
struct Geometry {
  int64_t n, q, k;
  int64_t heads;  // H for heads-last operands, 1 for heads-first
  int64_t kp;     // key slots
  int64_t nb;     // vectors per row, kp / L
  int64_t kh;     // Threefry hashes per row (4 keys each), whole vectors
  Geometry(int64_t n_, int64_t q_, int64_t k_, int64_t heads_)
      : n(n_), q(q_), k(k_), heads(heads_) {
    kp = (k + L - 1) / L * L;
    nb = kp / L;
    kh = ((k + 3) / 4 + L - 1) / L * L;
  }
  // Offset, in floats, of row t of pair `pair` in an operand with `len` rows
  // per pair and c channels.
  int64_t offset(int64_t pair, int64_t t, int64_t len, int64_t c) const {
    const int64_t b = pair / heads, h = pair % heads;
    return ((b * len + t) * heads + h) * c;
  }
};

constexpr int R = 4;  // query rows processed together

// n vectors of this thread's scratch, kept from call to call (contents
// undefined): allocating and zeroing each chunk's buffers anew took ~5% of
// the kernel's time in malloc, free and memset. A thread runs one chunk at a
// time, so one buffer per thread serves forward and backward alike.
VF* thread_scratch(size_t n) {
  thread_local std::vector<VF> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Mask as 0/1 floats per slot; per row the vectors with any key, per block
// of R rows the union of theirs, and per vector the rows in which it has one.
struct Mask {
  std::vector<VF> f;
  std::vector<int32_t> active;  // q lists of up to nb vector indices
  std::vector<int32_t> num_active;
  std::vector<int32_t> block_active;  // ceil(q / R) lists
  std::vector<int32_t> block_num_active;
  std::vector<int32_t> rows;  // nb lists of up to q row indices
  std::vector<int32_t> num_rows;
  Mask(const uint8_t* m, const Geometry& g)
      : f(g.q * g.nb, VF{}), active(g.q * g.nb), num_active(g.q),
        block_active((g.q + R - 1) / R * g.nb),
        block_num_active((g.q + R - 1) / R, 0), rows(g.nb * g.q),
        num_rows(g.nb, 0) {
    float* p = reinterpret_cast<float*>(f.data());
    for (int64_t i = 0; i < g.q; ++i)
      for (int64_t j = 0; j < g.k; ++j)
        p[i * g.kp + j] = m[i * g.k + j] ? 1.f : 0.f;
    std::vector<char> any(g.q * g.nb, 0);
    for (int64_t i = 0; i < g.q; ++i)
      for (int64_t j = 0; j < g.k; ++j)
        any[i * g.nb + j / L] |= m[i * g.k + j] != 0;
    for (int64_t i = 0; i < g.q; ++i) {
      int32_t c = 0;
      for (int64_t b = 0; b < g.nb; ++b) {
        if (!any[i * g.nb + b]) continue;
        active[i * g.nb + c++] = int32_t(b);
        rows[b * g.q + num_rows[b]++] = int32_t(i);
      }
      num_active[i] = c;
    }
    for (int64_t i0 = 0; i0 < g.q; i0 += R) {
      int32_t c = 0;
      for (int64_t b = 0; b < g.nb; ++b) {
        bool u = false;
        for (int64_t i = i0; i < std::min(g.q, i0 + R); ++i)
          u |= any[i * g.nb + b] != 0;
        if (u) block_active[i0 / R * g.nb + c++] = int32_t(b);
      }
      block_num_active[i0 / R] = c;
    }
  }
};

// Keys (or values) of pair n, channel-major: xt[c * nb + b] holds channel c
// of keys 16b .. 16b + 15; padding slots are zero.
template <int C>
void load_slots(const float* x, const Geometry& g, int64_t n, VF* xt) {
  std::fill(xt, xt + C * g.nb, VF{});
  float* p = reinterpret_cast<float*>(xt);
  for (int64_t j = 0; j < g.k; ++j) {
    const float* row = x + g.offset(n, j, g.k, C);
    for (int c = 0; c < C; ++c) p[c * g.kp + j] = row[c];
  }
}

template <int C>
void store_slots(const VF* xt, const Geometry& g, int64_t n, float* x) {
  const float* p = reinterpret_cast<const float*>(xt);
  for (int64_t j = 0; j < g.k; ++j) {
    float* row = x + g.offset(n, j, g.k, C);
    for (int c = 0; c < C; ++c) row[c] = p[c * g.kp + j];
  }
}

// out[c] = horizontal sum of a[c], eight vectors at a time by a transposing
// reduction (23 shuffles and adds where eight hsum calls take ~70).
inline void hsum8(const VF* a, float* out) {
  VF t[4];
  for (int i = 0; i < 4; ++i)  // lanes 0-7: a[2i], 8-15: a[2i+1]
    t[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5,
                                   6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12,
                                   13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  VF u[2];
  for (int i = 0; i < 2; ++i)  // four lanes each of a[4i] .. a[4i+3]
    u[i] = __builtin_shufflevector(t[2 * i], t[2 * i + 1], 0, 1, 2, 3, 8, 9,
                                   10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(t[2 * i], t[2 * i + 1], 4, 5, 6, 7, 12, 13,
                                   14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  // Two lanes each of a[0] .. a[7].
  const VF v = __builtin_shufflevector(u[0], u[1], 0, 1, 4, 5, 8, 9, 12, 13,
                                       16, 17, 20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(u[0], u[1], 2, 3, 6, 7, 10, 11, 14, 15,
                                       18, 19, 22, 23, 26, 27, 30, 31);
  const VF8 w = __builtin_shufflevector(v, v, 0, 2, 4, 6, 8, 10, 12, 14) +
                __builtin_shufflevector(v, v, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int c = 0; c < 8; ++c) out[c] = w[c];
}

template <int C>
inline void hsum_all(const VF* a, float* out) {
  if constexpr (C % 8 == 0) {
    for (int c = 0; c < C; c += 8) hsum8(a + c, out + c);
  } else {
    for (int c = 0; c < C; ++c) out[c] = hsum(a[c]);
  }
}

// out[r] = sum_c xs[r][c] * t[c * nb + b]: NR rows against key vector b,
// NR independent chains.
template <int C, int NR>
inline void rows_dot(const float* const* xs, const VF* t, int64_t nb,
                     int32_t b, VF* out) {
  for (int r = 0; r < NR; ++r) out[r] = VF{};
#pragma GCC unroll 64
  for (int c = 0; c < C; ++c) {
    const VF tv = t[c * nb + b];
    for (int r = 0; r < NR; ++r) out[r] += xs[r][c] * tv;
  }
}

// Unnormalised softmax weights exp(x - max) of NR query rows (pointers qs)
// over the key vectors act, into w[r * nb + b] (other vectors untouched),
// with each row's max and sum of weights into mx, sm. The rows advance
// together so that each key vector feeds NR independent chains of products
// and exps. A vector listed for the block but masked for a row gets weight 0
// there (zeros add exactly, so sums equal the row's own).
template <int C, int NR>
inline void block_exp(const float* const* qs, const VF* kt, const VF* mf,
                      const int32_t* act, int32_t na, int64_t nb,
                      float inv_div, VF* w, float* mx, float* sm) {
  VF vmax[NR], vs[NR];
  for (int r = 0; r < NR; ++r) vmax[r] = splat(-3.0e38f);
  for (int32_t a = 0; a < na; ++a) {
    const int32_t b = act[a];
    VF s[NR];
    rows_dot<C, NR>(qs, kt, nb, b, s);
    for (int r = 0; r < NR; ++r) {
      const VF x = s[r] * inv_div;
      w[r * nb + b] = x;
      vmax[r] = mf[r * nb + b] > 0.f ? (x > vmax[r] ? x : vmax[r]) : vmax[r];
    }
  }
  for (int r = 0; r < NR; ++r) {
    mx[r] = hmax(vmax[r]);
    vs[r] = VF{};
  }
  for (int32_t a = 0; a < na; ++a) {
    const int32_t b = act[a];
    for (int r = 0; r < NR; ++r) {
      const VF p = vexp(w[r * nb + b] - mx[r]) * mf[r * nb + b];
      w[r * nb + b] = p;
      vs[r] += p;
    }
  }
  for (int r = 0; r < NR; ++r) sm[r] = hsum(vs[r]);
}

// The normalised weights of block_exp again, from a row's saved log-sum-exp
// lse = max + log(sum): exp(x - lse), in one pass over the key vectors.
template <int C, int NR>
inline void block_weights(const float* const* qs, const VF* kt, const VF* mf,
                          const int32_t* act, int32_t na, int64_t nb,
                          float inv_div, const float* lse, VF* w) {
  for (int32_t a = 0; a < na; ++a) {
    const int32_t b = act[a];
    VF s[NR];
    rows_dot<C, NR>(qs, kt, nb, b, s);
    for (int r = 0; r < NR; ++r)
      w[r * nb + b] = vexp(s[r] * inv_div - lse[r]) * mf[r * nb + b];
  }
}

// Dropout factors (scale where kept, 0 where dropped) of rows row0 ..
// row0 + NR - 1 for keys 0 .. 64 num_hash - 1 into keep + r * stride,
// in natural key order: key j takes
// draw j % 4 of hash j / 4, the draws of a hash being (low, high) 16 bits of
// its first word, then of its second.
// Not inlined: its unrolled hashes would crowd the callers' hot loops
// (the no-dropout forward ran 6% slower with it inline), and one call
// serves NR rows.
template <int NR>
__attribute__((noinline)) void rows_keep(uint32_t k1, uint32_t k2,
                                         uint32_t row0, int64_t num_hash,
                                         uint32_t threshold, float scale,
                                         VF* keep, int64_t stride) {
  const VU th = splatu(threshold);
  const VF on = splat(scale), off = splat(0.f);
  uint32_t hi[NR], lo[NR];
  for (int r = 0; r < NR; ++r) hi[r] = row0 + uint32_t(r);
  for (int64_t h = 0; h < num_hash; ++h) {
    for (int r = 0; r < NR; ++r) lo[r] = uint32_t(h * L);
    VU y1[NR], y2[NR];
    threefry16<NR>(k1, k2, hi, lo, y1, y2);
    for (int r = 0; r < NR; ++r) {
      // Lane i of d_t: draw t of hash 16h + i.
      VI kept[4];
      draws_below(y1[r], y2[r], th, kept);
      const VF d0 = kept[0] ? on : off, d1 = kept[1] ? on : off;
      const VF d2 = kept[2] ? on : off, d3 = kept[3] ? on : off;
      // Interleave to keys 64h .. 64h + 63: (d0[i], d1[i], d2[i], d3[i]).
      const VF lo01 = __builtin_shufflevector(d0, d1, 0, 16, 1, 17, 2, 18, 3,
                                              19, 4, 20, 5, 21, 6, 22, 7, 23);
      const VF hi01 = __builtin_shufflevector(d0, d1, 8, 24, 9, 25, 10, 26,
                                              11, 27, 12, 28, 13, 29, 14, 30,
                                              15, 31);
      const VF lo23 = __builtin_shufflevector(d2, d3, 0, 16, 1, 17, 2, 18, 3,
                                              19, 4, 20, 5, 21, 6, 22, 7, 23);
      const VF hi23 = __builtin_shufflevector(d2, d3, 8, 24, 9, 25, 10, 26,
                                              11, 27, 12, 28, 13, 29, 14, 30,
                                              15, 31);
      VF* out = keep + r * stride + 4 * h;
      out[0] = __builtin_shufflevector(lo01, lo23, 0, 1, 16, 17, 2, 3, 18,
                                       19, 4, 5, 20, 21, 6, 7, 22, 23);
      out[1] = __builtin_shufflevector(lo01, lo23, 8, 9, 24, 25, 10, 11, 26,
                                       27, 12, 13, 28, 29, 14, 15, 30, 31);
      out[2] = __builtin_shufflevector(hi01, hi23, 0, 1, 16, 17, 2, 3, 18,
                                       19, 4, 5, 20, 21, 6, 7, 22, 23);
      out[3] = __builtin_shufflevector(hi01, hi23, 8, 9, 24, 25, 10, 11, 26,
                                       27, 12, 13, 28, 29, 14, 15, 30, 31);
    }
  }
}

// Hash vectors (64 keys each) up to the last of the ascending active key
// vectors act[0 .. na): the draws of keys no row of the block attends to are
// never read (under a MOSI cross-modal causal mask, the blocks of rows 0-11
// reach key 61 at most: one hash vector of two).
inline int64_t hash_vectors(const int32_t* act, int32_t na) {
  return na ? act[na - 1] / 4 + 1 : 0;
}

struct Params {
  const float *q, *k, *v, *out, *stats, *g;
  uint32_t k1, k2;
  int64_t threshold;  // keep if draw < threshold; 65536 = no dropout
  float drop_scale, inv_div;
};

// fn(std::integral_constant<int, NR>, i0, active vectors, their count) for
// the query rows in blocks of R (over the block's union of active vectors),
// then the remaining rows one at a time.
template <typename F>
inline void for_row_blocks(const Geometry& g, const Mask& mask, F fn) {
  int64_t i0 = 0;
  for (; i0 + R <= g.q; i0 += R)
    fn(std::integral_constant<int, R>{}, i0,
       mask.block_active.data() + i0 / R * g.nb,
       mask.block_num_active[i0 / R]);
  for (; i0 < g.q; ++i0)
    fn(std::integral_constant<int, 1>{}, i0,
       mask.active.data() + i0 * g.nb, mask.num_active[i0]);
}

// Rows i0 .. i0 + NR - 1 of pair n: weights, dropout (if kDrop), weights
// x values.
template <int C, int NR, bool kDrop>
inline void forward_rows(const Geometry& g, const Mask& mask, const Params& p,
                         const VF* kt, const VF* vt, int64_t n, int64_t i0,
                         const int32_t* act, int32_t na, VF* w, VF* keep,
                         float* out, float* stats) {
  const int64_t nb = g.nb, nk = 4 * g.kh / L;
  const float* qs[NR];
  for (int r = 0; r < NR; ++r) qs[r] = p.q + g.offset(n, i0 + r, g.q, C);
  float m[NR], s[NR];
  block_exp<C, NR>(qs, kt, mask.f.data() + i0 * nb, act, na, nb, p.inv_div,
                   w, m, s);
  if constexpr (kDrop)
    rows_keep<NR>(p.k1, p.k2, uint32_t(n * g.q + i0), hash_vectors(act, na),
                  uint32_t(p.threshold), p.drop_scale, keep, nk);
  for (int r = 0; r < NR; ++r) {
    const int64_t row = n * g.q + i0 + r;
    const VF* wr = w + r * nb;
    VF acc[C];
    for (int c = 0; c < C; ++c) acc[c] = VF{};
    for (int32_t a = 0; a < na; ++a) {
      const int32_t b = act[a];
      const VF x = kDrop ? wr[b] * keep[r * nk + b] : wr[b];
#pragma GCC unroll 64
      for (int c = 0; c < C; ++c) acc[c] += x * vt[c * nb + b];
    }
    float* o = out + g.offset(n, i0 + r, g.q, C);
    hsum_all<C>(acc, o);
    // A row with every key masked has sum 0 and stays zero.
    const float inv_s = s[r] > 0.f ? 1.f / s[r] : 0.f;
    for (int c = 0; c < C; ++c) o[c] *= inv_s;
    stats[row * 2] = m[r];
    stats[row * 2 + 1] = s[r];
  }
}

template <int C>
void forward_impl(ffi::ThreadPool& pool, const Geometry& g, const Mask& mask,
                  const Params& p, float* out, float* stats) {
  const bool drop = p.threshold < 65536;
  parallel_for(pool, g.n, 4, [&](int64_t b0, int64_t e0) {
    const int64_t nb = g.nb, nk = 4 * g.kh / L;
    VF* const kt = thread_scratch(2 * C * nb + R * nb + R * nk);
    VF* const vt = kt + C * nb;
    VF* const w = vt + C * nb;
    VF* const keep = w + R * nb;
    for (int64_t n = b0; n < e0; ++n) {
      load_slots<C>(p.k, g, n, kt);
      load_slots<C>(p.v, g, n, vt);
      for_row_blocks(g, mask, [&](auto nr, int64_t i0, const int32_t* act,
                                  int32_t na) {
        constexpr int NR = decltype(nr)::value;
        if (drop)
          forward_rows<C, NR, true>(g, mask, p, kt, vt, n, i0, act, na, w,
                                    keep, out, stats);
        else
          forward_rows<C, NR, false>(g, mask, p, kt, vt, n, i0, act, na, w,
                                     keep, out, stats);
      });
    }
  });
}

// Rows i0 .. i0 + NR - 1 of pair n: recompute the weights, then dlogits and
// the dropped weights into the pair's buffers dl, wd, and dq.
template <int C, int NR>
inline void backward_rows(const Geometry& g, const Mask& mask,
                          const Params& p, const VF* kt, const VF* vt,
                          int64_t n, int64_t i0, const int32_t* act,
                          int32_t na, VF* w, VF* keep, VF* dl, VF* wd,
                          float* dq) {
  const int64_t nb = g.nb, nk = 4 * g.kh / L;
  const float *qs[NR], *gs[NR];
  float lse[NR], d_row[NR];
  for (int r = 0; r < NR; ++r) {
    const int64_t at = g.offset(n, i0 + r, g.q, C);
    const int64_t row = n * g.q + i0 + r;
    qs[r] = p.q + at;
    gs[r] = p.g + at;
    lse[r] = p.stats[row * 2] + std::log(p.stats[row * 2 + 1]);
    // D = rowsum(g * out) replaces a [Q, K] reduction of dW * w.
    d_row[r] = 0.f;
    for (int c = 0; c < C; ++c) d_row[r] += gs[r][c] * p.out[at + c];
  }
  if (p.threshold < 65536)
    rows_keep<NR>(p.k1, p.k2, uint32_t(n * g.q + i0), hash_vectors(act, na),
                  uint32_t(p.threshold), p.drop_scale, keep, nk);
  block_weights<C, NR>(qs, kt, mask.f.data() + i0 * nb, act, na, nb,
                       p.inv_div, lse, w);
  const bool drop = p.threshold < 65536;
  for (int32_t a = 0; a < na; ++a) {
    const int32_t b = act[a];
    VF dw[NR];
    rows_dot<C, NR>(gs, vt, nb, b, dw);
    for (int r = 0; r < NR; ++r) {
      const VF wr = w[r * nb + b];
      const VF kr = drop ? keep[r * nk + b] : splat(1.f);
      dl[(i0 + r) * nb + b] = wr * (dw[r] * kr - d_row[r]) * p.inv_div;
      wd[(i0 + r) * nb + b] = wr * kr;
    }
  }
  for (int r = 0; r < NR; ++r) {
    VF acc[C];
    for (int c = 0; c < C; ++c) acc[c] = VF{};
    const VF* dlr = dl + (i0 + r) * nb;
    for (int32_t a = 0; a < na; ++a) {
      const int32_t b = act[a];
#pragma GCC unroll 64
      for (int c = 0; c < C; ++c) acc[c] += dlr[b] * kt[c * nb + b];
    }
    hsum_all<C>(acc, dq + g.offset(n, i0 + r, g.q, C));
  }
}

// Per pair, two passes. Rows: backward_rows. Key vectors: dk and dv as sums
// over the rows in which the vector is active, accumulated in registers and
// stored once.
template <int C>
void backward_impl(ffi::ThreadPool& pool, const Geometry& g, const Mask& mask,
                   const Params& p, float* dq, float* dk, float* dv) {
  parallel_for(pool, g.n, 4, [&](int64_t b0, int64_t e0) {
    const int64_t nb = g.nb, nk = 4 * g.kh / L;
    VF* const kt = thread_scratch(4 * C * nb + R * nb + R * nk + 2 * g.q * nb);
    VF* const vt = kt + C * nb;
    VF* const dkt = vt + C * nb;
    VF* const dvt = dkt + C * nb;
    VF* const w = dvt + C * nb;
    VF* const keep = w + R * nb;
    VF* const dl = keep + R * nk;
    VF* const wd = dl + g.q * nb;
    for (int64_t n = b0; n < e0; ++n) {
      load_slots<C>(p.k, g, n, kt);
      load_slots<C>(p.v, g, n, vt);
      for_row_blocks(g, mask, [&](auto nr, int64_t i0, const int32_t* act,
                                  int32_t na) {
        backward_rows<C, decltype(nr)::value>(g, mask, p, kt, vt, n, i0, act,
                                              na, w, keep, dl, wd, dq);
      });
      for (int64_t b = 0; b < nb; ++b) {
        VF dka[C], dva[C];
        for (int c = 0; c < C; ++c) dka[c] = dva[c] = VF{};
        const int32_t* rows = mask.rows.data() + b * g.q;
        for (int32_t r = 0; r < mask.num_rows[b]; ++r) {
          const int64_t i = rows[r];
          const int64_t at = g.offset(n, i, g.q, C);
          const VF dli = dl[i * nb + b], wdi = wd[i * nb + b];
#pragma GCC unroll 64
          for (int c = 0; c < C; ++c) {
            dka[c] += p.q[at + c] * dli;
            dva[c] += p.g[at + c] * wdi;
          }
        }
        for (int c = 0; c < C; ++c) {
          dkt[c * nb + b] = dka[c];
          dvt[c * nb + b] = dva[c];
        }
      }
      store_slots<C>(dkt, g, n, dk);
      store_slots<C>(dvt, g, n, dv);
    }
  });
}

// Pairs, rows and keys of the call. Heads-last operands are [B, T, H, C].
Geometry geometry_of(const ffi::Buffer<ffi::F32>& q,
                     const ffi::Buffer<ffi::F32>& k, bool heads_last) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const int64_t r = qd.size();
  if (heads_last)
    return Geometry(qd[0] * qd[2], qd[1], kd[1], qd[2]);
  int64_t n = 1;
  for (int64_t i = 0; i < r - 2; ++i) n *= qd[i];
  return Geometry(n, qd[r - 2], kd[r - 2], 1);
}

#define DECALIGN_HEAD_DIMS(X) X(4) X(8) X(16) X(32) X(64)

// The checks both entry points make, then fn(std::integral_constant<int,
// C>{}, geometry, mask) for the operands' head dim C.
template <typename F>
ffi::Error with_operands(const ffi::Buffer<ffi::F32>& q,
                         const ffi::Buffer<ffi::F32>& k,
                         const ffi::Buffer<ffi::U8>& mask, bool heads_last,
                         F fn) {
  if (heads_last && q.dimensions().size() != 4)
    return ffi::Error::InvalidArgument(
        "cpu_attention: heads_last operands must be [B, T, H, C]");
  const Geometry g = geometry_of(q, k, heads_last);
  if (int64_t(mask.element_count()) != g.q * g.k)
    return ffi::Error::InvalidArgument("cpu_attention: mask is not [Q, K]");
  switch (q.dimensions().back()) {
#define CASE(C)                                                 \
  case C:                                                       \
    fn(std::integral_constant<int, C>{}, g, Mask(mask.typed_data(), g)); \
    return ffi::Error::Success();
    DECALIGN_HEAD_DIMS(CASE)
#undef CASE
    default:
      return ffi::Error::InvalidArgument("cpu_attention: unsupported head dim");
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                   ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::U8> mask, ffi::Buffer<ffi::U32> key,
                   int64_t threshold, float drop_scale, float inv_div,
                   bool heads_last, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> stats) {
  const Params p{q.typed_data(), k.typed_data(), v.typed_data(), nullptr,
                 nullptr, nullptr, key.typed_data()[0], key.typed_data()[1],
                 threshold, drop_scale, inv_div};
  return with_operands(
      q, k, mask, heads_last,
      [&](auto c, const Geometry& geo, const Mask& m) {
        forward_impl<decltype(c)::value>(pool, geo, m, p, out->typed_data(),
                                         stats->typed_data());
      });
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                    ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::U8> mask, ffi::Buffer<ffi::U32> key,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> stats,
                    ffi::Buffer<ffi::F32> g, int64_t threshold,
                    float drop_scale, float inv_div, bool heads_last,
                    ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  const Params p{q.typed_data(), k.typed_data(), v.typed_data(),
                 out.typed_data(), stats.typed_data(), g.typed_data(),
                 key.typed_data()[0], key.typed_data()[1], threshold,
                 drop_scale, inv_div};
  return with_operands(
      q, k, mask, heads_last,
      [&](auto c, const Geometry& geo, const Mask& m) {
        backward_impl<decltype(c)::value>(pool, geo, m, p, dq->typed_data(),
                                          dk->typed_data(), dv->typed_data());
      });
}

// Dropout keep masks, as dropout.keep_mask: keep[row, j] is draw j of the
// row (draw j % 4 of Threefry hash (row, j / 4), as row_keep) under the
// threshold; rows are the leading axes flattened. XLA materialises the
// draws as uint32 pairs and compares them in a second pass; one byte per
// element, hashed NV vectors at a time, is half that memory traffic.
ffi::Error DropoutKeep(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> key,
                       int64_t threshold, ffi::ResultBuffer<ffi::PRED> out) {
  const auto dims = out->dimensions();
  if (dims.size() == 0)
    return ffi::Error::InvalidArgument("dropout_keep: output must be >= 1-D");
  const int64_t n = dims.back();
  const int64_t rows = n ? int64_t(out->element_count()) / n : 0;
  const int64_t vpr = ((n + 3) / 4 + L - 1) / L;  // hash vectors per row
  const int64_t nv = rows * vpr;
  constexpr int NV = 4;
  const uint32_t k1 = key.typed_data()[0], k2 = key.typed_data()[1];
  const VU th = splatu(uint32_t(threshold));
  bool* keep = out->typed_data();
  parallel_for(pool, (nv + NV - 1) / NV, 64, [&](int64_t b0, int64_t e0) {
    for (int64_t blk = b0; blk < e0; ++blk) {
      uint32_t hi[NV], lo[NV];
      for (int v = 0; v < NV; ++v) {  // a short last block repeats vector nv-1
        const int64_t at = std::min(blk * NV + v, nv - 1);
        hi[v] = uint32_t(at / vpr);
        lo[v] = uint32_t(at % vpr * L);
      }
      VU y1[NV], y2[NV];
      threefry16<NV>(k1, k2, hi, lo, y1, y2);
      for (int v = 0; v < NV && blk * NV + v < nv; ++v) {
        VI d[4];
        draws_below(y1[v], y2[v], th, d);
        uint8_t bytes[4 * L];
        interleave_keeps(d, bytes);
        const int64_t j0 = 4 * int64_t(lo[v]);
        std::memcpy(keep + int64_t(hi[v]) * n + j0, bytes,
                    std::min<int64_t>(4 * L, n - j0));
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DecalignAttentionFwd, Forward,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()  // q [..., Q, C]
        .Arg<ffi::Buffer<ffi::F32>>()  // k [..., K, C]
        .Arg<ffi::Buffer<ffi::F32>>()  // v [..., K, C]
        .Arg<ffi::Buffer<ffi::U8>>()   // mask [Q, K]
        .Arg<ffi::Buffer<ffi::U32>>()  // Threefry key words [2]
        .Attr<int64_t>("threshold")
        .Attr<float>("drop_scale")
        .Attr<float>("inv_div")
        .Attr<bool>("heads_last")
        .Ret<ffi::Buffer<ffi::F32>>()   // out [..., Q, C]
        .Ret<ffi::Buffer<ffi::F32>>());  // (row max, row sum) [..., Q, 2]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DecalignAttentionBwd, Backward,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()  // q
        .Arg<ffi::Buffer<ffi::F32>>()  // k
        .Arg<ffi::Buffer<ffi::F32>>()  // v
        .Arg<ffi::Buffer<ffi::U8>>()   // mask
        .Arg<ffi::Buffer<ffi::U32>>()  // key words
        .Arg<ffi::Buffer<ffi::F32>>()  // out
        .Arg<ffi::Buffer<ffi::F32>>()  // row stats
        .Arg<ffi::Buffer<ffi::F32>>()  // g = dL/d out
        .Attr<int64_t>("threshold")
        .Attr<float>("drop_scale")
        .Attr<float>("inv_div")
        .Attr<bool>("heads_last")
        .Ret<ffi::Buffer<ffi::F32>>()   // dq
        .Ret<ffi::Buffer<ffi::F32>>()   // dk
        .Ret<ffi::Buffer<ffi::F32>>());  // dv

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DecalignDropoutKeep, DropoutKeep,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::U32>>()  // Threefry key words [2]
        .Attr<int64_t>("threshold")    // keep if draw < threshold
        .Ret<ffi::Buffer<ffi::PRED>>());  // keep [..., n]
