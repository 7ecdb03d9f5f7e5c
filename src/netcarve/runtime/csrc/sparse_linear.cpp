// netcarve block-sparse (BSR) matmul and recurrent layers (fp32).
//
// bsr_linear: y (M, R) = x (M, K) @ W^T + bias with W stored as BSR tiles of bh x bw (netcarve.pack "bsr"
// layout: indptr per block row, block column per tile, tile values row-major). Below batch 8, per block row the
// bh output rows keep one vector accumulator each over all tiles of the row (x's bw-wide slice loaded once per
// tile and shared by the bh rows), lanes summed at the end. From batch 8 on, the batch is in the vector lanes
// (x and the outputs transposed through per-thread scratch; bsr_rows_t). Block rows are split over torch's thread
// pool in chunks of equal tile counts when there is enough work.
//
// rnn_layer: one LSTM / GRU layer and direction over a (N, T, I) sequence, PyTorch's gate order and
// equations; the input projection of all time steps is one matmul, the recurrent one a matmul per step;
// either may be dense (ATen) or BSR.
#include "kernels.h"

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace {

// The matmul kernels work in register-wide vectors (kernels.h: 16 floats with AVX-512, 8 with AVX2). RMAX:
// tile rows held in registers at once (16 of 32 AVX-512 registers, 8 of 16 AVX2 ones).
typedef nck::vecf vr;
constexpr int64_t RL = nck::VL;
constexpr int RMAX = RL == 16 ? 16 : 8;
static inline vr rload(const float* p) { return nck::loadu(p); }
static inline void rstore(float* p, vr v) { nck::storeu(p, v); }
static inline vr rbcast(float w) { return nck::bcast(w); }
static inline float hsum(vr v) {
  float s = 0.f;
  for (int64_t i = 0; i < RL; ++i) s += v[i];
  return s;
}
// The lane sums of four accumulators into out[0..3] in one horizontal-add tree (~8 shuffle / add uops instead of
// ~4 x 10 for lane-by-lane sums, which cost more than the multiply-adds of a 90%-sparse row)
static inline void hsum4(vr a, vr b, vr c, vr d, float* out) {
#if defined(__AVX512F__)
  auto half = [](vr v) {
    const __m512 z = (__m512)v;
    return _mm256_add_ps(_mm512_castps512_ps256(z), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
  };
  const __m256 a8 = half(a), b8 = half(b), c8 = half(c), d8 = half(d);
#elif defined(__AVX__)
  const __m256 a8 = (__m256)a, b8 = (__m256)b, c8 = (__m256)c, d8 = (__m256)d;
#endif
#if defined(__AVX__)
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
#else
  out[0] = hsum(a);
  out[1] = hsum(b);
  out[2] = hsum(c);
  out[3] = hsum(d);
#endif
}

// MB rows of x at once against rows [r0, r0 + RH) of one block row of BH-row tiles: each tile's RH weight
// vectors are loaded once and used for all MB rows (RH * MB accumulators)
template <int BH, int RH, int MB>
static inline void bsr_block(const float* __restrict x, int64_t K, int64_t m0, const int32_t* __restrict idx,
                             const float* __restrict val, int64_t bw, int64_t j0, int64_t j1, int64_t r0,
                             float* out /* MB*BH */) {
  const int64_t nv = bw / RL;
  vr acc[MB][RH];
  for (int mm = 0; mm < MB; ++mm)
    for (int r = 0; r < RH; ++r) acc[mm][r] = vr{};
  for (int64_t j = j0; j < j1; ++j) {
    const float* xs = x + m0 * K + (int64_t)idx[j] * bw;
    const float* w = val + (j * BH + r0) * bw;
    for (int64_t v = 0; v < nv; ++v) {
      vr wv[RH];
#pragma GCC unroll 16
      for (int r = 0; r < RH; ++r) wv[r] = rload(w + r * bw + v * RL);
#pragma GCC unroll 16
      for (int mm = 0; mm < MB; ++mm) {
        const vr xv = rload(xs + mm * K + v * RL);
#pragma GCC unroll 16
        for (int r = 0; r < RH; ++r) acc[mm][r] += wv[r] * xv;
      }
    }
  }
  for (int mm = 0; mm < MB; ++mm) {
    int r = 0;
    for (; r + 4 <= RH; r += 4) hsum4(acc[mm][r], acc[mm][r + 1], acc[mm][r + 2], acc[mm][r + 3], out + mm * BH + r0 + r);
    for (; r < RH; ++r) out[mm * BH + r0 + r] = hsum(acc[mm][r]);
  }
}

#if defined(__AVX512F__)
// The lane sums of 16 accumulators as one vector, lane i = sum of a[i]: a transpose-add tree (46 shuffle / add
// uops for 16 outputs, against ~14 per 4 outputs with hsum4 plus a scalar store per output). After the four
// levels lane 4k + s holds row k + 4s; the final permute puts the rows in order.
static inline __attribute__((always_inline)) __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // rows 2i, 2i+1: 8 lanes each
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // rows 4i .. 4i+3: 4 lanes each, one 128-bit chunk per row
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i) {  // chunk k: rows 8i + k and 8i + 4 + k, 2 lanes each
    const __m512d e = _mm512_castps_pd(c[2 * i]), f = _mm512_castps_pd(c[2 * i + 1]);
    d[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(e, f)), _mm512_castpd_ps(_mm512_unpackhi_pd(e, f)));
  }
  // chunk k: rows k, 4 + k, 8 + k, 12 + k
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), t);
}

// Batch 1 (AVX-512, tiles a whole number of vectors wide): 16 output rows at a time, 16 / BH block rows each
// accumulating its tiles into its rows' registers, then one reduce16, the bias added and the 16 outputs stored as
// one (masked) vector. With a 90%-sparse matrix a block row holds few tiles (3 of 32 for 1536 x 512 in 4 x 16
// tiles), so the per-block-row horizontal sums and scalar stores of bsr_rows cost about as much as the tiles.
// Batches 2-7 the same, one batch row after the other per group of 16 output rows (the group's tiles stay in L1):
// the per-block-row path's lane sums and scalar stores had made 384 x 128 in 4 x 16 tiles at batch 4 2.2x slower
// than the same matrix in 16 x 16 tiles.
template <int BH, bool ONE>
static void bsr_rows16(const float* __restrict x, int64_t M_, int64_t K, const int32_t* __restrict ptr,
                       const int32_t* __restrict idx, const float* __restrict val, int64_t bw, int64_t rb0,
                       int64_t rb1, const float* bias, float* __restrict y, int64_t R) {
  constexpr int G = 16 / BH;
  const int64_t M = ONE ? 1 : M_;  // (batch 1 compiled without the batch loop)
  const int64_t nv = bw / RL, rend = std::min<int64_t>(R, rb1 * BH);
  for (int64_t rb = rb0; rb < rb1; rb += G)
  for (int64_t m = 0; m < M; ++m) {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    const int64_t ng = std::min<int64_t>(G, rb1 - rb);
#pragma GCC unroll 16
    for (int q = 0; q < G; ++q) {
      if (q >= ng) break;
      for (int64_t j = ptr[rb + q]; j < ptr[rb + q + 1]; ++j) {
        const float* xs = x + m * K + (int64_t)idx[j] * bw;
        const float* w = val + j * BH * bw;
        for (int64_t v = 0; v < nv; ++v) {
          const __m512 xv = _mm512_loadu_ps(xs + v * RL);
#pragma GCC unroll 16
          for (int r = 0; r < BH; ++r)
            acc[q * BH + r] = _mm512_fmadd_ps(_mm512_loadu_ps(w + r * bw + v * RL), xv, acc[q * BH + r]);
        }
      }
    }
    __m512 s = reduce16(acc);
    const int64_t row0 = rb * BH, n = std::min<int64_t>(16, rend - row0);
    const __mmask16 mk = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    if (bias) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(mk, bias + row0));
    _mm512_mask_storeu_ps(y + m * R + row0, mk, s);
  }
}

// Tiles 16 rows tall (AVX-512), any batch: the output rows in the vector lanes. The tiles are stored transposed
// once per weight (valt: tile j's column c = 16 contiguous floats at valt + (j * bw + c) * 16, MatW::valt), so
// y[m, 16 rows] += x[m, c] (broadcast) * column c: no horizontal sums at batch 1 (bsr_rows16's reduce16) and no
// transposes of x and y at larger batches (bsr_rows_t's, ~30% of a 90%-sparse 384 x 128 matmul at batch 32).
// MB batch rows share each column load; at batch 1 four accumulators split the FMA chain over the columns.
template <int MB>
static inline void bsr_cols_block(const float* __restrict x, int64_t ldx, const int32_t* __restrict idx,
                                  const float* __restrict valt, int64_t bw, int64_t j0, int64_t j1, __m512 bv,
                                  __mmask16 mk, float* __restrict y, int64_t ldy) {
  if constexpr (MB == 1) {
    __m512 a[4] = {bv, _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t j = j0; j < j1; ++j) {
      const float* xs = x + (int64_t)idx[j] * bw;
      const float* wt = valt + j * bw * 16;
      int64_t c = 0;
      for (; c + 4 <= bw; c += 4)
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q)
          a[q] = _mm512_fmadd_ps(_mm512_set1_ps(xs[c + q]), _mm512_loadu_ps(wt + (c + q) * 16), a[q]);
      for (; c < bw; ++c) a[0] = _mm512_fmadd_ps(_mm512_set1_ps(xs[c]), _mm512_loadu_ps(wt + c * 16), a[0]);
    }
    _mm512_mask_storeu_ps(y, mk, _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
  } else {
    __m512 a[MB];
    for (int i = 0; i < MB; ++i) a[i] = bv;
    for (int64_t j = j0; j < j1; ++j) {
      const float* xs = x + (int64_t)idx[j] * bw;
      const float* wt = valt + j * bw * 16;
      for (int64_t c = 0; c < bw; ++c) {
        __m512 wc = _mm512_loadu_ps(wt + c * 16);
        asm("" : "+v"(wc));  // one load shared by the MB FMAs (GCC otherwise folds it into each of them)
#pragma GCC unroll 8
        for (int i = 0; i < MB; ++i) a[i] = _mm512_fmadd_ps(_mm512_set1_ps(xs[i * ldx + c]), wc, a[i]);
      }
    }
    for (int i = 0; i < MB; ++i) _mm512_mask_storeu_ps(y + i * ldy, mk, a[i]);
  }
}

// block rows [rb0, rb1) of y (M, R) for all M batch rows, 8 at a time
static void bsr_cols(const float* __restrict x, int64_t M, int64_t K, const int32_t* __restrict ptr,
                     const int32_t* __restrict idx, const float* __restrict valt, int64_t bw, int64_t rb0, int64_t rb1,
                     const float* bias, float* __restrict y, int64_t R) {
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    const int64_t row0 = rb * 16, n = std::min<int64_t>(16, R - row0);
    const __mmask16 mk = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mk, bias + row0) : _mm512_setzero_ps();
    const int64_t j0 = ptr[rb], j1 = ptr[rb + 1];
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) bsr_cols_block<8>(x + m * K, K, idx, valt, bw, j0, j1, bv, mk, y + m * R + row0, R);
    if (m + 4 <= M) {
      bsr_cols_block<4>(x + m * K, K, idx, valt, bw, j0, j1, bv, mk, y + m * R + row0, R);
      m += 4;
    }
    if (m + 2 <= M) {
      bsr_cols_block<2>(x + m * K, K, idx, valt, bw, j0, j1, bv, mk, y + m * R + row0, R);
      m += 2;
    }
    if (m < M) bsr_cols_block<1>(x + m * K, K, idx, valt, bw, j0, j1, bv, mk, y + m * R + row0, R);
  }
}
#endif

template <int BH>
static void bsr_rows(const float* __restrict x, int64_t M, int64_t K, const int32_t* __restrict ptr,
                     const int32_t* __restrict idx, const float* __restrict val, int64_t bw, int64_t rb0,
                     int64_t rb1, const float* bias, float* __restrict y, int64_t R) {
  constexpr int RH = BH < RMAX ? BH : RMAX;  // tile rows per pass (AVX2: 16-row tiles in two passes)
  constexpr int MB = RH >= RMAX ? 1 : RMAX / RH;
  const bool vec = bw % RL == 0;
#if defined(__AVX512F__)
  if (g_bsr_rows16 && M < std::max<int64_t>(8, g_bsr_batched_min) && vec) {
    if (M == 1)
      bsr_rows16<BH, true>(x, 1, K, ptr, idx, val, bw, rb0, rb1, bias, y, R);
    else
      bsr_rows16<BH, false>(x, M, K, ptr, idx, val, bw, rb0, rb1, bias, y, R);
    return;
  }
#endif
  float out[MB * BH];
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    const int64_t j0 = ptr[rb], j1 = ptr[rb + 1];
    int64_t m0 = 0;
    auto emit = [&](int64_t m, int nrows) {
      for (int mm = 0; mm < nrows; ++mm)
        for (int r = 0; r < BH; ++r) {
          const int64_t row = rb * BH + r;
          if (row < R) y[(m + mm) * R + row] = out[mm * BH + r] + (bias ? bias[row] : 0.f);
        }
    };
    if (vec) {
      for (; m0 + MB <= M; m0 += MB) {
        for (int r0 = 0; r0 < BH; r0 += RH) bsr_block<BH, RH, MB>(x, K, m0, idx, val, bw, j0, j1, r0, out);
        emit(m0, MB);
      }
      for (; m0 < M; ++m0) {
        for (int r0 = 0; r0 < BH; r0 += RH) bsr_block<BH, RH, 1>(x, K, m0, idx, val, bw, j0, j1, r0, out);
        emit(m0, 1);
      }
    } else {  // tiles narrower than a vector (or ragged): scalar
      for (; m0 < M; ++m0) {
        const float* xm = x + m0 * K;
        for (int r = 0; r < BH; ++r) out[r] = 0.f;
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t c0 = (int64_t)idx[j] * bw;
          const float* w = val + j * BH * bw;
          for (int r = 0; r < BH; ++r)
            for (int64_t c = 0; c < bw && c0 + c < K; ++c) out[r] += w[r * bw + c] * xm[c0 + c];
        }
        emit(m0, 1);
      }
    }
  }
}

// Batched path (M >= kBsrBatchedMin): x transposed to xt (Kp rows of leading dimension Mp), RL batch rows per
// vector, so no horizontal sums; MC vectors of batch rows at once reuse every broadcast weight MC times; tile rows
// [r0, r0 + RH) per pass. Output transposed: yt (this call's rows, leading dimension Mp).
template <int BH, int RH, int MC>
static void bsr_rows_t(const float* __restrict xt, int64_t Mp, int64_t mv0, const int32_t* __restrict ptr,
                       const int32_t* __restrict idx, const float* __restrict val, int64_t bw, int64_t rb0,
                       int64_t rb1, const float* bias, float* __restrict yt, int64_t R) {
  // yt holds this call's block rows only: row rb * BH + r at yt[((rb - rb0) * BH + r) * Mp]
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    for (int r0 = 0; r0 < BH; r0 += RH) {
      vr acc[RH][MC];
      for (int r = 0; r < RH; ++r)
        for (int k = 0; k < MC; ++k) acc[r][k] = vr{};
      for (int64_t j = ptr[rb]; j < ptr[rb + 1]; ++j) {
        const float* w = val + (j * BH + r0) * bw;
        const float* xc = xt + (int64_t)idx[j] * bw * Mp + mv0 * RL;
        for (int64_t c = 0; c < bw; ++c) {
          vr xv[MC];
#pragma GCC unroll 16
          for (int k = 0; k < MC; ++k) {
            xv[k] = rload(xc + c * Mp + k * RL);
            // keep it in a register: GCC otherwise folds the load into each of the RH FMAs that use it (RH loads
            // instead of one), which with the RH broadcasts saturated the load ports (43 instead of ~60 GFLOP/s
            // for 4 x 16 tiles, measured on a Zen 3)
            if (RH > 1) asm("" : "+v"(xv[k]));
          }
#pragma GCC unroll 16
          for (int r = 0; r < RH; ++r) {
            const vr wv = rbcast(w[r * bw + c]);
#pragma GCC unroll 16
            for (int k = 0; k < MC; ++k) acc[r][k] += wv * xv[k];
          }
        }
      }
      for (int r = 0; r < RH; ++r) {
        const int64_t row = rb * BH + r0 + r;
        if (row >= R) break;
        const vr bv = rbcast(bias ? bias[row] : 0.f);
        for (int k = 0; k < MC; ++k) rstore(yt + ((rb - rb0) * BH + r0 + r) * Mp + (mv0 + k) * RL, acc[r][k] + bv);
      }
    }
  }
}

// All batch vectors of block rows [rb0, rb1): MCMAX vectors per pass, then 2, then 1
template <int BH, int RH, int MCMAX>
static void bsr_rows_t_all(const float* xt, int64_t ld, int64_t nmv, const int32_t* ptr, const int32_t* idx,
                           const float* val, int64_t bw, int64_t rb0, int64_t rb1, const float* bias, float* yt,
                           int64_t R) {
  int64_t mv = 0;
  for (; mv + MCMAX <= nmv; mv += MCMAX) bsr_rows_t<BH, RH, MCMAX>(xt, ld, mv, ptr, idx, val, bw, rb0, rb1, bias, yt, R);
  if constexpr (MCMAX > 2)
    for (; mv + 2 <= nmv; mv += 2) bsr_rows_t<BH, RH, 2>(xt, ld, mv, ptr, idx, val, bw, rb0, rb1, bias, yt, R);
  for (; mv < nmv; ++mv) bsr_rows_t<BH, RH, 1>(xt, ld, mv, ptr, idx, val, bw, rb0, rb1, bias, yt, R);
}

// bsr_rows_t_all for tile height bh (1, 2, 4, 8, 16). Register blocks (RH tile rows x MC batch vectors of
// accumulators): at most 4 tile rows per pass, so each broadcast weight feeds MC >= 2 FMAs and each x vector RH; 8
// accumulators with AVX2 (16 registers), 16 with AVX-512 (32). Taller tiles run in passes of 4 rows (one row of 16
// had 16 broadcasts per x vector: load-bound).
static void bsr_rows_t_bh(int64_t bh, const float* xt, int64_t ld, int64_t nmv, const int32_t* ptr,
                          const int32_t* idx, const float* val, int64_t bw, int64_t rb0, int64_t rb1,
                          const float* bias, float* yt, int64_t R) {
  constexpr int MC4 = RMAX / 4;
  switch (bh) {
    case 1: bsr_rows_t_all<1, 1, RMAX>(xt, ld, nmv, ptr, idx, val, bw, rb0, rb1, bias, yt, R); break;
    case 2: bsr_rows_t_all<2, 2, RMAX / 2>(xt, ld, nmv, ptr, idx, val, bw, rb0, rb1, bias, yt, R); break;
    case 4: bsr_rows_t_all<4, 4, MC4>(xt, ld, nmv, ptr, idx, val, bw, rb0, rb1, bias, yt, R); break;
    case 8: bsr_rows_t_all<8, 4, MC4>(xt, ld, nmv, ptr, idx, val, bw, rb0, rb1, bias, yt, R); break;
    default: bsr_rows_t_all<16, 4, MC4>(xt, ld, nmv, ptr, idx, val, bw, rb0, rb1, bias, yt, R); break;
  }
}

// dst (cols x rows, leading dim ldd) = src (rows x cols, leading dim lds) transposed, in 8 x 8 register blocks
// (AVX: unpack / shuffle / permute). Column-by-column copies with power-of-two strides (a 128-wide batch is a
// 512-byte stride) mapped every read to the same few L1 sets and ran at ~1.3 ns per float; this is ~8x faster.
static inline void tr8x8(const float* __restrict src, int64_t lds, float* __restrict dst, int64_t ldd) {
#if defined(__AVX__)
  __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds), r2 = _mm256_loadu_ps(src + 2 * lds),
         r3 = _mm256_loadu_ps(src + 3 * lds), r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds),
         r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
         t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
         t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  r0 = _mm256_shuffle_ps(t0, t2, 0x44);
  r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  r2 = _mm256_shuffle_ps(t1, t3, 0x44);
  r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  r4 = _mm256_shuffle_ps(t4, t6, 0x44);
  r5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  r6 = _mm256_shuffle_ps(t5, t7, 0x44);
  r7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(r0, r4, 0x20));
  _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(r1, r5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(r2, r6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(r3, r7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(r0, r4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(r1, r5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(r2, r6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(r3, r7, 0x31));
#else
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) dst[j * ldd + i] = src[i * lds + j];
#endif
}

#if defined(__AVX512F__)
// 16 x 16 blocks with AVX-512: 64 shuffles per 256 floats (0.25 per float, 8 x 8 blocks 0.375) and whole-vector
// loads and stores; the transposes were ~30% of a 90%-sparse 384 x 128 matmul at batch 32 (perf, Zen 4)
static inline void tr16x16(const float* __restrict src, int64_t lds, float* __restrict dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {  // pairs of rows interleaved
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 4 x 4 blocks within each 128-bit lane
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int h = 0; h < 16; h += 8)  // 128-bit lanes of 4 rows apart
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + 4 + i], 0x88);
      t[h + 4 + i] = _mm512_shuffle_f32x4(r[h + i], r[h + 4 + i], 0xDD);
    }
  for (int i = 0; i < 8; ++i) {  // and of 8 rows apart
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
}
#endif

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (AVX-512: 16 x 16 blocks where they fit; then
// 8 x 8 blocks, scalar edges)
static void transpose(const float* __restrict src, int64_t lds, int64_t rows, int64_t cols, float* __restrict dst,
                      int64_t ldd) {
  int64_t r = 0;
#if defined(__AVX512F__)
  if (g_transpose16 && cols >= 16) {
    const int64_t c16 = cols / 16 * 16;
    for (; r + 16 <= rows; r += 16)
      for (int64_t c = 0; c < c16; c += 16) tr16x16(src + r * lds + c, lds, dst + c * ldd + r, ldd);
    // the columns past c16 of those rows, in 8 x 8 blocks and scalars
    for (int64_t r2 = 0; r2 < r; r2 += 8) {
      int64_t c = c16;
      for (; c + 8 <= cols; c += 8) tr8x8(src + r2 * lds + c, lds, dst + c * ldd + r2, ldd);
      for (; c < cols; ++c)
        for (int64_t i = 0; i < 8; ++i) dst[c * ldd + r2 + i] = src[(r2 + i) * lds + c];
    }
  }
#endif
  for (; r + 8 <= rows; r += 8) {
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) tr8x8(src + r * lds + c, lds, dst + c * ldd + r, ldd);
    for (; c < cols; ++c)
      for (int64_t i = 0; i < 8; ++i) dst[c * ldd + r + i] = src[(r + i) * lds + c];
  }
  for (; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// A per-thread scratch buffer, grown on demand and never zeroed (a zero-filled std::vector per call cost more
// than a 90%-sparse 384 x 128 matmul at batch 32)
static float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> bufs[2];
  auto& b = bufs[slot];
  if ((int64_t)b.size() < n) b.resize(n);
  return b.data();
}
}  // namespace

// batches from which the batched (transposed) path runs: below, horizontal sums per output cost less than the
// transposes (measured on a Zen 3: 8 rows 5.4 -> 4.0 us batched, 6 rows 4.4 -> 5.1 us)
static constexpr int64_t kBsrBatchedMin = 8;
int64_t g_bsr_row_tile = 32;  // (see set_bsr_row_tile)
// AVX-512, below it the 16-row reductions (bsr_rows16; set_bsr_batched_min, at least 8). Measured in one process,
// alternated, 2 threads, 90% sparse, 4 x 16 / 1 x 16 / 8 x 16 tiles: at batch 8 (half of the batched path's lanes
// empty) the reductions ran 1536 x 512 1.27-1.72x and 4096 x 1024 1.34-1.74x faster, 384 x 128 level (0.99-1.07x),
// but the block-sparse GRU (384 x 128 gates) end to end 0.89-0.96x; at batch 12 the batched path was faster for
// 384 x 128 (0.77-0.85x) and at 16 for most shapes. So the default stays at 8.
int64_t g_bsr_batched_min = 8;
bool g_bsr_rows16 = true;
void transpose_block(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  transpose(src, lds, rows, cols, dst, ldd);
}

bool g_transpose16 = true;
bool g_bsr_cols = true;

torch::Tensor bsr_linear(torch::Tensor x, torch::Tensor indptr, torch::Tensor indices, torch::Tensor values,
                         c10::optional<torch::Tensor> bias, int64_t out_features) {
  return bsr_linear_t(std::move(x), std::move(indptr), std::move(indices), std::move(values), torch::Tensor(),
                      std::move(bias), out_features);
}

torch::Tensor bsr_tiles_t(const torch::Tensor& values) {
  return values.dim() == 3 && values.size(1) == 16 && values.scalar_type() == torch::kFloat32
             ? values.transpose(1, 2).contiguous()
             : torch::Tensor();
}

torch::Tensor bsr_linear_t(torch::Tensor x, torch::Tensor indptr, torch::Tensor indices, torch::Tensor values,
                           torch::Tensor values_t, c10::optional<torch::Tensor> bias, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "bsr_linear: x must be (M, K) float32");
  TORCH_CHECK(values.dim() == 3 && values.scalar_type() == torch::kFloat32, "bsr_linear: values must be (nb, bh, bw)");
  TORCH_CHECK(indptr.scalar_type() == torch::kInt32 && indices.scalar_type() == torch::kInt32,
              "bsr_linear: indptr / indices must be int32");
  x = x.contiguous();
  auto ptr = indptr.contiguous();
  auto idx = indices.contiguous();
  auto val = values.contiguous();
  const int64_t M = x.size(0), K = x.size(1), bh = val.size(1), bw = val.size(2), R = out_features;
  const int64_t RB = ptr.numel() - 1;
  TORCH_CHECK(RB * bh >= R && (RB - 1) * bh < R, "bsr_linear: block rows do not cover out_features");
  // tiles may read up to the padded width: pad x when K is not a multiple of bw
  const int64_t Kp = (K + bw - 1) / bw * bw;
  torch::Tensor xp = x;
  if (Kp != K) xp = at::constant_pad_nd(x, {0, Kp - K}, 0.0);
  // allocated without the dispatcher (torch::empty: ~0.8 of the ~1.8 us a 90%-sparse 384 x 128 row took)
  at::Tensor y(at::detail::empty_cpu({M, R}, x.options()));
  torch::Tensor b;
  const float* bp = nullptr;
  if (bias.has_value()) {
    b = bias->contiguous();
    bp = b.data_ptr<float>();
  }
  const float* xd = xp.data_ptr<float>();
  const int32_t* pd = ptr.data_ptr<int32_t>();
  const int32_t* id = idx.data_ptr<int32_t>();
  const float* vd = val.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  const int64_t work = val.numel() * M;
  // Below 4x the kernels' threshold of multiply-adds (a 90%-sparse 384 x 128 matmul at batch 32, ~6 us on one
  // thread) the calling thread does it all: two threads saved ~1 us at best and, in some processes on a 2-vCPU VM,
  // doubled the time (7.8 against 16-18 us, same inputs). Below batch 8 (no transposes, the weights streamed once
  // per call) from the threshold itself: a 90%-sparse 1536 x 512 matmul at batch 1 (79k multiply-adds) ran 5.2 ->
  // 4.0 us on two threads (Zen 4 VM, one process, alternated; 384 x 128 ones, 4.9k at batch 1, stay on one).
  // Otherwise one chunk of block rows per thread, cut at equal shares of tiles (plus half a tile per block row for
  // its accumulator set-up and stores): block-sparse rows hold very different tile counts (whole gate rows empty
  // after unbalanced pruning), and equal row counts left one thread with most of the tiles.
  // the transposed batched path (below it, bsr_rows: with AVX-512 the 16-row reductions up to g_bsr_batched_min)
#if defined(__AVX512F__)
  const bool batched = M >= kBsrBatchedMin && (M >= g_bsr_batched_min || !(g_bsr_rows16 && bw % RL == 0));
#else
  const bool batched = M >= kBsrBatchedMin;
#endif
  const int64_t par_min = batched ? 4 * g_parallel_threshold : g_parallel_threshold;
  const int64_t nchunks = work < par_min ? 1 : std::min<int64_t>(RB, nck::num_threads());
  std::vector<int64_t> cut(nchunks + 1, RB);
  cut[0] = 0;
  {
    const double total = pd[RB] + 0.5 * RB;
    int64_t rb = 0;
    for (int64_t c = 1; c < nchunks; ++c) {
      const double target = total * c / nchunks;
      while (rb < RB && pd[rb] + 0.5 * rb < target) ++rb;
      cut[c] = rb;
    }
  }
  auto run_chunks = [&](auto&& body) {
    nck::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        if (cut[c] < cut[c + 1]) body(cut[c], cut[c + 1]);
    });
  };
  if (values_t.defined())
    TORCH_CHECK(values_t.is_contiguous() && values_t.scalar_type() == torch::kFloat32 &&
                    values_t.sizes() == torch::IntArrayRef({val.size(0), bw, bh}),
                "bsr_linear: transposed tiles do not match the tiles");
#if defined(__AVX512F__)
  if (g_bsr_cols && bh == 16 && values_t.defined()) {
    const float* vt = values_t.data_ptr<float>();
    run_chunks([&](int64_t b0, int64_t b1) { bsr_cols(xd, M, Kp, pd, id, vt, bw, b0, b1, bp, yd, R); });
    return y;
  }
#endif
  if (batched && g_bsr_row_tile > 0 && M > 2 * g_bsr_row_tile && (bh == 1 || bh == 2 || bh == 4 || bh == 8 || bh == 16)) {
    // Many rows (a transformer's tokens x batch): tiles of g_bsr_row_tile rows, each transposed, multiplied by every
    // block row and transposed back by one thread, the tiles split over the threads. (Transposing all M rows at
    // once streamed every tile's x rows, M floats each, from L2 / L3: 2048 x 64 rows through a 90%-sparse 192 x 64
    // weight ran at ~12 useful GFLOP/s, 0.42 ms against 0.31 for MKL's dense product.)
    const int64_t MT = g_bsr_row_tile, ntiles = (M + MT - 1) / MT;
    nck::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m0 = t * MT, mt = std::min(MT, M - m0);
        const int64_t Mp = (mt + RL - 1) / RL * RL, nmv = Mp / RL;
        const int64_t ld = Mp % 64 == 0 ? Mp + RL : Mp;
        float* xtw = scratch(0, Kp * ld);
        transpose(xd + m0 * Kp, Kp, mt, Kp, xtw, ld);
        if (Mp > mt)
          for (int64_t k = 0; k < Kp; ++k)
            for (int64_t m = mt; m < Mp; ++m) xtw[k * ld + m] = 0.f;
        float* ytd = scratch(1, RB * bh * ld);
        bsr_rows_t_bh(bh, xtw, ld, nmv, pd, id, vd, bw, 0, RB, bp, ytd, R);
        transpose(ytd, ld, R, mt, yd + m0 * R, R);
      }
    });
    return y;
  }
  if (batched && (bh == 1 || bh == 2 || bh == 4 || bh == 8 || bh == 16)) {
    // x transposed into xt (Kp rows of Mp batch entries, zero-padded); row strides one vector longer than a
    // power of two (a 128-wide batch otherwise puts the rows of a tile into the same few L1 sets)
    const int64_t Mp = (M + RL - 1) / RL * RL, nmv = Mp / RL;
    const int64_t ld = Mp % 64 == 0 ? Mp + RL : Mp;
    float* xtw = scratch(0, Kp * ld);
    transpose(xd, Kp, M, Kp, xtw, ld);
    if (Mp > M)
      for (int64_t k = 0; k < Kp; ++k)
        for (int64_t m = M; m < Mp; ++m) xtw[k * ld + m] = 0.f;
    const float* xtd = xtw;
    run_chunks([&](int64_t b0, int64_t b1) {
      // this chunk's outputs transposed (its rows x ld), transposed into y (M, R) at the end
      float* ytd = scratch(1, (b1 - b0) * bh * ld);
      bsr_rows_t_bh(bh, xtd, ld, nmv, pd, id, vd, bw, b0, b1, bp, ytd, R);
      const int64_t r0 = b0 * bh, r1 = std::min<int64_t>(b1 * bh, R);
      transpose(ytd, ld, r1 - r0, M, yd + r0, R);
    });
    return y;
  }
  run_chunks([&](int64_t b0, int64_t b1) {
    switch (bh) {
      case 1: bsr_rows<1>(xd, M, Kp, pd, id, vd, bw, b0, b1, bp, yd, R); break;
      case 2: bsr_rows<2>(xd, M, Kp, pd, id, vd, bw, b0, b1, bp, yd, R); break;
      case 4: bsr_rows<4>(xd, M, Kp, pd, id, vd, bw, b0, b1, bp, yd, R); break;
      case 8: bsr_rows<8>(xd, M, Kp, pd, id, vd, bw, b0, b1, bp, yd, R); break;
      case 16: bsr_rows<16>(xd, M, Kp, pd, id, vd, bw, b0, b1, bp, yd, R); break;
      default: TORCH_CHECK(false, "bsr_linear: block height must be 1, 2, 4, 8 or 16, got ", bh);
    }
  });
  return y;
}

// Rows [r0, r1) of y (MM, R) = x (MM, K) @ w^T (+ bias), dense: 4 weight rows at a time against all MM batch rows
// (4 x MM accumulators; each weight vector loaded once for the MM rows, each x vector once for the 4), one
// horizontal-add tree per 4 outputs, a scalar tail for K % RL.
template <int MM>
static void dense_rows(const float* __restrict xd, const float* __restrict wd, const float* __restrict bd, int64_t K,
                       int64_t R, int64_t r0, int64_t r1, float* __restrict yd) {
  const int64_t KV = K / RL * RL;
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const float* w0 = wd + r * K;
    vr a[MM][4];
    for (int m = 0; m < MM; ++m)
      for (int j = 0; j < 4; ++j) a[m][j] = vr{};
    for (int64_t k = 0; k < KV; k += RL) {
      const vr w0v = rload(w0 + k), w1v = rload(w0 + K + k), w2v = rload(w0 + 2 * K + k), w3v = rload(w0 + 3 * K + k);
#pragma GCC unroll 4
      for (int m = 0; m < MM; ++m) {
        const vr xv = rload(xd + m * K + k);
        a[m][0] += w0v * xv;
        a[m][1] += w1v * xv;
        a[m][2] += w2v * xv;
        a[m][3] += w3v * xv;
      }
    }
    for (int m = 0; m < MM; ++m) {
      float o[4];
      hsum4(a[m][0], a[m][1], a[m][2], a[m][3], o);
      const float* xm = xd + m * K;
      for (int j = 0; j < 4; ++j) {
        for (int64_t k = KV; k < K; ++k) o[j] += w0[j * K + k] * xm[k];
        yd[m * R + r + j] = o[j] + (bd ? bd[r + j] : 0.f);
      }
    }
  }
  for (; r < r1; ++r) {
    const float* wr = wd + r * K;
    for (int m = 0; m < MM; ++m) {
      const float* xm = xd + m * K;
      vr a{};
      for (int64_t k = 0; k < KV; k += RL) a += rload(wr + k) * rload(xm + k);
      float o = hsum(a);
      for (int64_t k = KV; k < K; ++k) o += wr[k] * xm[k];
      yd[m * R + r] = o + (bd ? bd[r] : 0.f);
    }
  }
}

// y (M, R) = x (M, K) @ w^T (+ bias) for small batches (M <= 4), dense, by dense_rows; rows split over the threads
// in multiples of 4 only when there is enough work. ATen's addmm (MKL) cost 2-5 us for a 64 x 10 classifier or a
// 384 x 128 GRU gate matrix at batch 1 on a Zen 4 VM (no AVX-512 GEMV there), 2-8x this kernel's time.
static torch::Tensor dense_small(const torch::Tensor& x_, const torch::Tensor& w, const torch::Tensor& bias) {
  const torch::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), R = w.size(0);
  at::Tensor y(at::detail::empty_cpu({M, R}, x.options()));
  const float* xd = x.data_ptr<float>();
  const float* wd = w.data_ptr<float>();
  const float* bd = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yd = y.data_ptr<float>();
  auto rows = [&](int64_t r0, int64_t r1) {
    switch (M) {
      case 1: dense_rows<1>(xd, wd, bd, K, R, r0, r1, yd); break;
      case 2: dense_rows<2>(xd, wd, bd, K, R, r0, r1, yd); break;
      case 3: dense_rows<3>(xd, wd, bd, K, R, r0, r1, yd); break;
      default: dense_rows<4>(xd, wd, bd, K, R, r0, r1, yd); break;
    }
  };
  const int64_t nt = M * R * K < 4 * g_parallel_threshold ? 1 : std::min<int64_t>(nck::num_threads(), R / 4);
  if (nt <= 1) {
    rows(0, R);
  } else {
    nck::parallel_for(0, nt, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) rows(c * R / nt / 4 * 4, c + 1 == nt ? R : (c + 1) * R / nt / 4 * 4);
    });
  }
  return y;
}

bool g_dense_small_linear = true;
bool g_direct_linear = true;

// ---- dense panel GEMM: y (M, N) = x (M, K) @ w^T + b for M beyond dense_small's few rows. w^T is packed in panels of
// PW = 2 vectors of output columns, K rows each (zero-padded past N); one job = MR rows of x against one panel: MR x 2
// accumulators, per k two panel vectors loaded and MR broadcasts of x (register-blocked outer products, no
// horizontal sums). Jobs run panel-major (consecutive jobs share a panel, which stays in L1 / L2) and split over the
// threads in contiguous ranges. MKL's sgemm (ATen's addmm) takes its AVX2 path on AMD CPUs.
constexpr int64_t PW = 2 * RL;
constexpr int PMR = RL == 16 ? 8 : 6;  // rows per job: 16 (AVX-512) / 12 (AVX2) accumulators

template <int MR>
static void panel_job(const float* __restrict x, int64_t K, const float* __restrict wp, const float* __restrict bp,
                      float* __restrict y, int64_t N, int64_t cols) {
  vr a[MR][2];
  const vr b0 = rload(bp), b1 = rload(bp + RL);
  for (int m = 0; m < MR; ++m) {
    a[m][0] = b0;
    a[m][1] = b1;
  }
  for (int64_t k = 0; k < K; ++k) {
    const vr w0 = rload(wp + k * PW), w1 = rload(wp + k * PW + RL);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const vr xv = rbcast(x[m * K + k]);
      a[m][0] += w0 * xv;
      a[m][1] += w1 * xv;
    }
  }
  if (cols == PW) {
    for (int m = 0; m < MR; ++m) {
      rstore(y + m * N, a[m][0]);
      rstore(y + m * N + RL, a[m][1]);
    }
  } else {
    alignas(64) float t[PW];
    for (int m = 0; m < MR; ++m) {
      rstore(t, a[m][0]);
      rstore(t + RL, a[m][1]);
      std::memcpy(y + m * N, t, cols * sizeof(float));
    }
  }
}

void pack_direct(MatW& m) {
  const torch::Tensor w = m.w.contiguous();
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32, "pack_direct: a 2-d float32 weight");
  const int64_t N = w.size(0), K = w.size(1), P = (N + PW - 1) / PW;
  m.wp = torch::zeros({P, K, PW}, w.options());
  m.bp = torch::zeros({P * PW}, w.options());
  const float* wd = w.data_ptr<float>();
  float* pd = m.wp.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) pd[(n / PW) * K * PW + k * PW + n % PW] = wd[n * K + k];
  if (m.bias.defined()) std::memcpy(m.bp.data_ptr<float>(), m.bias.contiguous().data_ptr<float>(), N * sizeof(float));
  m.direct = true;
}

torch::Tensor dense_panel(const torch::Tensor& x_, const torch::Tensor& wp, const torch::Tensor& bp, int64_t N) {
  const torch::Tensor x = x_.contiguous();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && wp.dim() == 3 && wp.size(2) == PW &&
                  x.size(1) == wp.size(1), "dense_panel: x ", x.sizes(), " against packed weights ", wp.sizes());
  const int64_t M = x.size(0), K = x.size(1), P = wp.size(0);
  TORCH_CHECK(N > (P - 1) * PW && N <= P * PW && bp.numel() == P * PW, "dense_panel: ", N,
              " output features do not match packed weights ", wp.sizes(), " and bias of ", bp.numel());
  at::Tensor y(at::detail::empty_cpu({M, N}, x.options()));
  const float* xd = x.data_ptr<float>();
  const float* wd = wp.data_ptr<float>();
  const float* bd = bp.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  const int64_t RBk = (M + PMR - 1) / PMR, jobs = RBk * P;
  auto run = [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t p = j / RBk, m0 = (j % RBk) * PMR, mr = std::min<int64_t>(PMR, M - m0);
      const int64_t cols = std::min<int64_t>(PW, N - p * PW);
      const float* xr = xd + m0 * K;
      const float* wpp = wd + p * K * PW;
      float* yr = yd + m0 * N + p * PW;
      switch (mr) {
        case 1: panel_job<1>(xr, K, wpp, bd + p * PW, yr, N, cols); break;
        case 2: panel_job<2>(xr, K, wpp, bd + p * PW, yr, N, cols); break;
        case 3: panel_job<3>(xr, K, wpp, bd + p * PW, yr, N, cols); break;
        case 4: panel_job<4>(xr, K, wpp, bd + p * PW, yr, N, cols); break;
        case 5: panel_job<5>(xr, K, wpp, bd + p * PW, yr, N, cols); break;
        case 6: panel_job<6>(xr, K, wpp, bd + p * PW, yr, N, cols); break;
        case 7: panel_job<7>(xr, K, wpp, bd + p * PW, yr, N, cols); break;
        default: panel_job<8>(xr, K, wpp, bd + p * PW, yr, N, cols); break;
      }
    }
  };
  const int64_t nt = M * N * K < 4 * g_parallel_threshold ? 1 : std::min<int64_t>(nck::num_threads(), jobs);
  if (nt <= 1) {
    run(0, jobs);
  } else {
    nck::parallel_for(0, nt, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) run(c * jobs / nt, (c + 1) * jobs / nt);
    });
  }
  return y;
}

// the dense panel kernel applies (packed, switched on, a 2-d float32 input)
bool MatW::use_direct(const torch::Tensor& x) const {
  return g_direct_linear && direct && x.dim() == 2 && x.scalar_type() == torch::kFloat32;
}

// the small dense kernel's batch sizes (of a 2-d x): up to 3 rows, 4 only with whole vectors (with a scalar K tail
// ATen was faster there, 384 x 130: 0.9x)
bool MatW::small_rows(const torch::Tensor& x) const {
  return g_dense_small_linear && (x.size(0) <= 3 || (x.size(0) == 4 && x.size(1) % RL == 0));
}

bool MatW::native(const torch::Tensor& x) const {
  if (sparse || use_direct(x)) return true;
  return x.dim() == 2 && x.size(0) >= 1 && small_rows(x) && x.scalar_type() == torch::kFloat32 && w.is_contiguous() &&
         w.scalar_type() == torch::kFloat32 && (!bias.defined() || bias.is_contiguous());
}

torch::Tensor MatW::apply(const torch::Tensor& x) const {
  if (sparse) {
    c10::optional<torch::Tensor> b;
    if (bias.defined()) b = bias;
    return bsr_linear_t(x, ptr, idx, val, valt, b, out);
  }
  if (use_direct(x)) return small_rows(x) ? dense_small(x, w, bias) : dense_panel(x, wp, bp, out);
  if (native(x)) return dense_small(x, w, bias);
  return bias.defined() ? at::addmm(bias, x, w.t()) : at::mm(x, w.t());
}

static inline float sigm(float v) { return 1.f / (1.f + std::exp(-v)); }

// exp on one register of lanes: n = round(x / ln2), r = x - n ln2 (two-part ln2), degree-6 Taylor polynomial of
// e^r on |r| <= ln2/2 (relative error < 2e-7), times 2^n built in the exponent bits; x clamped to [-80, 80]
// (sigmoid / tanh are saturated there in fp32, and neither e^x nor 2 / (e^x + 1) comes near the denormal range).
// Clamp, rounding and exponent bits through intrinsics: written as 16-lane GCC vector ternaries they were split
// into scalar compares and blends on AVX2 (two registers per vector), and the GRU / LSTM gate math of a 64-batch
// step cost ~10 ns per hidden unit, more than the sparse matmuls (measured on a Zen 3).
static inline vr vexp(vr x) {
#if defined(__AVX512F__)
  // max / min return their second operand when either is NaN: x second, so NaN passes through
  x = (vr)_mm512_min_ps(_mm512_set1_ps(80.f), _mm512_max_ps(_mm512_set1_ps(-80.f), (__m512)x));
  const vr fn = x * rbcast(1.44269504088896341f);
  const __m512i n = _mm512_cvtps_epi32((__m512)fn);  // round to nearest
  const vr nf = (vr)_mm512_cvtepi32_ps(n);
  const vr scale = (vr)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
#elif defined(__AVX2__)
  x = (vr)_mm256_min_ps(_mm256_set1_ps(80.f), _mm256_max_ps(_mm256_set1_ps(-80.f), (__m256)x));
  const vr fn = x * rbcast(1.44269504088896341f);
  const __m256i n = _mm256_cvtps_epi32((__m256)fn);
  const vr nf = (vr)_mm256_cvtepi32_ps(n);
  const vr scale = (vr)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
#else
  vr nf, scale;
  for (int64_t i = 0; i < RL; ++i) {
    const float xi = x[i] != x[i] ? x[i] : std::min(80.f, std::max(-80.f, x[i]));
    x[i] = xi;
    const int32_t ni = xi != xi ? 0 : (int32_t)std::nearbyint(xi * 1.44269504088896341f);
    nf[i] = (float)ni;
    const int32_t bits = (ni + 127) << 23;
    std::memcpy(&scale[i], &bits, sizeof(float));
  }
#endif
  const vr r = (x - nf * rbcast(0.693145751953125f)) - nf * rbcast(1.428606765330187e-06f);
  vr p = rbcast(1.f / 720.f);
  p = p * r + rbcast(1.f / 120.f);
  p = p * r + rbcast(1.f / 24.f);
  p = p * r + rbcast(1.f / 6.f);
  p = p * r + rbcast(0.5f);
  p = p * r + rbcast(1.f);
  p = p * r + rbcast(1.f);
  return p * scale;
}
static inline vr vsigm(vr x) { return rbcast(1.f) / (rbcast(1.f) + vexp(-x)); }
static inline vr vtanh(vr x) { return rbcast(1.f) - rbcast(2.f) / (vexp(x + x) + rbcast(1.f)); }

// x: (N, T, I); returns the (N, T, H) outputs of one LSTM (gates i, f, g, o) or GRU (r, z, n) layer; reverse: the
// steps run from T - 1 down to 0 (the backward direction of a bidirectional layer; output t is still step t's).
torch::Tensor rnn_layer(const torch::Tensor& x, const MatW& ih, const MatW& hh, int64_t hidden, bool lstm, bool reverse) {
  const int64_t N = x.size(0), T = x.size(1), H = hidden, G = lstm ? 4 : 3;
  auto gx = ih.apply(x.reshape({N * T, x.size(2)})).reshape({N, T, G * H}).contiguous();
  auto out = torch::empty({N, T, H}, x.options());
  auto h = torch::zeros({N, H}, x.options());
  auto c = torch::zeros({N, H}, x.options());
  at::Tensor hn(at::detail::empty_cpu({N, H}, x.options()));  // the next state; swapped with h after every step
  const float* gxp = gx.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = reverse ? T - 1 - step : step;
    auto gh = hh.apply(h).contiguous();  // (N, G*H) with b_hh
    const float* ghp = gh.data_ptr<float>();
    float* hp = h.data_ptr<float>();
    float* hnp = hn.data_ptr<float>();
    float* cp = c.data_ptr<float>();
    for (int64_t n = 0; n < N; ++n) {
      const float* a = gxp + (n * T + t) * G * H;
      const float* b = ghp + n * G * H;
      int64_t k0 = 0;
      for (; k0 + RL <= H; k0 += RL) {  // a register of hidden units at a time
        vr hv;
        if (lstm) {
          const vr i = vsigm(rload(a + k0) + rload(b + k0)), f = vsigm(rload(a + H + k0) + rload(b + H + k0));
          const vr g = vtanh(rload(a + 2 * H + k0) + rload(b + 2 * H + k0));
          const vr o = vsigm(rload(a + 3 * H + k0) + rload(b + 3 * H + k0));
          const vr cv = f * rload(cp + n * H + k0) + i * g;
          rstore(cp + n * H + k0, cv);
          hv = o * vtanh(cv);
        } else {
          const vr r = vsigm(rload(a + k0) + rload(b + k0)), z = vsigm(rload(a + H + k0) + rload(b + H + k0));
          const vr nn = vtanh(rload(a + 2 * H + k0) + r * rload(b + 2 * H + k0));
          hv = (rbcast(1.f) - z) * nn + z * rload(hp + n * H + k0);
        }
        rstore(hnp + n * H + k0, hv);
        rstore(op + (n * T + t) * H + k0, hv);
      }
      for (int64_t k = k0; k < H; ++k) {
        float hv;
        if (lstm) {
          const float i = sigm(a[k] + b[k]), f = sigm(a[H + k] + b[H + k]);
          const float g = std::tanh(a[2 * H + k] + b[2 * H + k]), o = sigm(a[3 * H + k] + b[3 * H + k]);
          const float cv = f * cp[n * H + k] + i * g;
          cp[n * H + k] = cv;
          hv = o * std::tanh(cv);
        } else {
          const float r = sigm(a[k] + b[k]), z = sigm(a[H + k] + b[H + k]);
          const float nn = std::tanh(a[2 * H + k] + r * b[2 * H + k]);
          hv = (1.f - z) * nn + z * hp[n * H + k];
        }
        hnp[n * H + k] = hv;
        op[(n * T + t) * H + k] = hv;
      }
    }
    std::swap(h, hn);
  }
  return out;
}
