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
// Key positions are held slot-major inside a pair: key j = 4h + t sits at
// t * KH + h, so the four 16-bit draws of Threefry hash h (both output
// words, low half first) fill whole vectors. Softmax and the products sum
// over keys, so the layout only changes the order of float additions.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

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
// expf), relative error ~1e-7 on the clamped range [-87.3, 88.4]. Inputs
// here are logits minus the row max, so <= 0.
inline VF vexp(VF x) {
  x = x < splat(88.3762626647949f) ? x : splat(88.3762626647949f);
  x = x > splat(-87.3365447504f) ? x : splat(-87.3365447504f);
  VF fx = x * 1.44269504088896341f + 0.5f;
  VF tf = __builtin_convertvector(__builtin_convertvector(fx, VI), VF);
  tf = tf > fx ? tf - 1.f : tf;  // floor
  VI ti = __builtin_convertvector(tf, VI);
  x = x - tf * 0.693359375f;
  x = x - tf * -2.12194440e-4f;
  VF z = x * x;
  VF y = splat(1.9875691500E-4f);
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * z + x + 1.0f;
  VI e = (ti + 127) << 23;
  VF pow2;
  std::memcpy(&pow2, &e, sizeof(pow2));
  return y * pow2;
}

inline VU rotl(VU x, int r) { return (x << r) | (x >> (32 - r)); }

// Threefry-2x32 (20 rounds, as jax.random) of counters (hi, lo0 + lane).
inline void threefry16(uint32_t k1, uint32_t k2, uint32_t hi, uint32_t lo0,
                       VU* y1, VU* y2) {
  const uint32_t ks[3] = {k1, k2, k1 ^ k2 ^ 0x1BD11BDAu};
  static constexpr int kRot[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
  VU lane;
  for (int i = 0; i < L; ++i) lane[i] = lo0 + i;
  VU a = splatu(hi + ks[0]), b = lane + ks[1];
#pragma GCC unroll 5
  for (int i = 0; i < 5; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      a += b;
      b = rotl(b, kRot[i % 2][j]) ^ a;
    }
    a += ks[(i + 1) % 3];
    b += ks[(i + 2) % 3] + uint32_t(i + 1);
  }
  *y1 = a;
  *y2 = b;
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

struct Layout {
  int64_t n, q, k;
  int64_t kh;  // Threefry hashes per row, padded to whole vectors
  int64_t kp;  // key slots, 4 * kh
  int64_t nb;  // vectors per row, kp / L
  Layout(int64_t n_, int64_t q_, int64_t k_) : n(n_), q(q_), k(k_) {
    kh = ((k + 3) / 4 + L - 1) / L * L;
    kp = 4 * kh;
    nb = kp / L;
  }
  int64_t pos(int64_t j) const { return (j % 4) * kh + j / 4; }
};

// Mask as 0/1 floats per slot, and per row the vectors with any key.
struct Mask {
  std::vector<VF> f;
  std::vector<int32_t> active;  // q rows of up to nb vector indices
  std::vector<int32_t> num_active;
  Mask(const uint8_t* m, const Layout& lay)
      : f(lay.q * lay.nb, VF{}), active(lay.q * lay.nb), num_active(lay.q) {
    float* p = reinterpret_cast<float*>(f.data());
    for (int64_t i = 0; i < lay.q; ++i)
      for (int64_t j = 0; j < lay.k; ++j)
        p[i * lay.kp + lay.pos(j)] = m[i * lay.k + j] ? 1.f : 0.f;
    for (int64_t i = 0; i < lay.q; ++i) {
      int32_t c = 0;
      for (int64_t b = 0; b < lay.nb; ++b) {
        const VF v = f[i * lay.nb + b];
        bool any = false;
        for (int l = 0; l < L; ++l) any |= v[l] != 0.f;
        if (any) active[i * lay.nb + c++] = int32_t(b);
      }
      num_active[i] = c;
    }
  }
};

template <int C>
void load_slots(const float* x, const Layout& lay, VF* xt) {
  std::fill(xt, xt + C * lay.nb, VF{});
  float* p = reinterpret_cast<float*>(xt);
  for (int64_t j = 0; j < lay.k; ++j) {
    const int64_t s = lay.pos(j);
    for (int c = 0; c < C; ++c) p[c * lay.kp + s] = x[j * C + c];
  }
}

template <int C>
void store_slots(const VF* xt, const Layout& lay, float* x) {
  const float* p = reinterpret_cast<const float*>(xt);
  for (int64_t j = 0; j < lay.k; ++j) {
    const int64_t s = lay.pos(j);
    for (int c = 0; c < C; ++c) x[j * C + c] = p[c * lay.kp + s];
  }
}

// Softmax weights of one query row into w (inactive vectors untouched).
// With have_stats the row max and sum are taken from *mx, *sm.
template <int C>
inline void row_weights(const float* qi, const VF* kt, const VF* mf,
                        const int32_t* act, int32_t na, const Layout& lay,
                        float inv_div, VF* w, float* mx, float* sm,
                        bool have_stats) {
  const int64_t nb = lay.nb;
  VF vmax = splat(-3.0e38f);
  for (int32_t a = 0; a < na; ++a) {
    const int32_t b = act[a];
    VF s = VF{};
#pragma GCC unroll 64
    for (int c = 0; c < C; ++c) s += qi[c] * kt[c * nb + b];
    s = s * inv_div;
    w[b] = s;
    vmax = mf[b] > 0.f ? (s > vmax ? s : vmax) : vmax;
  }
  const float m = have_stats ? *mx : hmax(vmax);
  VF vs = VF{};
  for (int32_t a = 0; a < na; ++a) {
    const int32_t b = act[a];
    const VF p = vexp(w[b] - m) * mf[b];
    w[b] = p;
    vs += p;
  }
  const float s = have_stats ? *sm : hsum(vs);
  const float inv_s = 1.f / s;
  for (int32_t a = 0; a < na; ++a) w[act[a]] = w[act[a]] * inv_s;
  *mx = m;
  *sm = s;
}

// Dropout factors (scale where kept, 0 where dropped) of one row.
inline void row_keep(uint32_t k1, uint32_t k2, uint32_t row, const Layout& lay,
                     uint32_t threshold, float scale, VF* keep) {
  const int64_t hb = lay.kh / L;
  const VU th = splatu(threshold);
  for (int64_t h = 0; h < hb; ++h) {
    VU y1, y2;
    threefry16(k1, k2, row, uint32_t(h * L), &y1, &y2);
    const VU draws[4] = {y1 & 0xFFFFu, y1 >> 16, y2 & 0xFFFFu, y2 >> 16};
    for (int t = 0; t < 4; ++t)
      keep[t * hb + h] = draws[t] < th ? splat(scale) : splat(0.f);
  }
}

struct Params {
  const float *q, *k, *v, *out, *stats, *g;
  uint32_t k1, k2;
  int64_t threshold;  // keep if draw < threshold; 65536 = no dropout
  float drop_scale, inv_div;
};

template <int C>
void forward_impl(ffi::ThreadPool& pool, const Layout& lay, const Mask& mask,
                  const Params& p, float* out, float* stats) {
  const bool drop = p.threshold < 65536;
  parallel_for(pool, lay.n, 4, [&](int64_t b0, int64_t e0) {
    const int64_t nb = lay.nb;
    std::vector<VF> kt(C * nb), vt(C * nb), w(nb), keep(nb);
    for (int64_t n = b0; n < e0; ++n) {
      load_slots<C>(p.k + n * lay.k * C, lay, kt.data());
      load_slots<C>(p.v + n * lay.k * C, lay, vt.data());
      for (int64_t i = 0; i < lay.q; ++i) {
        const int64_t row = n * lay.q + i;
        const int32_t* act = mask.active.data() + i * nb;
        const int32_t na = mask.num_active[i];
        float m = 0.f, s = 0.f;
        row_weights<C>(p.q + row * C, kt.data(), mask.f.data() + i * nb, act,
                       na, lay, p.inv_div, w.data(), &m, &s, false);
        if (drop) {
          row_keep(p.k1, p.k2, uint32_t(row), lay, uint32_t(p.threshold),
                   p.drop_scale, keep.data());
          for (int32_t a = 0; a < na; ++a) w[act[a]] = w[act[a]] * keep[act[a]];
        }
        VF acc[C];
        for (int c = 0; c < C; ++c) acc[c] = VF{};
        for (int32_t a = 0; a < na; ++a) {
          const int32_t b = act[a];
#pragma GCC unroll 64
          for (int c = 0; c < C; ++c) acc[c] += w[b] * vt[c * nb + b];
        }
        for (int c = 0; c < C; ++c) out[row * C + c] = hsum(acc[c]);
        stats[row * 2] = m;
        stats[row * 2 + 1] = s;
      }
    }
  });
}

template <int C>
void backward_impl(ffi::ThreadPool& pool, const Layout& lay, const Mask& mask,
                   const Params& p, float* dq, float* dk, float* dv) {
  const bool drop = p.threshold < 65536;
  parallel_for(pool, lay.n, 4, [&](int64_t b0, int64_t e0) {
    const int64_t nb = lay.nb;
    std::vector<VF> kt(C * nb), vt(C * nb), dkt(C * nb), dvt(C * nb);
    std::vector<VF> w(nb), keep(nb, splat(1.f));
    for (int64_t n = b0; n < e0; ++n) {
      load_slots<C>(p.k + n * lay.k * C, lay, kt.data());
      load_slots<C>(p.v + n * lay.k * C, lay, vt.data());
      std::fill(dkt.begin(), dkt.end(), VF{});
      std::fill(dvt.begin(), dvt.end(), VF{});
      for (int64_t i = 0; i < lay.q; ++i) {
        const int64_t row = n * lay.q + i;
        const float* qi = p.q + row * C;
        const float* gi = p.g + row * C;
        const int32_t* act = mask.active.data() + i * nb;
        const int32_t na = mask.num_active[i];
        float m = p.stats[row * 2], s = p.stats[row * 2 + 1];
        row_weights<C>(qi, kt.data(), mask.f.data() + i * nb, act, na, lay,
                       p.inv_div, w.data(), &m, &s, true);
        // D = rowsum(g * out) replaces a [Q, K] reduction of dW * w.
        float d_row = 0.f;
        for (int c = 0; c < C; ++c) d_row += gi[c] * p.out[row * C + c];
        if (drop)
          row_keep(p.k1, p.k2, uint32_t(row), lay, uint32_t(p.threshold),
                   p.drop_scale, keep.data());
        VF acc[C];
        for (int c = 0; c < C; ++c) acc[c] = VF{};
        for (int32_t a = 0; a < na; ++a) {
          const int32_t b = act[a];
          VF dw = VF{};
#pragma GCC unroll 64
          for (int c = 0; c < C; ++c) dw += gi[c] * vt[c * nb + b];
          dw = dw * keep[b];
          const VF wd = w[b] * keep[b];
          const VF dlogits = w[b] * (dw - d_row) * p.inv_div;
#pragma GCC unroll 64
          for (int c = 0; c < C; ++c) {
            acc[c] += dlogits * kt[c * nb + b];
            dkt[c * nb + b] += qi[c] * dlogits;
            dvt[c * nb + b] += gi[c] * wd;
          }
        }
        for (int c = 0; c < C; ++c) dq[row * C + c] = hsum(acc[c]);
      }
      store_slots<C>(dkt.data(), lay, dk + n * lay.k * C);
      store_slots<C>(dvt.data(), lay, dv + n * lay.k * C);
    }
  });
}

Layout layout_of(const ffi::Buffer<ffi::F32>& q,
                 const ffi::Buffer<ffi::F32>& k) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const int64_t r = qd.size();
  int64_t n = 1;
  for (int64_t i = 0; i < r - 2; ++i) n *= qd[i];
  return Layout(n, qd[r - 2], kd[r - 2]);
}

#define DECALIGN_HEAD_DIMS(X) X(4) X(8) X(16) X(32) X(64)

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                   ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::U8> mask, ffi::Buffer<ffi::U32> key,
                   int64_t threshold, float drop_scale, float inv_div,
                   ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> stats) {
  const Layout lay = layout_of(q, k);
  const Mask m(mask.typed_data(), lay);
  const Params p{q.typed_data(), k.typed_data(), v.typed_data(), nullptr,
                 nullptr, nullptr, key.typed_data()[0], key.typed_data()[1],
                 threshold, drop_scale, inv_div};
  switch (q.dimensions().back()) {
#define CASE(C)                                                           \
  case C:                                                                 \
    forward_impl<C>(pool, lay, m, p, out->typed_data(), stats->typed_data()); \
    break;
    DECALIGN_HEAD_DIMS(CASE)
#undef CASE
    default:
      return ffi::Error::InvalidArgument("cpu_attention: unsupported head dim");
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                    ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::U8> mask, ffi::Buffer<ffi::U32> key,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> stats,
                    ffi::Buffer<ffi::F32> g, int64_t threshold,
                    float drop_scale, float inv_div,
                    ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  const Layout lay = layout_of(q, k);
  const Mask m(mask.typed_data(), lay);
  const Params p{q.typed_data(), k.typed_data(), v.typed_data(),
                 out.typed_data(), stats.typed_data(), g.typed_data(),
                 key.typed_data()[0], key.typed_data()[1], threshold,
                 drop_scale, inv_div};
  switch (q.dimensions().back()) {
#define CASE(C)                                                      \
  case C:                                                            \
    backward_impl<C>(pool, lay, m, p, dq->typed_data(), dk->typed_data(), \
                     dv->typed_data());                              \
    break;
    DECALIGN_HEAD_DIMS(CASE)
#undef CASE
    default:
      return ffi::Error::InvalidArgument("cpu_attention: unsupported head dim");
  }
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
        .Ret<ffi::Buffer<ffi::F32>>()   // dq
        .Ret<ffi::Buffer<ffi::F32>>()   // dk
        .Ret<ffi::Buffer<ffi::F32>>());  // dv
