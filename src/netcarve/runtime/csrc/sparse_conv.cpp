// netcarve native CPU kernels (fp32), compiled for the host at first use (-O3 -march=native -fopenmp).
//
// sparse_conv2d: a direct convolution that visits only the non-zero weights (unstructured, pattern +
// connectivity, N:M, ... any zeros), output-stationary and vectorised over output pixels:
//   * the input is zero-padded and split into stride x stride phase planes, so every weight tap
//     (c, ky, kx) reads one contiguous, shifted window of one plane: out[q] += w * plane[off + q];
//   * outputs are computed on a "wide" grid (rows of the phase-plane width; the extra columns are
//     discarded), BLOCK pixels at a time held in vector registers across all of a filter's taps;
//   * filters are visited in the given order (PatDNN's filter-kernel reorder: similar work together) and
//     split over torch's own thread pool (nck::parallel_for: at::parallel_for, or inside a plan's team region the
//     threads of that region), so no second OpenMP pool competes with torch;
//   * bias, a residual addition and ReLU are fused into the store.
// The reference twin is F.conv2d on the dense weight (netcarve/runtime/kernels.py); tests compare both.
#include "kernels.h"

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cstring>
#include <vector>

int64_t g_parallel_threshold = (int64_t)1 << 16;
bool g_band_copy_rows = true;
int64_t g_sparse_band_min_vectors = 8;
int64_t g_small_max_vectors = 4;
bool g_row_layout = true;
bool g_banded = true;
bool g_small_rowtaps = false;
bool g_small_narrow = true;
bool g_batched_small = true;
#if defined(__AVX512F__)
double g_batched_fill = 0.7;
int64_t g_batched_block = 49152;
#else
double g_batched_fill = 0.6;
int64_t g_batched_block = 24576;
#endif
int64_t g_batched_nv = 0;  // 0: by size
int64_t g_gen_tiles = 0;    // 0: by size
bool g_gen_block_outer = false;
bool g_multirow = true;
int64_t g_multirow_min_vectors = 64;
bool g_fused_store = true;
bool g_half_rows = true;
bool g_lean_steps = true;
bool g_phase_split = true;
bool g_kx_split = true;
bool g_tiny_maps = true;
bool g_tiny_2x2_kernels = true;
int64_t g_tiny_max_batch = 16;
int64_t g_kx_jobs = 4;  // jobs per thread of the kx-split and tiny-map paths (blocks x filter groups)
bool g_kx_stage = true;
int64_t g_kx_stage_bytes = 32768;

// A conv's (N, F, Ho, Wo) output: at::detail::empty_cpu, the allocation torch::empty ends in, without the dispatcher
// around it (part of every conv's serial prelude, while a plan's other threads wait: 170 instead of 250 ns for a
// 24 x 16 x 16 output, measured in a loop on this Zen 4 VM)
static at::Tensor conv_output(int64_t N, int64_t F, int64_t Ho, int64_t Wo, const torch::Tensor& x) {
  if (g_lean_steps) return at::Tensor(at::detail::empty_cpu({N, F, Ho, Wo}, x.options()));
  return torch::empty({N, F, Ho, Wo}, x.options());
}

namespace {

using nck::bcast;
using nck::loadu;
using nck::storeu;
using nck::vecf;
using nck::VL;  // floats per vector register (kernels.h)

constexpr int64_t BLOCK = 8 * VL;      // pixels per register block (8 accumulators)
constexpr int64_t SMALL_MAX_PX = 256;  // the small-output path's accumulator (floats)

// A sparse filter's taps: the offset of tap e is chan[e] * cstride + tapoff[pos[e]] (computed here: no per-call
// offset table).
struct Taps {
  const int32_t* chan;
  const int32_t* pos;
  const float* w;
  const int64_t* tapoff;
  int64_t cstride;
  inline int64_t off(int64_t e) const { return chan[e] * cstride + tapoff[pos[e]]; }
};

// dst[i * VL ..] = sum over a filter's taps of w[e] * in[voff[i] + off[e] ..] for the NV vectors i. Vector i reads
// from its own base: in the row layout each vector is VL pixels of one output row (see direct_conv2d), so no
// lane computes a padding column; on the wide grid the vectors are contiguous (kContiguous).
template <int NV>
static inline __attribute__((always_inline)) void tap_loop(const float* __restrict in, const int64_t* __restrict voff,
                                                           const int64_t* __restrict off, const float* __restrict w,
                                                           int64_t ntaps, vecf (&a)[NV]) {
  const float* src[NV];
  for (int i = 0; i < NV; ++i) {
    a[i] = bcast(0.f);
    src[i] = in + voff[i];
  }
  for (int64_t e = 0; e < ntaps; ++e) {
    const int64_t o = off[e];
    const vecf we = bcast(w[e]);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) a[i] += we * loadu(src[i] + o);
  }
}

template <int NV>
static inline void accumulate_rows(const float* __restrict in, const int64_t* __restrict voff,
                                   const int64_t* __restrict off, const float* __restrict w, int64_t ntaps,
                                   float* __restrict dst) {
  vecf a[NV];
  tap_loop<NV>(in, voff, off, w, ntaps, a);
  for (int i = 0; i < NV; ++i) storeu(dst + i * VL, a[i]);
}

// accumulate_rows with the row layout's epilogue (store_vecs) applied to the registers: out[ooff[i] ..+VL) =
// relu?(acc + bias (+ res)), the same arithmetic in the same order, without the accumulators' round trip through
// a buffer (per filter and block 8 stores and 8 loads; 5-8% of a ResNet-56 layer's kernel time at batch 1 in
// benchmarks/codegen_probe.py, one thread)
template <int NV>
static inline void accumulate_rows_store(const float* __restrict in, const int64_t* __restrict voff,
                                         const int64_t* __restrict off, const float* __restrict w, int64_t ntaps,
                                         float* __restrict op, const float* __restrict rp,
                                         const int64_t* __restrict ooff, float bias, bool relu) {
  vecf a[NV];
  tap_loop<NV>(in, voff, off, w, ntaps, a);
  const vecf b = bcast(bias);
  for (int i = 0; i < NV; ++i) {
    const int64_t o = ooff[i];
    vecf v = a[i] + b;
    if (rp) v += loadu(rp + o);
    if (relu) v = nck::vmax0(v);
    storeu(op + o, v);
  }
}

// offsets of NV contiguous vectors (the wide grid): after inlining the same code as a single base
constexpr int64_t kContiguous[8] = {0, VL, 2 * VL, 3 * VL, 4 * VL, 5 * VL, 6 * VL, 7 * VL};

// dst[0 .. NV*VL) = sum over a filter's taps of w[e] * in[off[e] + q0 + 0 .. NV*VL)
template <int NV>
static inline void accumulate(const float* __restrict in, const int64_t* __restrict off, const float* __restrict w,
                              int64_t ntaps, int64_t q0, float* __restrict dst) {
  accumulate_rows<NV>(in + q0, kContiguous, off, w, ntaps, dst);
}

// The row layout's tables, built once per layer (integer divisions per block cost more than a sparse filter's
// taps): for vector v = (n, y, x0 / VL) of the output rows, vin[v] = its offset in the phase planes and
// vout[v] = its offset in the (N, F, Ho, Wo) output for filter 0; padded with the last vector to a multiple of pad_to.
static void row_tables(int64_t N, int64_t Ho, int64_t Wo, int64_t plane, int64_t Wph, int64_t F, int64_t pad_to,
                       std::vector<int64_t>& vin, std::vector<int64_t>& vout) {
  const int64_t WV = Wo / VL, nvec = N * Ho * WV, padded = (nvec + pad_to - 1) / pad_to * pad_to;
  vin.resize(padded);
  vout.resize(padded);
  int64_t v = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t y = 0; y < Ho; ++y)
      for (int64_t x0 = 0; x0 < Wo; x0 += VL, ++v) {
        vin[v] = n * plane + y * Wph + x0;
        vout[v] = n * F * Ho * Wo + y * Wo + x0;
      }
  for (; v < padded; ++v) {
    vin[v] = vin[nvec - 1];
    vout[v] = vout[nvec - 1];
  }
}

// The row layout's epilogue for one filter: out[ooff[k] ..+VL) = relu?(acc[k] + bias (+ res[ooff[k] ..])) for the
// nv vectors of a block, whole vectors at a time (op / rp already offset to the filter's channel)
static inline void store_vecs(float* __restrict op, const float* __restrict rp, const int64_t* __restrict ooff,
                              const float* __restrict acc, int64_t nv, float bias, bool relu) {
  const vecf b = bcast(bias);
  for (int64_t k = 0; k < nv; ++k) {
    const int64_t o = ooff[k];
    vecf a = loadu(acc + k * VL) + b;
    if (rp) a += loadu(rp + o);
    if (relu) a = nck::vmax0(a);
    storeu(op + o, a);
  }
}

// out[i] = relu?(acc[i] + bias (+ res[i])) for one row segment (restrict + compile-time ReLU: vectorises)
template <bool RELU>
static inline void store_row(float* __restrict o, const float* __restrict a, const float* __restrict rr, float bv,
                             int64_t n) {
  if (rr) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = a[i] + bv + rr[i];
      o[i] = RELU ? (v > 0.f ? v : 0.f) : v;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float v = a[i] + bv;
      o[i] = RELU ? (v > 0.f ? v : 0.f) : v;
    }
  }
}

// one vector of pixels: four independent accumulator chains over the taps hide the FMA latency
static inline void accumulate_one(const float* __restrict in, const int64_t* __restrict off,
                                  const float* __restrict w, int64_t ntaps, int64_t q0, float* __restrict dst) {
  vecf a0 = bcast(0.f), a1 = a0, a2 = a0, a3 = a0;
  int64_t e = 0;
  in += q0;
  for (; e + 4 <= ntaps; e += 4) {
    a0 += bcast(w[e]) * loadu(in + off[e]);
    a1 += bcast(w[e + 1]) * loadu(in + off[e + 1]);
    a2 += bcast(w[e + 2]) * loadu(in + off[e + 2]);
    a3 += bcast(w[e + 3]) * loadu(in + off[e + 3]);
  }
  for (; e < ntaps; ++e) a0 += bcast(w[e]) * loadu(in + off[e]);
  storeu(dst, (a0 + a1) + (a2 + a3));
}

// A partial block of nv (1-8) vectors: every vector of a tap shares its offset and weight loads (one vector per
// pass over the taps reloaded both for every vector: 3 loads per multiply-add). Measured on a Zen 4 VM (AVX-512,
// 2 threads): ResNet-56's 64-channel 8x8 layers at batch 1 (100 wide-grid positions, one partial block of 7
// vectors) ran 26 us each with a pass per vector. Reads the same extent as nv single-vector passes.
static inline void accumulate_part(const float* __restrict in, const int64_t* __restrict voff,
                                   const int64_t* __restrict off, const float* __restrict w, int64_t ntaps, int64_t nv,
                                   float* __restrict dst) {
  switch (nv) {
    case 8: accumulate_rows<8>(in, voff, off, w, ntaps, dst); break;
    case 7: accumulate_rows<7>(in, voff, off, w, ntaps, dst); break;
    case 6: accumulate_rows<6>(in, voff, off, w, ntaps, dst); break;
    case 5: accumulate_rows<5>(in, voff, off, w, ntaps, dst); break;
    case 4: accumulate_rows<4>(in, voff, off, w, ntaps, dst); break;
    case 3: accumulate_rows<3>(in, voff, off, w, ntaps, dst); break;
    case 2: accumulate_rows<2>(in, voff, off, w, ntaps, dst); break;
    default:
      for (int64_t k = 0; k < nv; ++k) accumulate_one(in, off, w, ntaps, voff[k], dst + k * VL);
  }
}

// accumulate_part + store_vecs for nv in 2..8 (accumulate_rows_store)
static inline void accumulate_part_store(const float* __restrict in, const int64_t* __restrict voff,
                                         const int64_t* __restrict off, const float* __restrict w, int64_t ntaps,
                                         int64_t nv, float* __restrict op, const float* __restrict rp,
                                         const int64_t* __restrict ooff, float bias, bool relu) {
  switch (nv) {
    case 8: accumulate_rows_store<8>(in, voff, off, w, ntaps, op, rp, ooff, bias, relu); break;
    case 7: accumulate_rows_store<7>(in, voff, off, w, ntaps, op, rp, ooff, bias, relu); break;
    case 6: accumulate_rows_store<6>(in, voff, off, w, ntaps, op, rp, ooff, bias, relu); break;
    case 5: accumulate_rows_store<5>(in, voff, off, w, ntaps, op, rp, ooff, bias, relu); break;
    case 4: accumulate_rows_store<4>(in, voff, off, w, ntaps, op, rp, ooff, bias, relu); break;
    case 3: accumulate_rows_store<3>(in, voff, off, w, ntaps, op, rp, ooff, bias, relu); break;
    default: accumulate_rows_store<2>(in, voff, off, w, ntaps, op, rp, ooff, bias, relu);
  }
}

#if defined(__AVX512F__)
// Half-width row vectors (8 floats, ymm) for outputs whose rows are a multiple of 8 but not of 16 (8x8 maps): one
// output row per vector, no padding lanes, no shifted copies. On Zen 4 two 256-bit FMAs / loads per cycle move as
// many floats as one 512-bit one, so nothing is lost to the narrower vector; the 16-float wide grid computed 100
// positions (7 vectors) for an 8x8 map's 64 outputs.
constexpr int64_t HVL = 8;
typedef float vech __attribute__((vector_size(HVL * 4)));
typedef float vechu __attribute__((vector_size(HVL * 4), aligned(4)));
static inline vech loadh(const float* p) { return *reinterpret_cast<const vechu*>(p); }
static inline void storeh(float* p, vech v) { *reinterpret_cast<vechu*>(p) = v; }
static inline vech bcasth(float w) { return (vech)_mm256_set1_ps(w); }
static inline vech vmax0h(vech a) { return (vech)_mm256_max_ps((__m256)a, _mm256_setzero_ps()); }

template <int NV>
static inline void accumulate_rows_store_h(const float* __restrict in, const int64_t* __restrict voff,
                                           const int64_t* __restrict off, const float* __restrict w, int64_t ntaps,
                                           float* __restrict op, const float* __restrict rp,
                                           const int64_t* __restrict ooff, float bias, bool relu) {
  vech a[NV];
  const float* src[NV];
  for (int i = 0; i < NV; ++i) {
    a[i] = bcasth(0.f);
    src[i] = in + voff[i];
  }
  for (int64_t e = 0; e < ntaps; ++e) {
    const int64_t o = off[e];
    const vech we = bcasth(w[e]);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) a[i] += we * loadh(src[i] + o);
  }
  const vech b = bcasth(bias);
  for (int i = 0; i < NV; ++i) {
    const int64_t o = ooff[i];
    vech v = a[i] + b;
    if (rp) v += loadh(rp + o);
    if (relu) v = vmax0h(v);
    storeh(op + o, v);
  }
}

static inline void accumulate_part_store_h(const float* __restrict in, const int64_t* __restrict voff,
                                           const int64_t* __restrict off, const float* __restrict w, int64_t ntaps,
                                           int64_t nv, float* __restrict op, const float* __restrict rp,
                                           const int64_t* __restrict ooff, float bias, bool relu) {
  switch (nv) {
    case 8: accumulate_rows_store_h<8>(in, voff, off, w, ntaps, op, rp, ooff, bias, relu); break;
    case 7: accumulate_rows_store_h<7>(in, voff, off, w, ntaps, op, rp, ooff, bias, relu); break;
    case 6: accumulate_rows_store_h<6>(in, voff, off, w, ntaps, op, rp, ooff, bias, relu); break;
    case 5: accumulate_rows_store_h<5>(in, voff, off, w, ntaps, op, rp, ooff, bias, relu); break;
    case 4: accumulate_rows_store_h<4>(in, voff, off, w, ntaps, op, rp, ooff, bias, relu); break;
    case 3: accumulate_rows_store_h<3>(in, voff, off, w, ntaps, op, rp, ooff, bias, relu); break;
    case 2: accumulate_rows_store_h<2>(in, voff, off, w, ntaps, op, rp, ooff, bias, relu); break;
    default: accumulate_rows_store_h<1>(in, voff, off, w, ntaps, op, rp, ooff, bias, relu);
  }
}
#endif

// Every tap's input offset (Taps::off), computed once per layer geometry: the plane size (a band's or the whole
// batch's), Wph and the stride key the cache (the formula is the same for both layouts). Recomputed per call and
// job, these were a quarter of a 64-channel 8x8 layer's time at batch 1 (perf, Zen 4).
static std::shared_ptr<const std::vector<int64_t>> tap_offsets(const Taps& taps, int64_t E, int64_t plane_key,
                                                               int64_t Wph, int64_t S, TapOffCache* cache) {
  if (cache) {
    std::lock_guard<std::mutex> lock(cache->m);
    if (cache->key[0] == plane_key && cache->key[1] == Wph && cache->key[2] == S && cache->offs &&
        (int64_t)cache->offs->size() == E)
      return cache->offs;
  }
  auto o = std::make_shared<std::vector<int64_t>>(E);
  for (int64_t e = 0; e < E; ++e) (*o)[e] = taps.off(e);
  if (cache) {
    std::lock_guard<std::mutex> lock(cache->m);
    cache->key[0] = plane_key;
    cache->key[1] = Wph;
    cache->key[2] = S;
    cache->offs = o;
  }
  return o;
}

// The zero-padded input split into S x S phase planes, channel-major with the batch inside:
// planes[c][ry][rx][n][yy][xx] (see sparse_conv2d), followed by `tail` zeros that over-reads land in.
static torch::Tensor phase_planes(const torch::Tensor& x, int64_t S, int64_t pad, int64_t Hph, int64_t Wph,
                                  int64_t tail) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t plane = Hph * Wph, group = N * plane;
  // stride 1: only the padding ring and the tail need zeros (rows are copied whole); stride > 1: all of it
  const int64_t total_len = C * S * S * group + tail;
  auto planes = S == 1 ? torch::empty({total_len}, x.options()) : torch::zeros({total_len}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = planes.data_ptr<float>();
  if (S == 1) std::fill(dst + C * group, dst + total_len, 0.f);
  const int64_t fill_grain = N * C * H * W < (int64_t)1 << 16 ? N * C : 1;
  const nck::PhaseCols pc(S, pad);
  nck::parallel_for(0, C * N, fill_grain, [&](int64_t b, int64_t e) {
    for (int64_t cn = b; cn < e; ++cn) {
      const int64_t c = cn / N, n = cn % N;
      const float* s = src + (n * C + c) * H * W;
      if (S == 1) {
        // zero the plane in one pass, then copy the rows in (a memcpy each): per-row scalar copies and small
        // fills of the padding columns were ~60k instructions for a 16 x 32 x 32 input (callgrind)
        float* d = dst + c * group + n * plane;
        std::memset(d, 0, sizeof(float) * plane);
        for (int64_t y = 0; y < H; ++y) std::memcpy(d + (y + pad) * Wph + pad, s + y * W, sizeof(float) * W);
        continue;
      }
      for (int64_t y = 0, ry = pad % S, yy = pad / S; y < H; ++y) {  // padded row y + pad = yy * S + ry
        const float* sr = s + y * W;
        for (int64_t rx = 0; rx < S; ++rx) {  // columns x with (x + pad) % S == rx go to phase rx
          float* d = dst + ((c * S + ry) * S + rx) * group + n * plane + yy * Wph + pc.dx[rx];
          for (int64_t xx = pc.x0[rx]; xx < W; xx += S) *d++ = sr[xx];
        }
        if (++ry == S) ry = 0, ++yy;
      }
    }
  });
  return planes;
}

// Output rows [y0, y1) of one image need the zero-padded input rows [y0 * S, (y1 - 1) * S + kh): this band split
// into S x S phase planes of Hb x Wph, channel-major (buf[c][ry][rx][yy][xx], planes of bplane floats).
static void band_planes(const float* __restrict src, int64_t C, int64_t H, int64_t W, int64_t S, int64_t pad,
                        int64_t iy0, int64_t iy1, int64_t bplane, int64_t Wph, float* __restrict buf) {
#if defined(__AVX512F__)
  if (S == 1 && g_band_copy_rows && Wph <= 16 * 16) {
    // stride 1 with AVX-512: each padded row written once by masked 16-float loads / stores (the left pad, the
    // row and the right pad in one pass, loads masked to the row so nothing outside it is read), instead of a
    // memset of the band and a memcpy per row (library calls of 32-128 bytes each at batch 1)
    const int64_t nch = (Wph + 15) / 16, nrows = iy1 - iy0;
    __mmask16 lm[16], sm[16];
    for (int64_t k = 0; k < nch; ++k) {
      uint32_t l = 0, st = 0;
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t x = k * 16 + i;
        if (x < Wph) st |= 1u << i;
        if (x >= pad && x < pad + W) l |= 1u << i;
      }
      lm[k] = (__mmask16)l;
      sm[k] = (__mmask16)st;
    }
    const __m512 z = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const float* sc = src + c * H * W;
      float* bc = buf + c * bplane;
      for (int64_t ly = 0; ly < nrows; ++ly) {
        const int64_t py = iy0 + ly;
        float* d = bc + ly * Wph;
        if (py < pad || py >= H + pad) {
          for (int64_t k = 0; k < nch; ++k) _mm512_mask_storeu_ps(d + k * 16, sm[k], z);
          continue;
        }
        const float* sr = sc + (py - pad) * W - pad;  // sr[x] is padded column x (read only where lm is set)
        for (int64_t k = 0; k < nch; ++k)
          _mm512_mask_storeu_ps(d + k * 16, sm[k], _mm512_maskz_loadu_ps(lm[k], sr + k * 16));
      }
      for (int64_t i = nrows * Wph; i < bplane; i += 16)
        _mm512_mask_storeu_ps(bc + i, (__mmask16)(bplane - i >= 16 ? 0xFFFF : (1u << (bplane - i)) - 1), z);
    }
    return;
  }
#endif
  std::memset(buf, 0, sizeof(float) * C * S * S * bplane);
  if (S > 1 && !g_phase_split) {  // the earlier copy (set_phase_split(false)), kept for A/B runs
    for (int64_t c = 0; c < C; ++c) {
      const float* sc = src + c * H * W;
      float* bc = buf + c * S * S * bplane;
      for (int64_t py = std::max<int64_t>(iy0, pad); py < std::min<int64_t>(iy1, H + pad); ++py) {
        const int64_t ly = py - iy0, ry = ly % S, yy = ly / S;
        const float* sr = sc + (py - pad) * W;
        for (int64_t rx = 0; rx < S; ++rx) {
          const int64_t x0 = ((rx - pad) % S + S) % S;
          float* d = bc + (ry * S + rx) * bplane + yy * Wph + (x0 + pad) / S;
#if defined(__AVX512F__)
          if (S == 2 && g_band_copy_rows) {
            nck::every_other(sr, W, x0, d);
            continue;
          }
#endif
          for (int64_t xx = x0; xx < W; xx += S) *d++ = sr[xx];
        }
      }
    }
    return;
  }
  const nck::PhaseCols pc(S, pad);
  const int64_t py0 = std::max<int64_t>(iy0, pad), py1 = std::min<int64_t>(iy1, H + pad);
  for (int64_t c = 0; c < C; ++c) {
    const float* sc = src + c * H * W;
    float* bc = buf + c * S * S * bplane;
    // band row ly = py - iy0 = yy * S + ry, stepped without divisions
    for (int64_t py = py0, ry = (py0 - iy0) % S, yy = (py0 - iy0) / S; py < py1; ++py) {
      const float* sr = sc + (py - pad) * W;
      if (S == 1) {
        std::memcpy(bc + yy * Wph + pad, sr, sizeof(float) * W);
        ++yy;
        continue;
      }
#if defined(__AVX512F__)
      if (S == 2 && g_band_copy_rows) {  // both column phases by vector permutes (nck::split_even_odd)
        const int64_t re = pc.x0[0] == 0 ? 0 : 1;  // the phase of the even columns
        float* d = bc + ry * S * bplane + yy * Wph;
        nck::split_even_odd(sr, W, d + re * bplane + pc.dx[re], d + (1 - re) * bplane + pc.dx[1 - re]);
        if (++ry == S) ry = 0, ++yy;
        continue;
      }
#endif
      for (int64_t rx = 0; rx < S; ++rx) {  // columns x with (x + pad) % S == rx go to phase rx
        float* d = bc + (ry * S + rx) * bplane + yy * Wph + pc.dx[rx];
        for (int64_t xx = pc.x0[rx]; xx < W; xx += S) *d++ = sr[xx];
      }
      if (++ry == S) ry = 0, ++yy;
    }
  }
}

// The banded work split of both conv kernels (see direct_conv2d): the N * Ho output rows cut into nb contiguous
// bands (at batch 1 bands of one image, at large batches whole images), times ng filter groups; each task builds
// the padded phase planes of its band (+ halo) in a thread-local buffer, one image segment at a time.
struct Bands {
  int64_t N, C, H, W, S, pad, kh, Ho, Wo, Wph, F, vl, WV, R, nb, ng, rows_max, bplane, bfloats;
  // vl: floats per row vector (VL; HVL for the half-width rows of sparse_conv2d)
  Bands(int64_t N_, int64_t C_, int64_t H_, int64_t W_, int64_t S_, int64_t pad_, int64_t kh_, int64_t Ho_,
        int64_t Wo_, int64_t Wph_, int64_t F_, int64_t ntasks, int64_t nbands, int64_t vl_ = VL)
      : N(N_), C(C_), H(H_), W(W_), S(S_), pad(pad_), kh(kh_), Ho(Ho_), Wo(Wo_), Wph(Wph_), F(F_), vl(vl_), WV(Wo_ / vl_),
        R(N_ * Ho_), nb(nbands), ng(ntasks / nbands), rows_max(std::min<int64_t>(Ho_, (R + nb - 1) / nb)),
        bplane(((rows_max - 1) * S_ + kh_ + S_ - 1) / S_ * Wph_), bfloats(C_ * S_ * S_ * bplane + 2 * VL) {}
  // body(g, planes, vin, vout, nvec) for every image segment of every task: filter group g; nvec row vectors,
  // vector v reading planes + vin[v] (+ a tap's offset) and storing to vout[v] (+ a filter's f * Ho * Wo)
  template <class Body>
  void run(const float* xs, Body&& body) const {
    nck::parallel_for(0, nb * ng, 1, [&](int64_t tb, int64_t te) {
      thread_local std::vector<float> buf;
      thread_local std::vector<int64_t> vin, vout;
      if ((int64_t)buf.size() < bfloats) buf.assign(bfloats, 0.f);
      for (int64_t task = tb; task < te; ++task) {
        const int64_t band = task / ng, g = task % ng, r1 = (band + 1) * R / nb;
        // a segment never exceeds rows_max rows: bands are at most ceil(R / nb) rows, segments at most Ho
        for (int64_t r = band * R / nb; r < r1;) {
          const int64_t n = r / Ho, y0 = r % Ho, y1 = std::min<int64_t>(Ho, y0 + (r1 - r));
          band_planes(xs + n * C * H * W, C, H, W, S, pad, y0 * S, (y1 - 1) * S + kh, bplane, Wph, buf.data());
          const int64_t nvec = (y1 - y0) * WV;
          vin.resize(nvec);
          vout.resize(nvec);
          for (int64_t v = 0; v < nvec; ++v) {
            const int64_t yl = v / WV, x0 = (v % WV) * vl;
            vin[v] = yl * Wph + x0;
            vout[v] = n * F * Ho * Wo + (y0 + yl) * Wo + x0;
          }
          body(g, (const float*)buf.data(), (const int64_t*)vin.data(), (const int64_t*)vout.data(), nvec);
          r += y1 - y0;
        }
      }
    });
  }
};

// The filters without taps (all-zero weights, absent from the L lists of filter_order `ord`), ascending.
static std::vector<int64_t> empty_filters(const int32_t* ord, int64_t L, int64_t F) {
  std::vector<char> has(F, 0);
  for (int64_t i = 0; i < L; ++i) has[ord[i]] = 1;
  std::vector<int64_t> empty;
  for (int64_t f = 0; f < F; ++f)
    if (!has[f]) empty.push_back(f);
  return empty;
}

// Stores one filter's outputs computed on the wide grid (flat positions q = n * plane + y * Wph + x of the
// phase planes) for [q0, q0 + qn) from acc, keeping the valid ones, with bias (+ residual) and ReLU.
struct WideStore {
  float* op;
  const float* rp;
  const float* bp;
  bool relu;
  int64_t F, Ho, Wo, Hph, Wph, plane, total;
  void operator()(const float* acc, int64_t f, int64_t q0, int64_t qn) const { block(acc, 0, f, 1, q0, qn); }
  // filters f0 .. f0 + nf - 1 at once (filter j's values at acc + j * ldacc): the position bookkeeping of
  // the wide grid is done once per row segment, not once per filter
  void block(const float* acc, int64_t ldacc, int64_t f0, int64_t nf, int64_t q0, int64_t qn) const {
    const int64_t qe = std::min<int64_t>(q0 + qn, total);
    int64_t q = q0, n = q / plane, r = q % plane, y = r / Wph, x0 = r % Wph;  // then advanced without division
    while (q < qe) {
      const int64_t seg = std::min<int64_t>(Wph - x0, qe - q);
      if (y < Ho && x0 < Wo) {
        const int64_t xe = std::min<int64_t>(Wo, x0 + seg);
        for (int64_t j = 0; j < nf; ++j) {
          const int64_t f = f0 + j;
          const float bv = bp ? bp[f] : 0.f;
          float* o = op + ((n * F + f) * Ho + y) * Wo;
          const float* rr = rp ? rp + ((n * F + f) * Ho + y) * Wo : nullptr;
          const float* a = acc + j * ldacc + (q - q0) - x0;
          if (relu)
            store_row<true>(o + x0, a + x0, rr ? rr + x0 : nullptr, bv, xe - x0);
          else
            store_row<false>(o + x0, a + x0, rr ? rr + x0 : nullptr, bv, xe - x0);
        }
      }
      q += seg;
      x0 += seg;
      if (x0 == Wph) {
        x0 = 0;
        if (++y == Hph) {
          y = 0;
          ++n;
        }
      }
    }
  }
};

// The fused epilogue's inputs: contiguous bias and residual (checked against the output's shape), or null.
struct Epilogue {
  torch::Tensor bias_c, res;
  const float* bp = nullptr;
  const float* rp = nullptr;
  Epilogue(const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& residual,
           const torch::Tensor& out, const char* who) {
    if (bias.has_value()) {
      bias_c = bias->contiguous();
      bp = bias_c.data_ptr<float>();
    }
    if (residual.has_value()) {
      res = residual->contiguous();
      TORCH_CHECK(res.sizes() == out.sizes(), who, ": residual shape differs from the output");
      rp = res.data_ptr<float>();
    }
  }
};

// Per kernel position (ky, kx) and output position q = (n * Ho + y) * Wo + x: the input offset that q reads from
// channel 0 (n * C * H * W + iy * W + ix), -1 in the padding; rows of `stride` entries (>= N * Ho * Wo).
template <typename T>
static void window_offsets(int64_t N, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t S, int64_t pad,
                           int64_t Ho, int64_t Wo, int64_t stride, T* tab) {
  for (int64_t ky = 0; ky < kh; ++ky)
    for (int64_t kx = 0; kx < kw; ++kx) {
      T* t = tab + (ky * kw + kx) * stride;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t y = 0; y < Ho; ++y)
          for (int64_t xo = 0; xo < Wo; ++xo) {
            const int64_t iy = y * S + ky - pad, ix = xo * S + kx - pad;
            *t++ = (iy < 0 || iy >= H || ix < 0 || ix >= W) ? T(-1) : T((n * C * H + iy) * W + ix);
          }
    }
}

// The gather tables of the column-tiled paths (sparse_conv2d_batched, gen_conv2d): per kernel position and column q
// (of Pt, P = N * Ho * Wo real ones) the input offset for channel 0 (0 in the padding and past P) and a lane mask
// (-1 / 0), and the output offset of column q for filter 0 (F filters).
static void column_tables(int64_t N, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t S, int64_t pad,
                          int64_t Ho, int64_t Wo, int64_t Pt, int64_t F, std::vector<int32_t>& tab,
                          std::vector<int32_t>& valid, std::vector<int64_t>& vout) {
  const int64_t KK = kh * kw, HoWo = Ho * Wo, P = N * HoWo;
  tab.assign(KK * Pt, -1);
  valid.assign(KK * Pt, 0);
  window_offsets(N, C, H, W, kh, kw, S, pad, Ho, Wo, Pt, tab.data());
  for (int64_t i = 0; i < KK * Pt; ++i) {
    valid[i] = tab[i] >= 0 ? -1 : 0;
    tab[i] = std::max<int32_t>(tab[i], 0);
  }
  vout.assign(Pt, 0);
  for (int64_t q = 0; q < P; ++q) vout[q] = (q / HoWo) * F * HoWo + q % HoWo;
}

// The im2col matrix of x: C * kh * kw rows of the P = N * Ho * Wo output positions (zeros where the window
// is in the padding), each row padded to Pp floats (a multiple of the vector width: aligned rows).
static torch::Tensor im2col_rows(const torch::Tensor& x, int64_t kh, int64_t kw, int64_t S, int64_t pad,
                                 int64_t Ho, int64_t Wo, int64_t Pp) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), KK = kh * kw, P = N * Ho * Wo;
  auto X = torch::empty({C * KK * Pp}, x.options());  // rows of whole vectors (torch buffers are 64-byte aligned)
  float* xp = X.data_ptr<float>();
  const float* src = x.data_ptr<float>();
  // Per kernel position, the input offset (from the channel's plane in image 0) that each output position reads,
  // -1 in the padding: computed once, then every channel's rows are plain gathers. (Copying row segments with
  // per-segment bounds was ~14 ns per row: 65 us for a 512-channel 2x2 layer, a fifth of its sparse conv.)
  std::vector<int64_t> tab(KK * P);
  window_offsets(N, C, H, W, kh, kw, S, pad, Ho, Wo, P, tab.data());
  // split over the threads from 16k elements (a quarter of the multiply-add threshold: copies are cheap per element;
  // it was 16x the threshold, so a 512-channel 4x4 layer's 74k-element matrix was built on one thread while the
  // other waited: VGG-16 at batch 1 1.08x / 1.27x faster (pattern / 90% unstructured, one process, alternated))
  const int64_t fill_grain = C * KK * P < g_parallel_threshold / 4 ? C : 1;
  nck::parallel_for(0, C, fill_grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const float* sc = src + c * H * W;
      for (int64_t kk = 0; kk < KK; ++kk) {
        float* row = xp + (c * KK + kk) * Pp;
        const int64_t* t = tab.data() + kk * P;
        for (int64_t q = 0; q < P; ++q) row[q] = t[q] >= 0 ? sc[t[q]] : 0.f;
        for (int64_t q = P; q < Pp; ++q) row[q] = 0.f;
      }
    }
  });
  return X;
}

}  // namespace

// The taps of filter lists [ptr, ord) regrouped by im2col row r = chan * KK + pos for ng filter groups of about
// equal taps (see RowTaps); within a row, ascending filters.
static std::shared_ptr<const RowTaps> build_row_taps(const int32_t* ptr, const int32_t* ch, const int32_t* pos,
                                                     const float* wv, const int32_t* ord, int64_t L, int64_t F,
                                                     int64_t K, int64_t KK, int64_t ng) {
  auto rt = std::make_shared<RowTaps>();
  rt->ngroups = ng;
  std::vector<int64_t> list_of(F, -1);
  for (int64_t i = 0; i < L; ++i) list_of[ord[i]] = i;
  const int64_t E = ptr[L];
  rt->f0.assign(ng + 1, F);
  rt->f0[0] = 0;
  int64_t seen = 0, g = 1;
  for (int64_t f = 0; f < F && g < ng; ++f) {  // cut where the running tap count passes g * E / ng
    if (list_of[f] >= 0) seen += ptr[list_of[f] + 1] - ptr[list_of[f]];
    while (g < ng && seen * ng >= g * E) rt->f0[g++] = f + 1;
  }
  for (; g < ng; ++g) rt->f0[g] = F;
  rt->ptr.resize(ng);
  rt->fil.resize(ng);
  rt->w.resize(ng);
  for (int64_t gi = 0; gi < ng; ++gi) {
    auto& rp = rt->ptr[gi];
    rp.assign(K + 1, 0);
    for (int64_t f = rt->f0[gi]; f < rt->f0[gi + 1]; ++f)
      if (list_of[f] >= 0)
        for (int64_t t = ptr[list_of[f]]; t < ptr[list_of[f] + 1]; ++t) ++rp[ch[t] * KK + pos[t] + 1];
    for (int64_t r = 0; r < K; ++r) rp[r + 1] += rp[r];
    std::vector<int32_t> fill(rp.begin(), rp.end() - 1);
    rt->fil[gi].resize(rp[K]);
    rt->w[gi].resize(rp[K]);
    for (int64_t f = rt->f0[gi]; f < rt->f0[gi + 1]; ++f)
      if (list_of[f] >= 0)
        for (int64_t t = ptr[list_of[f]]; t < ptr[list_of[f] + 1]; ++t) {
          const int32_t e = fill[ch[t] * KK + pos[t]]++;
          rt->fil[gi][e] = (uint16_t)(f - rt->f0[gi]);
          rt->w[gi][e] = wv[t];
        }
  }
  return rt;
}

// acc[fil * Pp + i * VL ..] += w * X[r] (NV vectors) for every (fil, w) pair of every im2col row r: each row is
// loaded once into registers and multiplied into the accumulators of the filters that use it (an outer product;
// the accumulators of one thread's filters stay in L1 / L2, the rows stream in order).
template <int NV>
static void row_taps_accumulate(const float* __restrict xp, int64_t Pp, int64_t K, const int32_t* __restrict rptr,
                                const uint16_t* __restrict fil, const float* __restrict w, float* __restrict acc) {
  for (int64_t r = 0; r < K; ++r) {
    const int32_t e0 = rptr[r], e1 = rptr[r + 1];
    if (e0 == e1) continue;
    vecf xv[NV];
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) xv[i] = loadu(xp + r * Pp + i * VL);
    for (int32_t e = e0; e < e1; ++e) {
      float* a = acc + (int64_t)fil[e] * Pp;
      const vecf wv = bcast(w[e]);
#pragma GCC unroll 4
      for (int i = 0; i < NV; ++i) storeu(a + i * VL, loadu(a + i * VL) + wv * xv[i]);
    }
  }
}

// 4 / 8 / 16-float vectors with unaligned loads and stores and a broadcast (GCC ignores vector_size with a
// template-dependent size, and the aligned(4) of an unaligned type passed through a template: one struct each)
typedef float vec4f __attribute__((vector_size(16)));
typedef float vec4fu __attribute__((vector_size(16), aligned(4)));
typedef float vec8f __attribute__((vector_size(32)));
typedef float vec8fu __attribute__((vector_size(32), aligned(4)));
template <int W>
struct VecN;
template <>
struct VecN<4> {
  typedef vec4f v;
  static v ld(const float* p) { return *reinterpret_cast<const vec4fu*>(p); }
  static void st(float* p, v a) { *reinterpret_cast<vec4fu*>(p) = a; }
  static v bc(float x) { return (v)_mm_set1_ps(x); }
};
template <>
struct VecN<8> {
  typedef vec8f v;
  static v ld(const float* p) { return *reinterpret_cast<const vec8fu*>(p); }
  static void st(float* p, v a) { *reinterpret_cast<vec8fu*>(p) = a; }
  static v bc(float x) { return (v)_mm256_set1_ps(x); }
};
#if defined(__AVX512F__)
template <>
struct VecN<16> {
  typedef vecf v;
  static v ld(const float* p) { return loadu(p); }
  static void st(float* p, v a) { storeu(p, a); }
  static v bc(float x) { return (v)_mm512_set1_ps(x); }
};
#endif

// acc[0 .. W) = sum over taps [t0, t1) of w[t] * X[row[t] * W .. + W) for im2col rows of W = 4, 8 or 16 floats
// (xmm / ymm / zmm multiply-adds; four chains hide the FMA latency)
template <int W, typename I>
static inline void gather_rows(const float* __restrict xq, const I* __restrict row, const float* __restrict w,
                               int64_t t0, int64_t t1, float* __restrict acc) {
  using V = VecN<W>;
  typename V::v a0 = V::bc(0.f), a1 = a0, a2 = a0, a3 = a0;
  int64_t t = t0;
  for (; t + 4 <= t1; t += 4) {
    a0 += V::bc(w[t]) * V::ld(xq + (int64_t)row[t] * W);
    a1 += V::bc(w[t + 1]) * V::ld(xq + (int64_t)row[t + 1] * W);
    a2 += V::bc(w[t + 2]) * V::ld(xq + (int64_t)row[t + 2] * W);
    a3 += V::bc(w[t + 3]) * V::ld(xq + (int64_t)row[t + 3] * W);
  }
  for (; t < t1; ++t) a0 += V::bc(w[t]) * V::ld(xq + (int64_t)row[t] * W);
  V::st(acc, (a0 + a1) + (a2 + a3));
}

// The small-output path of sparse_conv2d (see there). X: (C*kh*kw, Pp) im2col of x, 64-byte aligned rows.
static torch::Tensor sparse_conv2d_small(const torch::Tensor& x, const torch::Tensor& tp, const torch::Tensor& tc,
                                         const torch::Tensor& tq, const torch::Tensor& tw, const torch::Tensor& fo,
                                         const c10::optional<torch::Tensor>& bias,
                                         const c10::optional<torch::Tensor>& residual, int64_t F, int64_t kh, int64_t kw,
                                         int64_t S, int64_t pad, bool relu, int64_t Ho, int64_t Wo, int64_t P,
                                         int64_t Pp, TapOffCache* cache) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), KK = kh * kw;
  const int64_t nv = Pp / VL;
  const bool rowtaps = cache && g_small_rowtaps && nv <= 2 && F <= 65536;
  // im2col row length: whole vectors, or 4 / 8 floats for the gather path's narrow outputs (below)
  const int64_t Pq = rowtaps ? Pp : (g_small_narrow && P <= 4) ? 4 : (g_small_narrow && P <= 8) ? 8 : Pp;
  auto X = im2col_rows(x, kh, kw, S, pad, Ho, Wo, Pq);
  const float* xp = X.data_ptr<float>();
  auto out = conv_output(N, F, Ho, Wo, x);
  float* op = out.data_ptr<float>();
  const int32_t* ptr = tp.data_ptr<int32_t>();
  const int32_t* ch = tc.data_ptr<int32_t>();
  const int32_t* pos = tq.data_ptr<int32_t>();
  const float* wv = tw.data_ptr<float>();
  const int32_t* ord = fo.data_ptr<int32_t>();
  const int64_t L = fo.numel();
  const Epilogue ep(bias, residual, out, "sparse_conv2d");
  const float* bp = ep.bp;
  const float* rp = ep.rp;
  auto emit = [&](int64_t f, const float* acc) {
    const float bv = bp ? bp[f] : 0.f;
    for (int64_t n = 0; n < N; ++n) {
      float* o = op + (n * F + f) * Ho * Wo;
      const float* a = acc + n * Ho * Wo;
      const float* r = rp ? rp + (n * F + f) * Ho * Wo : nullptr;
      for (int64_t k = 0; k < Ho * Wo; ++k) {
        const float v = a[k] + bv + (r ? r[k] : 0.f);
        o[k] = relu && v < 0.f ? 0.f : v;
      }
    }
  };
  const int64_t work = tw.numel() * Pp;
  // With set_small_rowtaps(True), plan steps (a cache to keep the regrouped taps in) with outputs of one or two
  // vectors run the row-taps form: each thread takes a group of filters and streams the im2col rows once,
  // read-modify-writing a filter's accumulators per tap. Off by default since 2026-12-05: the per-filter gather
  // below (accumulators in registers, 16-bit rows precomputed, 4- / 8-float rows for 2x2 outputs) ran the
  // 512-channel 4x4 / 2x2 layers of pattern-sparse VGG-16 at batch 1 in 80-160 / 95 us against 180 / 260-290 us
  // (plan profile, Zen 4 VM, 2 threads) and the whole model 1.49x faster (one process, alternated). (On a Zen 3
  // the row-taps form had been ~10% faster per layer than the gather with its per-tap chan * KK + pos.)
  if (rowtaps) {
    const int64_t K = C * KK;
    const int64_t ng = work < g_parallel_threshold ? 1 : std::min<int64_t>(F, nck::num_threads());
    std::shared_ptr<const RowTaps> rt;
    {
      std::lock_guard<std::mutex> lock(cache->m);
      if (cache->rows && cache->rows->ngroups == ng) rt = cache->rows;
    }
    if (!rt) {
      rt = build_row_taps(ptr, ch, pos, wv, ord, L, F, K, KK, ng);
      std::lock_guard<std::mutex> lock(cache->m);
      cache->rows = rt;
    }
    nck::parallel_for(0, ng, 1, [&](int64_t gb, int64_t ge) {
      thread_local std::vector<float> accv;
      for (int64_t g = gb; g < ge; ++g) {
        const int64_t f0 = rt->f0[g], nf = rt->f0[g + 1] - f0;
        if (nf == 0) continue;
        if ((int64_t)accv.size() < nf * Pp) accv.resize(nf * Pp);
        float* acc = accv.data();
        std::fill(acc, acc + nf * Pp, 0.f);
        if (nv == 1)
          row_taps_accumulate<1>(xp, Pp, K, rt->ptr[g].data(), rt->fil[g].data(), rt->w[g].data(), acc);
        else
          row_taps_accumulate<2>(xp, Pp, K, rt->ptr[g].data(), rt->fil[g].data(), rt->w[g].data(), acc);
        for (int64_t j = 0; j < nf; ++j) emit(f0 + j, acc + j * Pp);
      }
    });
    return out;
  }
  // Per filter list, its taps gathered from X: the accumulators stay in registers (no store per tap as in the
  // row-taps form). Outputs of at most 4 / 8 positions (2x2 maps at batch 1) take X with rows of 4 / 8 floats and
  // 128- / 256-bit multiply-adds: with 16-float rows 12 of 16 lanes were zeros, X was 4x larger (295 KiB for 512
  // channels, in L2) and building it (a single-threaded fill of mostly zero tails) was 11% of a 512-channel 2x2
  // layer's time. The taps' row offsets are computed once per layer (cache) instead of chan * KK + pos per tap.
  const int64_t E = tw.numel(), K = C * KK;
  std::shared_ptr<const std::vector<uint16_t>> r16;
  std::shared_ptr<const std::vector<int32_t>> r32;
  if (cache) {
    std::lock_guard<std::mutex> lock(cache->m);
    if (cache->xrows16 && (int64_t)cache->xrows16->size() == E) r16 = cache->xrows16;
    if (cache->xrows32 && (int64_t)cache->xrows32->size() == E) r32 = cache->xrows32;
  }
  if (!r16 && !r32) {
    if (K <= 65536) {
      auto o = std::make_shared<std::vector<uint16_t>>(E);
      for (int64_t t = 0; t < E; ++t) (*o)[t] = (uint16_t)(ch[t] * KK + pos[t]);
      r16 = o;
    } else {
      auto o = std::make_shared<std::vector<int32_t>>(E);
      for (int64_t t = 0; t < E; ++t) (*o)[t] = (int32_t)(ch[t] * KK + pos[t]);
      r32 = o;
    }
    if (cache) {
      std::lock_guard<std::mutex> lock(cache->m);
      cache->xrows16 = r16;
      cache->xrows32 = r32;
    }
  }
  const uint16_t* x16 = r16 ? r16->data() : nullptr;
  const int32_t* x32 = r32 ? r32->data() : nullptr;
  auto xrow = [&](int64_t t) -> const float* { return xp + (x16 ? (int64_t)x16[t] : (int64_t)x32[t]) * Pq; };
  std::vector<char> has(F, 0);  // the tap lists' filters; the others get bias (+ residual) only
  for (int64_t i = 0; i < L; ++i) has[ord[i]] = 1;
  const int64_t grain = work < g_parallel_threshold ? L + 1 : std::max<int64_t>(1, L / (8 * nck::num_threads()));
  nck::parallel_for(0, L + 1, grain, [&](int64_t b, int64_t e) {
    alignas(64) float acc[SMALL_MAX_PX];
    for (int64_t i = b; i < e; ++i) {
      if (i == L) {  // filters without taps: bias (+ residual) only
        std::fill(acc, acc + Pq, 0.f);
        for (int64_t f = 0; f < F; ++f)
          if (!has[f]) emit(f, acc);
        continue;
      }
      const int64_t t0 = ptr[i], t1 = ptr[i + 1];
      if (Pq == 4 || Pq == 8 || Pq == VL) {  // one row of 4 / 8 floats or one vector
        if (Pq == 4)
          x16 ? gather_rows<4>(xp, x16, wv, t0, t1, acc) : gather_rows<4>(xp, x32, wv, t0, t1, acc);
        else if (Pq == 8)
          x16 ? gather_rows<8>(xp, x16, wv, t0, t1, acc) : gather_rows<8>(xp, x32, wv, t0, t1, acc);
        else
          x16 ? gather_rows<VL>(xp, x16, wv, t0, t1, acc) : gather_rows<VL>(xp, x32, wv, t0, t1, acc);
      } else if (nv == 2) {  // 4x4 outputs at batch 2: two vectors, two taps at a time (four chains)
        vecf a0 = bcast(0.f), a1 = a0, b0 = a0, b1 = a0;
        int64_t t = t0;
        for (; t + 2 <= t1; t += 2) {
          const float* x0 = xrow(t);
          const float* x1 = xrow(t + 1);
          const vecf w0 = bcast(wv[t]), w1 = bcast(wv[t + 1]);
          a0 += w0 * loadu(x0);
          a1 += w0 * loadu(x0 + VL);
          b0 += w1 * loadu(x1);
          b1 += w1 * loadu(x1 + VL);
        }
        for (; t < t1; ++t) {
          const float* x0 = xrow(t);
          const vecf w0 = bcast(wv[t]);
          a0 += w0 * loadu(x0);
          a1 += w0 * loadu(x0 + VL);
        }
        storeu(acc, a0 + b0);
        storeu(acc + VL, a1 + b1);
      } else {
        for (int64_t v0 = 0; v0 < nv; v0 += 4) {  // four vectors at a time, every tap
          const int64_t m = std::min<int64_t>(4, nv - v0);
          vecf a[4] = {bcast(0.f), bcast(0.f), bcast(0.f), bcast(0.f)};
          for (int64_t t = t0; t < t1; ++t) {
            const vecf w = bcast(wv[t]);
            const float* xr = xrow(t) + v0 * VL;
            for (int64_t k = 0; k < m; ++k) a[k] += w * loadu(xr + k * VL);
          }
          for (int64_t k = 0; k < m; ++k) storeu(acc + (v0 + k) * VL, a[k]);
        }
      }
      emit(ord[i], acc);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------------------
// The batched small-output path: 4x4 / 2x2 maps at large batches. On the wide grid a 4x4 map with padding 1
// computes 36 positions for 16 outputs (2x2: 16 for 4), with unaligned loads: measured 12-25 useful GFLOP/s on
// VGG-16's 512-channel layers at batch 64 against ~80 on its 32x32-8x8 layers (Zen 3, 2 threads). Here the
// N * Ho * Wo output positions are cut into column tiles of BT_COLS (4 or 8 vectors) and the K = C * kh * kw
// im2col rows into tiles of BT_ROWS rows: one tile's block of the im2col matrix (BT_ROWS x BT_COLS, g_batched_block
// bytes) is gathered once and every filter adds its taps in that row range into its accumulators (kept per filter
// for the column tile in L2): one aligned load per multiply-add of a vector, every lane an output.
// Block size: 24 KiB on AVX2 (48 KiB measured level with 24 on a Zen 3, 12 KiB 15-25% slower: the per (filter,
// tile) cost of loading and storing its accumulators); 48 KiB with AVX-512 (VGG-16 at batch 64, 90% unstructured,
// Zen 4 VM, 2 threads: 4-vector tiles of 48 KiB ran the 4x4 / 2x2 layers 10-30% faster than 8-vector tiles of
// 24 KiB, 96 and 192 KiB were 5-10% slower again).

// acc[0 .. NV*VL) += sum over the taps of w[e] * in[off[e] + 0 .. NV*VL) (two accumulator sets taking alternate
// taps, for more independent FMA chains at NV = 4, measured 0-5% slower on a Zen 4 VM: loads bound this loop)
template <int NV>
static inline void accumulate_add(const float* __restrict in, const int32_t* __restrict off, const float* __restrict w,
                                  int64_t ntaps, float* __restrict acc) {
  vecf a[NV];
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) a[i] = loadu(acc + i * VL);
  for (int64_t e = 0; e < ntaps; ++e) {
    const float* s = in + off[e];
    const vecf we = bcast(w[e]);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) a[i] += we * loadu(s + i * VL);
  }
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) storeu(acc + i * VL, a[i]);
}

static std::shared_ptr<const KTiles> build_ktiles(const int32_t* ptr, const int32_t* ch, const int32_t* pos,
                                                  const float* wv, int64_t L, int64_t KK, int64_t K, int64_t R,
                                                  int64_t cols) {
  auto kt = std::make_shared<KTiles>();
  const int64_t nt = (K + R - 1) / R, E = ptr[L];
  kt->rows = R;
  kt->ntiles = nt;
  kt->row_len = cols;
  // tile-major: tile k's taps of every list are consecutive (one forward stream per tile; filter-major, each
  // (list, tile) pair started a new cache line out of L2 / L3 and the taps of a 512-channel layer do not fit L2)
  std::vector<int64_t> count(nt * L + 1, 0);
  for (int64_t i = 0; i < L; ++i)
    for (int32_t t = ptr[i]; t < ptr[i + 1]; ++t) ++count[((ch[t] * KK + pos[t]) / R) * L + i + 1];
  for (int64_t j = 0; j < nt * L; ++j) count[j + 1] += count[j];
  kt->ptr.assign(count.begin(), count.end());
  kt->off.resize(E);
  kt->w.resize(E);
  std::vector<std::pair<int32_t, float>> taps;
  for (int64_t i = 0; i < L; ++i) {
    taps.clear();
    for (int32_t t = ptr[i]; t < ptr[i + 1]; ++t) taps.emplace_back(ch[t] * (int32_t)KK + pos[t], wv[t]);
    std::stable_sort(taps.begin(), taps.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    for (const auto& tw : taps) {
      const int64_t k = tw.first / R, e = count[k * L + i]++;
      kt->off[e] = (int32_t)((tw.first - k * R) * cols);
      kt->w[e] = tw.second;
    }
  }
  return kt;
}

// row[j] = m[j] ? sc[t[j]] : 0 for the BT_COLS columns of a tile (m: -1 / 0). Masked hardware gathers (lanes in the
// padding are not loaded, so an inf / NaN elsewhere cannot leak into them). The gather was a quarter of the
// 512-channel 4x4 layer's time at batch 64 with a scalar select (Zen 3, measured with the taps skipped); the masked
// gathers made the layer 5-12% faster (interleaved A/B, 1 and 2 threads).
template <int64_t COLS>
static inline void gather_row(const float* __restrict sc, const int32_t* __restrict t, const int32_t* __restrict m,
                              float* __restrict row) {
#if defined(__AVX512F__)
  for (int64_t j = 0; j < COLS; j += 16) {
    const __m512i idx = _mm512_loadu_si512(t + j);
    const __mmask16 k = _mm512_cmpneq_epi32_mask(_mm512_loadu_si512(m + j), _mm512_setzero_si512());
    _mm512_storeu_ps(row + j, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, idx, sc, 4));
  }
#elif defined(__AVX2__)
  for (int64_t j = 0; j < COLS; j += 8) {
    const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + j));
    const __m256 k = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + j)));
    _mm256_storeu_ps(row + j, _mm256_mask_i32gather_ps(_mm256_setzero_ps(), sc, idx, k, 4));
  }
#else
  for (int64_t j = 0; j < COLS; ++j) {
    const float v = sc[t[j]];
    row[j] = m[j] ? v : 0.f;
  }
#endif
}

template <int NV>
static torch::Tensor sparse_conv2d_batched(const torch::Tensor& x, const torch::Tensor& tp, const torch::Tensor& tc,
                                           const torch::Tensor& tq, const torch::Tensor& tw, const torch::Tensor& fo,
                                           const c10::optional<torch::Tensor>& bias,
                                           const c10::optional<torch::Tensor>& residual, int64_t F, int64_t kh,
                                           int64_t kw, int64_t S, int64_t pad, bool relu, int64_t Ho, int64_t Wo,
                                           TapOffCache* cache) {
  constexpr int64_t BT_COLS = NV * VL;  // this instance's tile: NV accumulator vectors wide, g_batched_block bytes
  const int64_t BT_ROWS = std::max<int64_t>(16, g_batched_block / (BT_COLS * 4));
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), KK = kh * kw, K = C * KK;
  const int64_t HoWo = Ho * Wo, P = N * HoWo, nct = (P + BT_COLS - 1) / BT_COLS, Pt = nct * BT_COLS;
  const int32_t* ptr = tp.data_ptr<int32_t>();
  const int32_t* ord = fo.data_ptr<int32_t>();
  const int64_t L = fo.numel();
  std::shared_ptr<const KTiles> kt;
  if (cache) {
    std::lock_guard<std::mutex> lock(cache->m);
    if (cache->ktiles && cache->ktiles->row_len == BT_COLS && cache->ktiles->rows == BT_ROWS) kt = cache->ktiles;
  }
  if (!kt) {
    kt = build_ktiles(ptr, tc.data_ptr<int32_t>(), tq.data_ptr<int32_t>(), tw.data_ptr<float>(), L, KK, K, BT_ROWS,
                      BT_COLS);
    if (cache) {
      std::lock_guard<std::mutex> lock(cache->m);
      cache->ktiles = kt;
    }
  }
  const int64_t ntiles = kt->ntiles;
  // per kernel position and column q = n * HoWo + r: the input offset that column reads (channel 0) and mask -1, or
  // offset 0 and mask 0 in the padding and past the last column (gather_row loads the masked-in lanes only; a
  // branch per element mispredicted at every ring position)
  std::vector<int32_t> tab, valid;  // (the dispatcher keeps N * C * H * W below 2^31)
  std::vector<int64_t> vout;
  column_tables(N, C, H, W, kh, kw, S, pad, Ho, Wo, Pt, F, tab, valid, vout);
  auto out = conv_output(N, F, Ho, Wo, x);
  const Epilogue ep(bias, residual, out, "sparse_conv2d");
  const float* bp = ep.bp;
  const float* rp = ep.rp;
  float* op = out.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const std::vector<int64_t> empty = empty_filters(ord, L, F);
  const int64_t nthreads = std::max<int64_t>(1, nck::num_threads());
  // jobs: column tiles x filter groups (groups only where there are fewer tiles than 2 per thread; each group
  // gathers its own blocks)
  const int64_t ng = nct >= 2 * nthreads ? 1 : std::min<int64_t>(std::max<int64_t>(L, 1), (2 * nthreads + nct - 1) / nct);
  const int64_t work = tw.numel() * Pt;
  const int32_t* kptr = kt->ptr.data();
  const int32_t* koff = kt->off.data();
  const float* kw_ = kt->w.data();
  nck::parallel_for(0, nct * ng, work < g_parallel_threshold ? nct * ng : 1, [&](int64_t b, int64_t e) {
    thread_local std::vector<float> blkv, accv;
    const int64_t nlist_max = (L + ng - 1) / ng;
    if ((int64_t)blkv.size() < BT_ROWS * BT_COLS + 16) blkv.resize(BT_ROWS * BT_COLS + 16);
    if ((int64_t)accv.size() < nlist_max * BT_COLS + 16) accv.resize(nlist_max * BT_COLS + 16);
    float* blk = blkv.data() + ((64 - (reinterpret_cast<uintptr_t>(blkv.data()) & 63)) & 63) / 4;
    float* acc = accv.data() + ((64 - (reinterpret_cast<uintptr_t>(accv.data()) & 63)) & 63) / 4;
    for (int64_t job = b; job < e; ++job) {
      const int64_t ct = job / ng, g = job % ng, q0 = ct * BT_COLS, qn = std::min<int64_t>(BT_COLS, P - q0);
      const int64_t nl = g < L ? (L - g + ng - 1) / ng : 0;
      std::fill(acc, acc + nl * BT_COLS, 0.f);
      for (int64_t k = 0; k < ntiles && nl > 0; ++k) {
        const int64_t r0 = k * BT_ROWS, r1 = std::min<int64_t>(K, r0 + BT_ROWS);
        for (int64_t r = r0; r < r1; ++r) {  // gather the block
          const int32_t* __restrict t = tab.data() + (r % KK) * Pt + q0;
          const int32_t* __restrict m = valid.data() + (r % KK) * Pt + q0;
          const float* __restrict sc = xp + (r / KK) * H * W;
          float* __restrict row = blk + (r - r0) * BT_COLS;
          gather_row<BT_COLS>(sc, t, m, row);
        }
        for (int64_t i = g, li = 0; i < L; i += ng, ++li) {
          const int32_t t0 = kptr[k * L + i], t1 = kptr[k * L + i + 1];
          if (t0 < t1) accumulate_add<NV>(blk, koff + t0, kw_ + t0, t1 - t0, acc + li * BT_COLS);
        }
      }
      auto emit = [&](int64_t f, const float* a) {
        const float bv = bp ? bp[f] : 0.f;
        const int64_t* vo = vout.data() + q0;
        for (int64_t j = 0; j < qn; ++j) {
          const int64_t o = vo[j] + f * HoWo;
          const float v = a[j] + bv + (rp ? rp[o] : 0.f);
          op[o] = relu && v < 0.f ? 0.f : v;
        }
      };
      for (int64_t i = g, li = 0; i < L; i += ng, ++li) emit(ord[i], acc + li * BT_COLS);
      if (g == 0 && !empty.empty()) {
        std::fill(acc, acc + BT_COLS, 0.f);
        for (int64_t f : empty) emit(f, acc);
      }
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------------------
// Generated per-layer code (see GenConv in kernels.h). Per job, T column tiles of 16 output positions; per K chunk,
// each tile's chunk of im2col rows (kc x 16 floats, 24 KiB at kc = 384: stays in L1 while every filter block's
// function for that chunk runs on it) is gathered, then for each tile every block's generated function adds its
// taps: each row is loaded once for all of the block's filters that use it, the 16 accumulators stay in registers,
// the weights are constants in the code. A chunk's code (all blocks) is reused by the job's T tiles while it is in
// L2. Measured against the tap kernel (benchmarks/codegen_layers.py, VGG-16 layers, 2 threads): 1.28-1.40x on
// 256 / 512-channel 8x8 and 4x4 layers at batch 64, slower on 64-channel layers and 512-channel ones at batch 1.
std::shared_ptr<const GenConv> load_gen_conv(const std::string& path) {
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(h != nullptr, "cannot load the generated conv ", path, ": ", dlerror());
  auto g = std::make_shared<GenConv>();
  g->lib = std::shared_ptr<void>(h, [](void* p) { dlclose(p); });
  g->path = path;
  using TableFn = const void* (*)(int64_t*);
  auto table = reinterpret_cast<TableFn>(dlsym(h, "netcarve_gen_conv"));
  TORCH_CHECK(table != nullptr, path, " is not a netcarve generated conv (no netcarve_gen_conv symbol)");
  int64_t meta[8] = {0};
  const void* fns = table(meta);
  TORCH_CHECK(meta[0] == 1, path, ": generated conv format ", meta[0], ", this runtime reads format 1");
  g->F = meta[1];
  g->K = meta[2];
  g->nblocks = meta[3];
  g->nkc = meta[4];
  g->kc = meta[5];
  TORCH_CHECK(fns != nullptr && g->F > 0 && g->K > 0 && g->kc > 0 && g->nblocks == (g->F + 15) / 16 &&
                  g->nkc == (g->K + g->kc - 1) / g->kc,
              path, ": inconsistent generated conv table (F ", g->F, ", K ", g->K, ", blocks ", g->nblocks,
              ", chunks ", g->nkc, " of ", g->kc, ")");
  g->fns = reinterpret_cast<const GenConvFn*>(fns);
  return g;
}

torch::Tensor gen_conv2d(torch::Tensor x, const GenConv& g, c10::optional<torch::Tensor> bias,
                         c10::optional<torch::Tensor> residual, int64_t kh, int64_t kw, int64_t S, int64_t pad,
                         bool relu) {
  constexpr int64_t GC = 16;  // columns per tile (the generated code's vector)
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat, "generated conv: the input must be float32 NCHW");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), KK = kh * kw, K = C * KK, F = g.F;
  TORCH_CHECK(K == g.K, "generated conv ", g.path, ": made for ", g.K, " im2col rows, the input gives ", C,
              " channels x ", kh, "x", kw, " = ", K);
  TORCH_CHECK(S >= 1 && pad >= 0 && H + 2 * pad >= kh && W + 2 * pad >= kw, "generated conv: bad geometry");
  TORCH_CHECK(N * C * H * W < ((int64_t)1 << 31), "generated conv: input too large for 32-bit offsets");
  const int64_t Ho = (H + 2 * pad - kh) / S + 1, Wo = (W + 2 * pad - kw) / S + 1, HoWo = Ho * Wo, P = N * HoWo;
  const int64_t nct = (P + GC - 1) / GC, Pt = nct * GC, KC = g.kc, NKC = g.nkc, NB = g.nblocks;
  std::vector<int32_t> tab, valid;
  std::vector<int64_t> vout;
  column_tables(N, C, H, W, kh, kw, S, pad, Ho, Wo, Pt, F, tab, valid, vout);
  // Per kernel position and tile: where the tile's 16 windows are consecutive in the input (stride 1, the 16 output
  // positions in one output row, padding lanes masked out), one masked load replaces the hardware gather (a 64-
  // channel 32x32 layer spent more time gathering than multiplying: K = 576 gathers per tile for 4.5k FMAs).
  // Where they are two runs of 8 (8x8 maps: two output rows per tile), two masked 8-float loads do it (mode 2); four
  // runs of 4 (4x4 maps), four masked 4-float loads (mode 3).
  std::vector<int32_t> cbase(4 * KK * nct, 0);
  std::vector<uint16_t> cmask(KK * nct, 0);
  std::vector<uint8_t> cont(KK * nct, 0);
  auto run_base = [](const int32_t* tb, const int32_t* vb, int64_t n, int64_t& base) {  // consecutive valid lanes?
    int64_t j0 = 0;
    while (j0 < n && !vb[j0]) ++j0;
    base = j0 < n ? (int64_t)tb[j0] - j0 : 0;
    for (int64_t j = j0; j < n; ++j)
      if (vb[j] && tb[j] != base + j) return false;
    return base >= 0;
  };
  for (int64_t k = 0; k < KK; ++k)
    for (int64_t t = 0; t < nct; ++t) {
      const int32_t* tb = tab.data() + k * Pt + t * GC;
      const int32_t* vb = valid.data() + k * Pt + t * GC;
      uint32_t m = 0;
      for (int64_t j = 0; j < GC; ++j) m |= vb[j] ? 1u << j : 0u;
      const int64_t i = k * nct + t;
      for (int mode = 1; mode <= 3 && !cont[i]; ++mode) {  // runs of 16 / 8 / 4 lanes
        const int64_t len = GC >> (mode - 1);
        int64_t b[4] = {0, 0, 0, 0};
        bool ok = true;
        for (int64_t j = 0; j * len < GC && ok; ++j) ok = run_base(tb + j * len, vb + j * len, len, b[j]);
        if (!ok) continue;
        cont[i] = (uint8_t)mode;
        for (int j = 0; j < 4; ++j) cbase[4 * i + j] = (int32_t)b[j];
      }
      cmask[i] = (uint16_t)m;
    }
  // Outputs: where a tile's 16 positions are consecutive in one image (HoWo a multiple of 16), each filter's row
  // is stored as one vector (bias, residual and ReLU on the vector).
  const bool vec_out = HoWo % GC == 0;
  auto out = conv_output(N, F, Ho, Wo, x);
  const Epilogue ep(bias, residual, out, "generated conv");
  TORCH_CHECK(!ep.bp || ep.bias_c.numel() == F, "generated conv: bias has ", ep.bias_c.numel(), " entries for ", F,
              " filters");
  const float* bp = ep.bp;
  const float* rp = ep.rp;
  float* op = out.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int64_t nthreads = std::max<int64_t>(1, nck::num_threads());
  // tiles per job: as many as fit (a chunk's code is fetched once per job: more tiles, less code traffic; 16 tiles'
  // chunks and accumulators of a 512-filter layer are ~0.9 MiB, this Zen 4's L2), but a job for every thread.
  // Measured (VGG-16 layers at batch 64, 2 threads, pattern + connectivity): 16 tiles ran 256 x 8x8 / 512 x 4x4
  // 1.39x / 1.27x faster than the tap kernel, 8 tiles 1.32x / 1.02-1.19x, 2 tiles 1.14x / 0.71x.
  const int64_t T = g_gen_tiles > 0 ? g_gen_tiles : std::max<int64_t>(1, std::min<int64_t>(16, nct / nthreads));
  const int64_t njobs = (nct + T - 1) / T;
  const int64_t work = F * K * Pt / 8;  // (~12% dense layers: the threshold's multiply-adds)
  const GenConvFn* fns = g.fns;
  nck::parallel_for(0, njobs, work < g_parallel_threshold ? njobs : 1, [&](int64_t b, int64_t e) {
    thread_local std::vector<float> blkv, accv;
    if ((int64_t)blkv.size() < T * KC * GC + 16) blkv.resize(T * KC * GC + 16);
    if ((int64_t)accv.size() < T * NB * 256 + 16) accv.resize(T * NB * 256 + 16);
    float* blk = blkv.data() + ((64 - (reinterpret_cast<uintptr_t>(blkv.data()) & 63)) & 63) / 4;
    float* acc = accv.data() + ((64 - (reinterpret_cast<uintptr_t>(accv.data()) & 63)) & 63) / 4;
    for (int64_t job = b; job < e; ++job) {
      const int64_t t0 = job * T, nt = std::min<int64_t>(nct, t0 + T) - t0;
      std::fill(acc, acc + nt * NB * 256, 0.f);
      for (int64_t kc = 0; kc < NKC; ++kc) {
        const int64_t r0 = kc * KC, r1 = std::min<int64_t>(K, r0 + KC);
        for (int64_t t = 0; t < nt; ++t) {
          const int64_t q0 = (t0 + t) * GC;
          float* xb = blk + t * KC * GC;
          for (int64_t r = r0; r < r1; ++r) {
            const float* sc = xp + (r / KK) * H * W;
            const int64_t ci = (r % KK) * nct + t0 + t;
#if defined(__AVX512F__)
            const int32_t* cb = cbase.data() + 4 * ci;
            if (cont[ci] == 1) {
              _mm512_store_ps(xb + (r - r0) * GC, _mm512_maskz_loadu_ps(cmask[ci], sc + cb[0]));
              continue;
            }
            if (cont[ci] == 2) {
              const __m256 lo = _mm256_maskz_loadu_ps((__mmask8)(cmask[ci] & 0xff), sc + cb[0]);
              const __m256 hi = _mm256_maskz_loadu_ps((__mmask8)(cmask[ci] >> 8), sc + cb[1]);
              _mm512_store_ps(xb + (r - r0) * GC, _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1));
              continue;
            }
            if (cont[ci] == 3) {
              const uint32_t m = cmask[ci];
              __m512 v = _mm512_castps128_ps512(_mm_maskz_loadu_ps((__mmask8)(m & 0xf), sc + cb[0]));
              v = _mm512_insertf32x4(v, _mm_maskz_loadu_ps((__mmask8)((m >> 4) & 0xf), sc + cb[1]), 1);
              v = _mm512_insertf32x4(v, _mm_maskz_loadu_ps((__mmask8)((m >> 8) & 0xf), sc + cb[2]), 2);
              v = _mm512_insertf32x4(v, _mm_maskz_loadu_ps((__mmask8)((m >> 12) & 0xf), sc + cb[3]), 3);
              _mm512_store_ps(xb + (r - r0) * GC, v);
              continue;
            }
#endif
            gather_row<GC>(sc, tab.data() + (r % KK) * Pt + q0, valid.data() + (r % KK) * Pt + q0, xb + (r - r0) * GC);
          }
        }
        if (g_gen_block_outer) {  // each function runs on the job's tiles back to back (its code stays in L1i)
          for (int64_t bl = 0; bl < NB; ++bl)
            for (int64_t t = 0; t < nt; ++t) fns[bl * NKC + kc](blk + t * KC * GC, acc + t * NB * 256 + bl * 256);
        } else {  // each tile's chunk stays in L1 while every block's function runs on it
          for (int64_t t = 0; t < nt; ++t) {
            const float* xb = blk + t * KC * GC;
            float* at = acc + t * NB * 256;
            for (int64_t bl = 0; bl < NB; ++bl) fns[bl * NKC + kc](xb, at + bl * 256);
          }
        }
      }
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t q0 = (t0 + t) * GC, qn = std::min<int64_t>(GC, P - q0);
        const int64_t* vo = vout.data() + q0;
        const float* at = acc + t * NB * 256;
#if defined(__AVX512F__)
        if (vec_out) {  // (qn = 16: P is a multiple of HoWo)
          const vecf zero = bcast(0.f);
          for (int64_t f = 0; f < F; ++f) {
            const int64_t o = vo[0] + f * HoWo;
            vecf v = loadu(at + f * GC) + bcast(bp ? bp[f] : 0.f);
            if (rp) v += loadu(rp + o);
            if (relu) v = (vecf)_mm512_max_ps((__m512)zero, (__m512)v);  // (NaN stays NaN, as torch.relu)
            storeu(op + o, v);
          }
          continue;
        }
#endif
        for (int64_t f = 0; f < F; ++f) {
          const float bv = bp ? bp[f] : 0.f;
          const float* a = at + f * GC;
          for (int64_t j = 0; j < qn; ++j) {
            const int64_t o = vo[j] + f * HoWo;
            const float v = a[j] + bv + (rp ? rp[o] : 0.f);
            op[o] = relu && v < 0.f ? 0.f : v;
          }
        }
      }
    }
  });
  return out;
}

// The row-vector blocks of the row layout and of sparse_conv2d_multirow: vector v reads from planes + vin[v] (+ a
// tap's offset) and stores to out + vout[v] (+ a filter's f * HoWo); jobs are chunks of chunkv vectors x ng filter
// groups (list i in group i % ng; list index L stands for the filters without taps), blocks of up to 8 vectors.
static void run_row_blocks(const float* pl, const int64_t* offs, const int32_t* ptr, const float* wv, const int32_t* ord,
                           const std::vector<int64_t>& empty, int64_t L, const std::vector<int64_t>& vin,
                           const std::vector<int64_t>& vout, int64_t nvec, int64_t chunkv, int64_t ng, float* op,
                           const float* rp, const float* bp, bool relu, int64_t HoWo, int64_t work) {
  const int64_t lists = L + (empty.empty() ? 0 : 1);
  const int64_t nch = (nvec + chunkv - 1) / chunkv;
  nck::parallel_for(0, nch * ng, work < g_parallel_threshold ? nch * ng : 1, [&](int64_t b, int64_t e) {
    alignas(64) float acc[BLOCK];
    for (int64_t job = b; job < e; ++job) {
      const int64_t g = job % ng, v_beg = (job / ng) * chunkv, v_end = std::min<int64_t>(nvec, v_beg + chunkv);
      for (int64_t v0 = v_beg; v0 < v_end; v0 += 8) {
        const int64_t nv = std::min<int64_t>(8, v_end - v0);
        const int64_t* voff = vin.data() + v0;
        const int64_t* ooff = vout.data() + v0;
        for (int64_t i = g; i < lists; i += ng) {
          if (i < L && g_fused_store && nv >= 2) {  // one filter: accumulate and store from the registers
            const int64_t t0 = ptr[i], nt = ptr[i + 1] - t0, f = ord[i];
            accumulate_part_store(pl, voff, offs + t0, wv + t0, nt, nv, op + f * HoWo, rp ? rp + f * HoWo : nullptr,
                                  ooff, bp ? bp[f] : 0.f, relu);
            continue;
          }
          if (i < L) {
            const int64_t t0 = ptr[i], nt = ptr[i + 1] - t0;
            accumulate_part(pl, voff, offs + t0, wv + t0, nt, nv, acc);
          } else {
            std::fill(acc, acc + nv * VL, 0.f);
          }
          const int64_t nf = i < L ? 1 : (int64_t)empty.size();
          for (int64_t j = 0; j < nf; ++j) {
            const int64_t f = i < L ? ord[i] : empty[j];
            store_vecs(op + f * HoWo, rp ? rp + f * HoWo : nullptr, ooff, acc, nv, bp ? bp[f] : 0.f, relu);
          }
        }
      }
    }
  });
}

// the lanes of `bits` of the vector at p, zeros elsewhere; lanes outside `bits` are never read (masked loads do not
// fault), so p may point before the array or run past its end there
static inline vecf load_mask(const float* p, uint32_t bits) {
#if defined(__AVX512F__)
  return (vecf)_mm512_maskz_loadu_ps((__mmask16)bits, p);
#elif defined(__AVX2__)
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), bit), bit);
  return (vecf)_mm256_maskload_ps(p, m);
#else
  alignas(64) float t[VL] = {};
  for (int64_t l = 0; l < VL; ++l)
    if (bits >> l & 1) t[l] = p[l];
  return loadu(t);
#endif
}

// ------------------------------------------------------------------------------------------------------------
// Outputs narrower than a vector (8x8 maps with AVX-512, 4x4 / 2x2 with either ISA), stride 1: one vector holds
// R = VL / Wo whole output rows. The padded input is stored once per kernel column kx, shifted by kx and cut to
// the output width (planes[c][kx][n][yy][x] = padded x[n][c][yy][x + kx], yy < Hp, x < Wo), so every tap
// (c, ky, kx) of a vector of rows y .. y + R - 1 reads one contiguous window planes[c][kx][n][y + ky][0 .. VL):
// no lane computes padding (the wide grid computes 100 positions for an 8x8 map's 64) and the register blocks,
// tap offsets and epilogue of the row layout apply unchanged. The price: kw copies of the input. Measured on a
// Zen 4 VM (AVX-512, 2 threads): see docs/runtime.md.
static torch::Tensor sparse_conv2d_multirow(const torch::Tensor& x, const torch::Tensor& tp, const torch::Tensor& tc,
                                            const torch::Tensor& tq, const torch::Tensor& tw, const torch::Tensor& fo,
                                            const c10::optional<torch::Tensor>& bias,
                                            const c10::optional<torch::Tensor>& residual, int64_t F, int64_t kh,
                                            int64_t kw, int64_t pad, bool relu, int64_t Ho, int64_t Wo,
                                            TapOffCache* cache) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Hp = H + 2 * pad;
  const int64_t R = VL / Wo, pimg = Hp * Wo, kxs = N * pimg, cs = kw * kxs, HoWo = Ho * Wo;
  const int64_t L = fo.numel(), E = tw.numel();
  auto planes = torch::empty({C * cs + VL}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = planes.data_ptr<float>();
  std::fill(dst + C * cs, dst + C * cs + VL, 0.f);
  // 'same' convs whose rows divide the vector (8x8 / 4x4 / 2x2 with pad (kw - 1) / 2): a shifted plane's rows
  // [pad, pad + H) are the input channel read flat, shifted by kx - pad, with the lanes whose column falls in the
  // padding masked to zero (one fixed mask per kx). With the row loop below (kept for other shapes) ResNet-56's 8x8
  // layers at batch 64 ran 0.97-1.46x the wide grid's time, with these loads 0.77-0.87x (Zen 4 VM)
  const bool flat = Wo == W && VL % W == 0;
  std::vector<uint32_t> colmasks(kw, 0);  // lanes whose column kx - pad + (l % W) lies inside the row
  for (int64_t kx = 0; flat && kx < kw; ++kx)
    for (int64_t l = 0; l < VL; ++l)
      if (l % W + kx - pad >= 0 && l % W + kx - pad < W) colmasks[kx] |= (uint32_t)1 << l;
  nck::parallel_for(0, C * N, N * C * H * W < ((int64_t)1 << 16) ? C * N : 1, [&](int64_t b, int64_t e) {
    for (int64_t cn = b; cn < e; ++cn) {
      const int64_t c = cn / N, n = cn % N;
      const float* s = src + (n * C + c) * H * W;
      if (flat) {
        for (int64_t kx = 0; kx < kw; ++kx) {
          float* d = dst + c * cs + kx * kxs + n * pimg;
          const int64_t sh = kx - pad, HW = H * W;
          const uint32_t colmask = colmasks[kx];
          std::fill(d, d + pad * Wo, 0.f);
          std::fill(d + pad * Wo + HW, d + pimg, 0.f);
          float* di = d + pad * Wo;
          for (int64_t j = 0; j < HW; j += VL) {
            const uint32_t m = HW - j >= VL ? colmask : colmask & (((uint32_t)1 << (HW - j)) - 1);
            const vecf v = load_mask(s + j + sh, m);
            if (HW - j >= VL) {
              storeu(di + j, v);
            } else {
              alignas(64) float t[VL];
              storeu(t, v);
              std::copy(t, t + (HW - j), di + j);
            }
          }
        }
        continue;
      }
      for (int64_t kx = 0; kx < kw; ++kx) {
        float* d = dst + c * cs + kx * kxs + n * pimg;
        for (int64_t yy = 0; yy < Hp; ++yy, d += Wo) {
          const int64_t iy = yy - pad;
          if (iy < 0 || iy >= H) {
            std::fill(d, d + Wo, 0.f);
            continue;
          }
          // columns [lo, hi) come from the row, shifted by kx - pad; the rest are padding
          const float* sr = s + iy * W + kx - pad;
          const int64_t lo = std::max<int64_t>(0, pad - kx), hi = std::min<int64_t>(Wo, W + pad - kx);
          for (int64_t xo = 0; xo < lo; ++xo) d[xo] = 0.f;
          for (int64_t xo = lo; xo < hi; ++xo) d[xo] = sr[xo];
          for (int64_t xo = std::max(lo, hi); xo < Wo; ++xo) d[xo] = 0.f;
        }
      }
    }
  });
  std::vector<int64_t> tapoff(kh * kw);
  for (int64_t ky = 0; ky < kh; ++ky)
    for (int64_t kx = 0; kx < kw; ++kx) tapoff[ky * kw + kx] = kx * kxs + ky * Wo;
  const Taps taps{tc.data_ptr<int32_t>(), tq.data_ptr<int32_t>(), tw.data_ptr<float>(), tapoff.data(), cs};
  // (a negative plane key: these offsets differ from the phase planes' of the same sizes)
  const auto offs_p = tap_offsets(taps, E, -kxs, Wo, 1, cache);
  const int64_t* offs = offs_p->data();
  // vector v = (n, y0 = R * j): planes offset n * pimg + y0 * Wo, output offset n * F * HoWo + y0 * Wo (R rows of
  // Wo outputs are contiguous); padded with the last vector to a multiple of 8
  const int64_t vpi = Ho / R, nvec = N * vpi, padded = (nvec + 7) / 8 * 8;
  std::vector<int64_t> vin(padded), vout(padded);
  for (int64_t v = 0; v < padded; ++v) {
    const int64_t u = std::min(v, nvec - 1), n = u / vpi, y0 = (u % vpi) * R;
    vin[v] = n * pimg + y0 * Wo;
    vout[v] = n * F * HoWo + y0 * Wo;
  }
  auto out = conv_output(N, F, Ho, Wo, x);
  const Epilogue ep(bias, residual, out, "sparse_conv2d");
  const float* bp = ep.bp;
  const float* rp = ep.rp;
  float* op = out.data_ptr<float>();
  const float* pl = planes.data_ptr<float>();
  const int32_t* ptr = tp.data_ptr<int32_t>();
  const float* wv = tw.data_ptr<float>();
  const int32_t* ord = fo.data_ptr<int32_t>();
  const std::vector<int64_t> empty = empty_filters(ord, L, F);
  const int64_t lists = L + (empty.empty() ? 0 : 1);
  const int64_t nthreads = std::max<int64_t>(1, nck::num_threads());
  // chunks of vectors whose windows (about VL x kw floats per vector and channel) fit in half of L2
  const int64_t chunkv = std::max<int64_t>(8, (131072 / std::max<int64_t>(1, VL * C * kw)) / 8 * 8);
  const int64_t nch = (nvec + chunkv - 1) / chunkv;
  const int64_t ng = std::min<int64_t>(lists, std::max<int64_t>(1, (4 * nthreads + nch - 1) / nch));
  run_row_blocks(pl, offs, ptr, wv, ord, empty, L, vin, vout, nvec, chunkv, ng, op, rp, bp, relu, HoWo, E * nvec * VL);
  return out;
}

// staged kx-split calls (kx_stage_calls: tests; defined for every ISA, the kx-split kernels are AVX-512 only)
std::atomic<int64_t> g_kx_calls{0};

#if defined(__AVX512F__)
// ------------------------------------------------------------------------------------------------------------
// The kx-split path (3x3, stride 1, padding 1, output rows a whole number of vectors): no padded copy of the
// input and no unaligned loads. out[y][x] = sum over kx of P_kx[y][x + kx - 1], where P_kx[y][x] = sum over the
// taps (c, ky, kx) of w * in[c][y + ky - 1][x]: each tap of one kx is a multiply-add of whole, aligned input row
// vectors (the vertical offset ky is a whole row), and the horizontal offset is applied once per kx and block to the
// sums in registers (valignd with the neighbouring vector of the row, zeros at the row's ends). Rows outside the image
// (ky = 0 on the first row, ky = 2 on the last) are skipped, never read: the taps of a filter are grouped by
// (kx, ky). The banded row layout it replaces copies every input row into a zero-padded band (17% of sparse
// ResNet-56's plan at batch 1) and reads it with loads that straddle cache lines for two kernel columns of three
// (1.9x the cost of an aligned load per multiply-add in a loop over L1-resident rows, Emerald Rapids VM).

// A layer's taps regrouped into 9 segments per filter list, one per kernel position in the order `order` gives
// (order[s]: the position of segment s): list i's segment s is taps [seg[i * 9 + s], seg[i * 9 + s + 1]), whose
// off[t] = offset(chan, ky, kx) and weights w[t] (ascending channels). The kx-split path groups by (kx, ky) with
// row offsets; the tiny-map path by position with 16-bit channel ids (6 bytes streamed per tap with the weight, not
// 8: those layers' weights stream from L3 at batch 1). Built once per plan step (TapOffCache), keyed by H x W.
template <typename T>
struct SegTaps {
  int64_t H = -1, W = -1;
  std::vector<int32_t> seg;
  std::vector<T> off;
  std::vector<float> w;
};

template <typename T, class Offset>
static std::shared_ptr<const SegTaps<T>> build_seg_taps(const int32_t* ptr, const int32_t* ch, const int32_t* pos,
                                                        const float* wv, int64_t L, int64_t H, int64_t W,
                                                        const int (&order)[9], Offset&& offset) {
  auto k = std::make_shared<SegTaps<T>>();
  k->H = H;
  k->W = W;
  const int64_t E = ptr[L];
  k->seg.resize(L * 9 + 1);
  k->off.reserve(E);
  k->w.reserve(E);
  for (int64_t i = 0; i < L; ++i)
    for (int64_t s = 0; s < 9; ++s) {
      k->seg[i * 9 + s] = (int32_t)k->off.size();
      for (int64_t t = ptr[i]; t < ptr[i + 1]; ++t)
        if (pos[t] == order[s]) {
          k->off.push_back((T)offset(ch[t], pos[t] / 3, pos[t] % 3));
          k->w.push_back(wv[t]);
        }
    }
  k->seg[L * 9] = (int32_t)k->off.size();
  return k;
}

// The value in a plan step's cache slot if `fits` accepts it, else build()'s, stored there (no cache: built per call)
template <class T, class Fits, class Build>
static std::shared_ptr<const T> cached(TapOffCache* cache, std::shared_ptr<const T> TapOffCache::*slot, Fits&& fits,
                                       Build&& build) {
  if (cache) {
    std::lock_guard<std::mutex> lock(cache->m);
    if (cache->*slot && fits(*(cache->*slot))) return cache->*slot;
  }
  std::shared_ptr<const T> v = build();
  if (cache) {
    std::lock_guard<std::mutex> lock(cache->m);
    cache->*slot = v;
  }
  return v;
}

// The kx-split path's vectors: VW = 16 (zmm) or 8 (ymm, rows of 8 floats: 8x8 maps) with the lane shifts across
// two neighbouring vectors of a row (valignd)
template <int VW>
struct KxVec;
template <>
struct KxVec<16> {
  typedef vecf v;
  // {prev[15], a[0 .. 14]} and {a[1 .. 15], next[0]}
  static v from_left(v a, v prev) {
    return (v)_mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512((__m512)a), _mm512_castps_si512((__m512)prev), 15));
  }
  static v from_right(v a, v next) {
    return (v)_mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512((__m512)next), _mm512_castps_si512((__m512)a), 1));
  }
  static v max0(v a) { return (v)_mm512_max_ps((__m512)a, _mm512_setzero_ps()); }
};
template <>
struct KxVec<8> {
  typedef vec8f v;
  static v from_left(v a, v prev) {
    return (v)_mm256_castsi256_ps(_mm256_alignr_epi32(_mm256_castps_si256((__m256)a), _mm256_castps_si256((__m256)prev), 7));
  }
  static v from_right(v a, v next) {
    return (v)_mm256_castsi256_ps(_mm256_alignr_epi32(_mm256_castps_si256((__m256)next), _mm256_castps_si256((__m256)a), 1));
  }
  static v max0(v a) { return (v)_mm256_max_ps((__m256)a, _mm256_setzero_ps()); }
};

// p[LO .. HI) += w[t] * src[i][off[t] ..] for the taps [t0, t1)
template <int VW, int NV, int LO, int HI>
static inline __attribute__((always_inline)) void kx_taps(const float* const (&src)[NV],
                                                          const int32_t* __restrict off, const float* __restrict w,
                                                          int64_t t0, int64_t t1, typename VecN<VW>::v (&p)[NV]) {
  using V = VecN<VW>;
  if (LO >= HI) return;
  for (int64_t t = t0; t < t1; ++t) {
    const typename V::v we = V::bc(w[t]);
    const int64_t o = off[t];
#pragma GCC unroll 8
    for (int i = LO; i < HI; ++i) p[i] += we * V::ld(src[i] + o);
  }
}

// One filter (list i) over a block of NV vectors (rows of WV vectors of VW floats: output rows from `row0`, read
// from xin, the input's row `row0` or its staged copy, rows W floats apart), stored with bias (+ residual) and ReLU.
template <int VW, int NV, int WV>
static inline void kx_block(const float* __restrict xin, int64_t row0, int64_t W, bool top, bool bot,
                            const int32_t* __restrict sg, const int32_t* __restrict off, const float* __restrict w,
                            float* __restrict op, const float* __restrict rp, float bias, bool relu) {
  using V = VecN<VW>;
  using K = KxVec<VW>;
  typedef typename V::v vt;
  const float* src[NV];
  for (int v = 0; v < NV; ++v) src[v] = xin + (v / WV) * W + (v % WV) * VW;
  vt out[NV];
  for (int v = 0; v < NV; ++v) out[v] = V::bc(bias);
  const vt z = V::bc(0.f);
  for (int kx = 0; kx < 3; ++kx) {
    const int64_t s0 = sg[kx * 3], s1 = sg[kx * 3 + 1], s2 = sg[kx * 3 + 2], s3 = sg[kx * 3 + 3];
    if (s0 == s3) continue;
    vt p[NV];
    for (int v = 0; v < NV; ++v) p[v] = z;
    if (!top && !bot) {
      kx_taps<VW, NV, 0, NV>(src, off, w, s0, s3, p);
    } else {
      if (top)
        kx_taps<VW, NV, WV, NV>(src, off, w, s0, s1, p);
      else
        kx_taps<VW, NV, 0, NV>(src, off, w, s0, s1, p);
      kx_taps<VW, NV, 0, NV>(src, off, w, s1, s2, p);
      if (bot)
        kx_taps<VW, NV, 0, NV - WV>(src, off, w, s2, s3, p);
      else
        kx_taps<VW, NV, 0, NV>(src, off, w, s2, s3, p);
    }
    if (kx == 1) {
      for (int v = 0; v < NV; ++v) out[v] += p[v];
    } else if (kx == 0) {  // out[x] += P[x - 1]: lane 0 from the previous vector of the row (zero at its start)
      for (int v = 0; v < NV; ++v) out[v] += K::from_left(p[v], v % WV == 0 ? z : p[v > 0 ? v - 1 : 0]);
    } else {  // out[x] += P[x + 1]: the last lane from the next vector of the row (zero at its end)
      for (int v = 0; v < NV; ++v) out[v] += K::from_right(p[v], v % WV == WV - 1 ? z : p[v + 1 < NV ? v + 1 : v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t o = (row0 + v / WV) * W + (v % WV) * VW;
    vt a = out[v];
    if (rp) a += V::ld(rp + o);
    if (relu) a = K::max0(a);
    V::st(op + o, a);
  }
}

// fn(std::integral_constant<int, K>{}) for K = k in 1 .. 8 (a compile-time count of rows / images / vectors)
template <class Fn>
static inline void with_count8(int64_t k, Fn&& fn) {
  switch (k) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    default: break;
  }
}

template <int VW, int WV>
static void kx_block_rows(int64_t rows, const float* xin, int64_t row0, int64_t W, bool top, bool bot,
                          const int32_t* sg, const int32_t* off, const float* w, float* op, const float* rp,
                          float bias, bool relu) {
  with_count8(rows, [&](auto r) {
    constexpr int R = decltype(r)::value;
    if constexpr (R * WV <= 8) kx_block<VW, R * WV, WV>(xin, row0, W, top, bot, sg, off, w, op, rp, bias, relu);
  });
}

// ------------------------------------------------------------------------------------------------------------
// The tiny-map path (3x3, stride 1, padding 1 on 4x4 or 2x2 maps, batches up to 16 by default; AVX-512): one image per vector
// (16 / 4 floats: zmm / xmm). out = sum over the kernel positions (ky, kx) of shift_(ky,kx)(P_(ky,kx)), where
// P_(ky,kx) = sum over the taps (c, ky, kx) of w * in[c]: every tap is one multiply-add of a whole, aligned input
// channel, and the shift (a lane permutation with zeros where the window leaves the map) is applied once per kernel
// position and filter to the sum in registers. Replaces the im2col gather (one load of a 16- / 4-float im2col row
// per tap, from a matrix 9x the input) on VGG-16's 512-channel layers at batch 1.
template <int VW>
struct TinyVec;
template <>
struct TinyVec<16> {
  typedef vecf v;
  typedef __m512i ix;
  static v ld(const float* p) { return loadu(p); }
  static void st(float* p, v a) { storeu(p, a); }
  static v bc(float x) { return (v)_mm512_set1_ps(x); }
  static ix idx(const int32_t* t) { return _mm512_loadu_si512(t); }
  static v shift(v a, ix i, uint16_t m) { return (v)_mm512_maskz_permutexvar_ps((__mmask16)m, i, (__m512)a); }
  static v max0(v a) { return (v)_mm512_max_ps((__m512)a, _mm512_setzero_ps()); }
};
template <>
struct TinyVec<4> {
  typedef vec4f v;
  typedef __m128i ix;
  static v ld(const float* p) { return VecN<4>::ld(p); }
  static void st(float* p, v a) { VecN<4>::st(p, a); }
  static v bc(float x) { return (v)_mm_set1_ps(x); }
  static ix idx(const int32_t* t) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(t)); }
  static v shift(v a, ix i, uint16_t m) { return (v)_mm_maskz_permutevar_ps((__mmask8)m, (__m128)a, i); }
  static v max0(v a) { return (v)_mm_max_ps((__m128)a, _mm_setzero_ps()); }
};

// One filter over NV images (vectors src[v]): sum over the kernel positions of the shifted tap sums, stored with
// bias (+ residual) and ReLU at op + v * ostride. With fewer than 4 images the taps alternate over CH = 4 / NV
// accumulator sets (independent multiply-add chains).
template <int VW, int NV>
static inline void tiny_block(const float* const (&src)[NV], const int32_t* __restrict sg,
                              const uint16_t* __restrict off, const float* __restrict w, const int32_t* idx,
                              const uint16_t* msk, float* __restrict op, const float* __restrict rp, int64_t ostride,
                              float bias, bool relu) {
  using T = TinyVec<VW>;
  typedef typename T::v vt;
  constexpr int CH = NV >= 4 ? 1 : 4 / NV;
  vt out[NV];
  for (int v = 0; v < NV; ++v) out[v] = T::bc(bias);
  for (int s = 0; s < 9; ++s) {
    const int64_t t0 = sg[s], t1 = sg[s + 1];
    if (t0 == t1) continue;
    vt p[CH][NV];
    for (int c = 0; c < CH; ++c)
      for (int v = 0; v < NV; ++v) p[c][v] = T::bc(0.f);
    int64_t t = t0;
    for (; t + CH <= t1; t += CH) {
#pragma GCC unroll 4
      for (int c = 0; c < CH; ++c) {
        const vt we = T::bc(w[t + c]);
        const int64_t o = (int64_t)off[t + c] * VW;
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) p[c][v] += we * T::ld(src[v] + o);
      }
    }
    for (; t < t1; ++t) {
      const vt we = T::bc(w[t]);
      const int64_t o = (int64_t)off[t] * VW;
      for (int v = 0; v < NV; ++v) p[0][v] += we * T::ld(src[v] + o);
    }
    for (int c = 1; c < CH; ++c)
      for (int v = 0; v < NV; ++v) p[0][v] += p[c][v];
    if (s == 4) {  // the centre: no shift
      for (int v = 0; v < NV; ++v) out[v] += p[0][v];
    } else {
      const typename T::ix ix = T::idx(idx + s * VW);
      for (int v = 0; v < NV; ++v) out[v] += T::shift(p[0][v], ix, msk[s]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    vt a = out[v];
    if (rp) a += T::ld(rp + v * ostride);
    if (relu) a = T::max0(a);
    T::st(op + v * ostride, a);
  }
}

template <int VW>
static void tiny_block_n(int64_t nv, const float* x0, int64_t istride, const int32_t* sg, const uint16_t* off,
                         const float* w, const int32_t* idx, const uint16_t* msk, float* op, const float* rp,
                         int64_t ostride, float bias, bool relu) {
  with_count8(nv, [&](auto k) {
    constexpr int K = decltype(k)::value;
    const float* src[K];
    for (int v = 0; v < K; ++v) src[v] = x0 + v * istride;
    tiny_block<VW, K>(src, sg, off, w, idx, msk, op, rp, ostride, bias, relu);
  });
}

// 2x2 maps (3x3, stride 1, padding 1): every (output pixel o, input pixel i) pair of a 2x2 map is one kernel position,
// (iy - oy + 1) * 3 + (ix - ox + 1), so a kernel (filter f, channel c) acts on the channel's 4 pixels as a 4 x 4
// matrix M = its 9 weights permuted (vpermps with a fixed index). One 16-lane multiply-add per kernel and image
// (M times the channel's 4 pixels broadcast to the 4 lane groups) does the work of its 4 taps' 128-bit ones; the
// lane groups are summed once per filter. Kernels are stored with all 9 weights (zeros included) and their channel.
struct K22Taps {
  std::vector<int32_t> kptr;  // list i: kernels [kptr[i], kptr[i + 1])
  std::vector<uint16_t> ch;   // kernel k's input channel
  std::vector<float> w9;      // kernel k's 9 weights at w9[9 k ..], 16 floats of padding at the end
  double taps_per_kernel = 0;
};

static std::shared_ptr<const K22Taps> build_k22_taps(const int32_t* ptr, const int32_t* ch, const int32_t* pos,
                                                     const float* wv, int64_t L) {
  auto k = std::make_shared<K22Taps>();
  k->kptr.resize(L + 1);
  for (int64_t i = 0; i < L; ++i) {
    k->kptr[i] = (int32_t)k->ch.size();
    // a filter's taps are sorted by (channel, position): one kernel per run of equal channels
    for (int64_t t = ptr[i]; t < ptr[i + 1];) {
      const int32_t c = ch[t];
      k->ch.push_back((uint16_t)c);
      const size_t b = k->w9.size();
      k->w9.resize(b + 9, 0.f);
      for (; t < ptr[i + 1] && ch[t] == c; ++t) k->w9[b + pos[t]] += wv[t];
    }
  }
  k->kptr[L] = (int32_t)k->ch.size();
  k->w9.resize(k->w9.size() + 16, 0.f);
  k->taps_per_kernel = k->ch.empty() ? 0.0 : (double)ptr[L] / (double)k->ch.size();
  return k;
}

// One filter over NV images of 2x2 maps (image v's channel 0 at src[v]; channels 4 floats apart): out[v][o] =
// sum over the kernels of sum over i of M[o][i] * x[c][i], stored with bias (+ residual) and ReLU at op + v * ostride.
template <int NV>
static inline void k22_block(const float* const (&src)[NV], const uint16_t* __restrict kc, const float* __restrict w9,
                             int64_t k0, int64_t k1, __m512i idx, float* __restrict op, const float* __restrict rp,
                             int64_t ostride, float bias, bool relu) {
  constexpr int CH = NV >= 4 ? 1 : 4 / NV;
  __m512 acc[CH][NV];
  for (int c = 0; c < CH; ++c)
    for (int v = 0; v < NV; ++v) acc[c][v] = _mm512_setzero_ps();
  int64_t k = k0;
  for (; k + CH <= k1; k += CH) {
#pragma GCC unroll 4
    for (int c = 0; c < CH; ++c) {
      const __m512 m = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(w9 + 9 * (k + c)));
      const int64_t o = (int64_t)kc[k + c] * 4;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        acc[c][v] = _mm512_fmadd_ps(m, _mm512_broadcast_f32x4(_mm_loadu_ps(src[v] + o)), acc[c][v]);
    }
  }
  for (; k < k1; ++k) {
    const __m512 m = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(w9 + 9 * k));
    const int64_t o = (int64_t)kc[k] * 4;
    for (int v = 0; v < NV; ++v)
      acc[0][v] = _mm512_fmadd_ps(m, _mm512_broadcast_f32x4(_mm_loadu_ps(src[v] + o)), acc[0][v]);
  }
  const __m128 b = _mm_set1_ps(bias);
  for (int v = 0; v < NV; ++v) {
    __m512 a = acc[0][v];
    for (int c = 1; c < CH; ++c) a = _mm512_add_ps(a, acc[c][v]);
    // lane o * 4 + i: sum over i within each group of 4, then the groups' first lanes
    a = _mm512_add_ps(a, _mm512_permute_ps(a, 0xB1));
    a = _mm512_add_ps(a, _mm512_permute_ps(a, 0x4E));
    __m128 r = _mm512_castps512_ps128(_mm512_maskz_compress_ps((__mmask16)0x1111, a));
    r = _mm_add_ps(r, b);
    if (rp) r = _mm_add_ps(r, _mm_loadu_ps(rp + v * ostride));
    if (relu) r = _mm_max_ps(r, _mm_setzero_ps());
    _mm_storeu_ps(op + v * ostride, r);
  }
}

static void k22_block_n(int64_t nv, const float* x0, int64_t istride, const uint16_t* kc, const float* w9, int64_t k0,
                        int64_t k1, __m512i idx, float* op, const float* rp, int64_t ostride, float bias, bool relu) {
  with_count8(nv, [&](auto k) {
    constexpr int K = decltype(k)::value;
    const float* src[K];
    for (int v = 0; v < K; ++v) src[v] = x0 + v * istride;
    k22_block<K>(src, kc, w9, k0, k1, idx, op, rp, ostride, bias, relu);
  });
}

// The output and job loop of the kx-split and tiny-map paths: nblocks blocks of output positions x filter groups
// (lists dealt round-robin; at least g_kx_jobs jobs per thread). Block b covers images [n0, n0 + nimg) and, in each,
// the rows [y0, y1) of its map (range(b) gives them, once per job); body(i, f, r, op, rp, bias) computes list i
// (filter f) for block r, op / rp pointing at image n0's channel f of the output / residual; the filters without
// taps get bias (+ residual) only.
struct BlockRange {
  int64_t n0, nimg, y0, y1;
};

template <class Range, class Body>
static torch::Tensor block_jobs(const torch::Tensor& x, const torch::Tensor& tw, const int32_t* ord, int64_t L,
                                int64_t F, const c10::optional<torch::Tensor>& bias,
                                const c10::optional<torch::Tensor>& residual, bool relu, int64_t nblocks,
                                Range&& range, Body&& body) {
  const int64_t N = x.size(0), W = x.size(3), HW = x.size(2) * W;
  auto out = conv_output(N, F, x.size(2), W, x);
  const Epilogue ep(bias, residual, out, "sparse_conv2d");
  const float* bp = ep.bp;
  const float* rp = ep.rp;
  float* op = out.data_ptr<float>();
  const std::vector<int64_t> empty = empty_filters(ord, L, F);
  const int64_t lists = L + (empty.empty() ? 0 : 1);
  const int64_t nthreads = std::max<int64_t>(1, nck::num_threads());
  const int64_t ng = std::min<int64_t>(std::max<int64_t>(lists, 1),
                                       std::max<int64_t>(1, (g_kx_jobs * nthreads + nblocks - 1) / nblocks));
  const int64_t work = tw.numel() * N * HW;
  nck::parallel_for(0, nblocks * ng, work < g_parallel_threshold ? nblocks * ng : 1, [&](int64_t jb, int64_t je) {
    for (int64_t job = jb; job < je; ++job) {
      const int64_t g = job % ng, b = job / ng;
      const BlockRange r = range(b);
      for (int64_t i = g; i < lists; i += ng) {
        if (i == L) {  // filters without taps: bias (+ residual) only
          for (int64_t f : empty)
            for (int64_t n = r.n0; n < r.n0 + r.nimg; ++n)
              for (int64_t k = r.y0 * W; k < r.y1 * W; ++k) {
                const int64_t o = (n * F + f) * HW + k;
                const float v = (bp ? bp[f] : 0.f) + (rp ? rp[o] : 0.f);
                op[o] = relu ? (v > 0.f ? v : 0.f) : v;
              }
          continue;
        }
        const int64_t f = ord[i], o = (r.n0 * F + f) * HW;
        body(i, f, r, op + o, rp ? rp + o : nullptr, bp ? bp[f] : 0.f);
      }
    }
  });
  return out;
}

static torch::Tensor sparse_conv2d_tiny(const torch::Tensor& x, const torch::Tensor& tp, const torch::Tensor& tc,
                                        const torch::Tensor& tq, const torch::Tensor& tw, const torch::Tensor& fo,
                                        const c10::optional<torch::Tensor>& bias,
                                        const c10::optional<torch::Tensor>& residual, int64_t F, bool relu,
                                        TapOffCache* cache) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int32_t* ptr = tp.data_ptr<int32_t>();
  const int32_t* ch = tc.data_ptr<int32_t>();
  const int32_t* pos = tq.data_ptr<int32_t>();
  const float* wv = tw.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int32_t* ord = fo.data_ptr<int32_t>();
  const int64_t L = fo.numel();
  // blocks of up to 8 images, whole maps
  auto range = [&](int64_t b) { return BlockRange{b * 8, std::min<int64_t>(8, N - b * 8), 0, H}; };
  const int64_t nblocks = (N + 7) / 8;
  std::shared_ptr<const K22Taps> kk;
  if (HW == 4 && g_tiny_2x2_kernels)
    kk = cached(cache, &TapOffCache::k22, [](const K22Taps&) { return true; },
                [&] { return build_k22_taps(ptr, ch, pos, wv, L); });
  // 2x2 as a 4 x 4 matrix per kernel (k22_block) where kernels hold 2.5+ taps on average: one 16-lane multiply-add
  // per kernel and image with 9 weights loaded, against one 4-lane multiply-add per tap. VGG-16 at batch 1 (one
  // process, alternated, Intel VM): pattern + connectivity (4 taps a kernel) 1.14x faster whole, 90% unstructured
  // (~1.5 taps a kernel) 0.88x, hence the threshold.
  if (kk && kk->taps_per_kernel >= 2.5) {
    alignas(64) int32_t id[16];
    for (int64_t l = 0; l < 16; ++l) {  // lane o * 4 + i: kernel position (iy - oy + 1) * 3 + (ix - ox + 1)
      const int64_t o = l / 4, i = l % 4;
      id[l] = (int32_t)(((i / 2) - (o / 2) + 1) * 3 + ((i % 2) - (o % 2) + 1));
    }
    const __m512i idx = _mm512_load_si512(id);
    const int32_t* kp = kk->kptr.data();
    const uint16_t* kc = kk->ch.data();
    const float* w9 = kk->w9.data();
    return block_jobs(x, tw, ord, L, F, bias, residual, relu, nblocks, range,
                      [&](int64_t i, int64_t, const BlockRange& r, float* op, const float* rp, float bv) {
                        k22_block_n(r.nimg, xp + r.n0 * C * HW, C * HW, kc, w9, kp[i], kp[i + 1], idx, op, rp,
                                    F * HW, bv, relu);
                      });
  }
  static constexpr int by_position[9] = {0, 1, 2, 3, 4, 5, 6, 7, 8};
  const auto kt = cached(
      cache, &TapOffCache::tiny, [&](const SegTaps<uint16_t>& k) { return k.H == H && k.W == W; },
      [&] {
        return build_seg_taps<uint16_t>(ptr, ch, pos, wv, L, H, W, by_position,
                                        [](int64_t c, int64_t, int64_t) { return c; });
      });
  // per kernel position s = ky * 3 + kx: lane l = (y, x) of the output takes lane l + (ky - 1) * W + (kx - 1) of
  // the position's sum where that window element is inside the map, zero elsewhere
  alignas(64) int32_t idx[9 * 16];
  uint16_t msk[9];
  for (int64_t s = 0; s < 9; ++s) {
    const int64_t dy = s / 3 - 1, dx = s % 3 - 1;
    uint32_t m = 0;
    for (int64_t l = 0; l < HW; ++l) {
      const int64_t y = l / W + dy, xx = l % W + dx;
      const bool ok = y >= 0 && y < H && xx >= 0 && xx < W;
      idx[s * HW + l] = ok ? (int32_t)(y * W + xx) : 0;
      if (ok) m |= 1u << l;
    }
    msk[s] = (uint16_t)m;
  }
  const int32_t* seg = kt->seg.data();
  const uint16_t* koff = kt->off.data();
  const float* kw = kt->w.data();
  return block_jobs(x, tw, ord, L, F, bias, residual, relu, nblocks, range,
                    [&](int64_t i, int64_t, const BlockRange& r, float* op, const float* rp, float bv) {
                      const float* xs = xp + r.n0 * C * HW;
                      if (HW == 16)
                        tiny_block_n<16>(r.nimg, xs, C * HW, seg + i * 9, koff, kw, idx, msk, op, rp, F * HW, bv, relu);
                      else
                        tiny_block_n<4>(r.nimg, xs, C * HW, seg + i * 9, koff, kw, idx, msk, op, rp, F * HW, bv, relu);
                    });
}

// Staged rows (set_kx_stage): a block's input rows, with the halo rows, first copied into a per-thread buffer
// [channel][RB + 2 rows][W], where the channels' rows no longer lie a multiple of 4 KiB apart. Read in place, the
// rows of a 32x32 map's channels fall in the same L1 sets, and a 64-channel block (48 KiB with its halo) exceeds a
// 32 KiB L1 anyway. Measured on a Zen 4 VM (benchmarks/l1_probe.py, one thread, 10% density): the tap loop ran
// 1.5-1.7x faster from the copy (77-80 against 44-52 GFLOP/s), 16-channel 32x32 blocks (12 KiB, in L1 already)
// 0.95x, 16x16 maps (planes 1 KiB apart) 0.94-1.08x. In the runtime (benchmarks/kx_stage_ab.py: four chained layers
// at 10% density, 2 threads, alternated in one process): 32x32 maps with 48-128 channels 1.28-1.36x at batch 1,
// 1.16-1.23x at batch 8, 0.98-1.17x at batch 64; 32 channels 1.27x / 1.14x / 0.83x. 64x64 maps (blocks of 2 rows: 4
// rows copied per 2 computed) measured 0.94-1.27x in scratch runs. So only blocks of 4+ rows whose staged rows exceed
// g_kx_stage_bytes (32 KiB) from planes a multiple of 4 KiB apart are staged.

static torch::Tensor sparse_conv2d_kx(const torch::Tensor& x, const torch::Tensor& tp, const torch::Tensor& tc,
                                      const torch::Tensor& tq, const torch::Tensor& tw, const torch::Tensor& fo,
                                      const c10::optional<torch::Tensor>& bias,
                                      const c10::optional<torch::Tensor>& residual, int64_t F, bool relu,
                                      TapOffCache* cache) {
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t VW = W % VL == 0 ? VL : HVL, WV = W / VW, RB = 8 / WV;  // rows per block: 8 vectors
  const int64_t nbi = (H + RB - 1) / RB;
  const int32_t* ptr = tp.data_ptr<int32_t>();
  const int32_t* ord = fo.data_ptr<int32_t>();
  const int64_t L = fo.numel();
  // staged: a channel's rows in the copy are (RB + 2) * W floats apart, its row y0 - 1 first
  const int64_t SP = (RB + 2) * W;
  const bool staged = g_kx_stage && RB >= 4 && (HW * 4) % 4096 == 0 && C * SP * 4 > g_kx_stage_bytes;
  static constexpr int by_column[9] = {0, 3, 6, 1, 4, 7, 2, 5, 8};  // segment kx * 3 + ky: position ky * 3 + kx
  const int64_t plane = staged ? SP : HW;
  const auto kt = cached(
      cache, staged ? &TapOffCache::kxs : &TapOffCache::kx,
      [&](const SegTaps<int32_t>& k) { return k.H == H && k.W == W; },
      [&] {
        return build_seg_taps<int32_t>(ptr, tc.data_ptr<int32_t>(), tq.data_ptr<int32_t>(), tw.data_ptr<float>(), L,
                                       H, W, by_column,
                                       [&](int64_t c, int64_t ky, int64_t) { return c * plane + (ky - 1) * W; });
      });
  const float* xp = x.data_ptr<float>();
  const int32_t* seg = kt->seg.data();
  const int32_t* koff = kt->off.data();
  const float* kw = kt->w.data();
  const int64_t call = staged ? ++g_kx_calls : 0;
  // blocks of RB rows of one image
  auto range = [&](int64_t b) {
    const int64_t y0 = (b % nbi) * RB;
    return BlockRange{b / nbi, 1, y0, std::min<int64_t>(H, y0 + RB)};
  };
  return block_jobs(x, tw, ord, L, F, bias, residual, relu, x.size(0) * nbi, range,
                    [&](int64_t i, int64_t, const BlockRange& br, float* o, const float* r, float bv) {
                      const int64_t y0 = br.y0, rows = br.y1 - br.y0;
                      const bool top = y0 == 0, bot = br.y1 == H;
                      const float* xn = xp + br.n0 * C * HW;
                      const float* xin = xn + y0 * W;
                      if (staged) {  // this thread's copy of the block's rows y0 - 1 .. y1 (those in the image)
                        thread_local std::vector<float> buf;
                        thread_local int64_t key[3] = {-1, -1, -1};
                        const size_t need = (size_t)(C * SP + 16);
                        if (buf.size() < need) {
                          buf.assign(need, 0.f);
                          key[0] = -1;
                        }
                        float* sb = buf.data() + ((16 - ((uintptr_t)buf.data() / 4) % 16) % 16);  // 64-byte aligned
                        if (key[0] != call || key[1] != br.n0 || key[2] != y0) {
                          const int64_t ya = std::max<int64_t>(0, y0 - 1), yb = std::min<int64_t>(H, br.y1 + 1);
                          for (int64_t c = 0; c < C; ++c)
                            std::memcpy(sb + c * SP + (ya - y0 + 1) * W, xn + c * HW + ya * W,
                                        (size_t)((yb - ya) * W) * sizeof(float));
                          key[0] = call;
                          key[1] = br.n0;
                          key[2] = y0;
                        }
                        xin = sb + W;
                      }
                      const int32_t* sg = seg + i * 9;
                      if (VW == HVL) {
                        kx_block_rows<HVL, 1>(rows, xin, y0, W, top, bot, sg, koff, kw, o, r, bv, relu);
                        return;
                      }
                      switch (WV) {
                        case 1: kx_block_rows<VL, 1>(rows, xin, y0, W, top, bot, sg, koff, kw, o, r, bv, relu); break;
                        case 2: kx_block_rows<VL, 2>(rows, xin, y0, W, top, bot, sg, koff, kw, o, r, bv, relu); break;
                        case 4: kx_block_rows<VL, 4>(rows, xin, y0, W, top, bot, sg, koff, kw, o, r, bv, relu); break;
                        default: kx_block_rows<VL, 8>(rows, xin, y0, W, top, bot, sg, koff, kw, o, r, bv, relu); break;
                      }
                    });
}
#endif

// x: (N, C, H, W) fp32. Taps of filter list i: [tap_ptr[i], tap_ptr[i+1]) with channel tap_chan, kernel
// position tap_pos = ky * kw + kx and weight tap_w; filter_order[i] is the output channel of list i.
//
// Layout: the padded input is split into S x S phase planes of Hph x Wph, stored channel-major with the
// batch inside: planes[c][ry][rx][n][yy][xx]. A tap of channel c at (ky, kx) then reads, for the flat
// output index q = n * plane + y * Wph + x, the element planes[base(c, ky % S, kx % S) + (ky / S) * Wph +
// (kx / S) + q]: one shifted contiguous window over all images at once, so small planes (4x4) still
// give long vectors when the batch is large. Positions with y >= Ho or x >= Wo are computed and dropped.

torch::Tensor sparse_conv2d(torch::Tensor x, torch::Tensor tap_ptr, torch::Tensor tap_chan, torch::Tensor tap_pos,
                            torch::Tensor tap_w, torch::Tensor filter_order, c10::optional<torch::Tensor> bias,
                            c10::optional<torch::Tensor> residual, int64_t out_channels, int64_t kh, int64_t kw,
                            int64_t stride, int64_t pad, bool relu, TapOffCache* cache) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32, "sparse_conv2d: x must be (N, C, H, W) float32");
  TORCH_CHECK(stride >= 1 && pad >= 0 && kh >= 1 && kw >= 1, "sparse_conv2d: bad geometry");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), S = stride;
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad;
  TORCH_CHECK(Hp >= kh && Wp >= kw, "sparse_conv2d: input smaller than the kernel");
  const int64_t Ho = (Hp - kh) / S + 1, Wo = (Wp - kw) / S + 1;
  const int64_t Hph = (Hp + S - 1) / S, Wph = (Wp + S - 1) / S, plane = Hph * Wph;
  const int64_t F = out_channels, L = filter_order.size(0);
  const int64_t total = N * plane;                               // flat output positions (all images)
  const int64_t group = N * plane;                               // one (c, ry, rx) block of planes
  const int64_t slack = Wph * (kh / S + 1) + kw + BLOCK;         // reads past the last block land here

  TORCH_CHECK(tap_chan.scalar_type() == torch::kInt32 && tap_pos.scalar_type() == torch::kInt32 &&
                  tap_ptr.scalar_type() == torch::kInt32 && filter_order.scalar_type() == torch::kInt32 &&
                  tap_w.scalar_type() == torch::kFloat32,
              "sparse_conv2d: taps must be int32 (ptr, chan, pos, order) and float32 (w)");
  auto tp = tap_ptr.contiguous();
  auto tc = tap_chan.contiguous();
  auto tq = tap_pos.contiguous();
  auto tw = tap_w.contiguous();
  auto fo = filter_order.contiguous();
  const int64_t E = tw.numel();
  TORCH_CHECK(tp.numel() == L + 1 && tc.numel() == E && tq.numel() == E, "sparse_conv2d: inconsistent taps");
  // taps are validated when they are built (netcarve/runtime/kernels.py: conv_taps); here only the table
  std::vector<int64_t> tapoff(kh * kw);
  for (int64_t ky = 0; ky < kh; ++ky)
    for (int64_t kx = 0; kx < kw; ++kx)
      tapoff[ky * kw + kx] = ((ky % S) * S + kx % S) * group + (ky / S) * Wph + (kx / S);
  const Taps taps{tc.data_ptr<int32_t>(), tq.data_ptr<int32_t>(), tw.data_ptr<float>(), tapoff.data(),
                  S * S * group};

#if defined(__AVX512F__)
  if (g_kx_split && S == 1 && kh == 3 && kw == 3 && pad == 1 &&
      (W == HVL || W == VL || W == 2 * VL || W == 4 * VL || W == 8 * VL) && C * H * W < ((int64_t)1 << 31))
    return sparse_conv2d_kx(x, tp, tc, tq, tw, fo, bias, residual, F, relu, cache);
  if (g_tiny_maps && S == 1 && kh == 3 && kw == 3 && pad == 1 && ((H == 4 && W == 4) || (H == 2 && W == 2)) &&
      N <= g_tiny_max_batch && C <= 65536)
    return sparse_conv2d_tiny(x, tp, tc, tq, tw, fo, bias, residual, F, relu, cache);
#endif
  // Small outputs (deep layers at batch 1: 8x8, 4x4, 2x2 with many channels): the padded wide grid wastes
  // most lanes and every load is unaligned. Gather the input as an im2col matrix X (C*kh*kw rows of the P
  // output positions, padded to whole vectors) once, then each filter is a sparse row times X: one aligned
  // load and one FMA per tap and vector.
  const int64_t P = N * Ho * Wo, Pp = (P + VL - 1) / VL * VL;
  // (measured: a clear win for 256-512 channels at 4x4-2x2, a loss for ResNet-56's 32-64 channels). Outputs that
  // take the row layout (8x8 on AVX2) stay on the planes: there the im2col matrix (9x the input) spills L2 and
  // a 256-channel 8x8 layer at batch 1 ran 2.7x slower than banded row vectors (Zen 3, 2 threads, 12% density).
  const bool rows_fit = g_row_layout && Wo % VL == 0;
#if defined(__AVX512F__)
  // (the half-width row layout, below, takes 8x8 outputs at small batches like AVX2's row layout does)
  const bool half = g_half_rows && g_row_layout && g_banded && Wo % VL != 0 && Wo % HVL == 0;
#else
  const bool half = false;
#endif
  if (!rows_fit && !half && Pp <= std::min<int64_t>(g_small_max_vectors * 16, SMALL_MAX_PX) && C * kh * kw >= 1024 &&
      C * kh * kw * Pp * 4 <= (int64_t)1 << 20) {
    return sparse_conv2d_small(x, tp, tc, tq, tw, fo, bias, residual, F, kh, kw, S, pad, relu, Ho, Wo, P, Pp, cache);
  }

  // Larger small outputs (4x4 / 2x2 maps at large batches): the wide grid would compute mostly padding. Maps
  // that fill more of it (8x8 with padding 1: 64 of 100 positions) only where every im2col row feeds many taps
  // (E >= 16 K), or gathering the tiles costs more than it saves: measured on a Zen 4 VM (AVX-512, 2 threads,
  // batch 64, 90% unstructured) VGG-16's 256-channel 8x8 layers ran 1.5-1.75x faster batched (25 taps per row),
  // ResNet-56's 64-channel 8x8 layers 20% slower (6 taps per row). (AVX2 runs 8x8 maps in the row layout.)
  const double fill = (double)(Ho * Wo) / (double)plane;
  // tile width: 8 vectors where that still gives 16+ column tiles (8x8 maps at batch 64: 5% faster than 4 on Zen 4),
  // else 4 (2x2 at batch 64: 256 positions, 2 tiles of 8 vectors, 30% slower than 4 tiles of 4)
  const int64_t bnv =
      g_batched_nv == 0 ? (P >= 16 * 8 * VL ? 8 : 4) : g_batched_nv <= 2 ? 2 : g_batched_nv <= 4 ? 4 : 8;
  const bool fill_ok = fill < 0.6 || (fill < g_batched_fill && E >= 16 * C * kh * kw);
  if (!rows_fit && g_batched_small && P >= 8 * VL && C * kh * kw >= 256 && fill_ok &&
      N * C * H * W < ((int64_t)1 << 31)) {
    if (bnv == 2)
      return sparse_conv2d_batched<2>(x, tp, tc, tq, tw, fo, bias, residual, F, kh, kw, S, pad, relu, Ho, Wo, cache);
    if (bnv == 4)
      return sparse_conv2d_batched<4>(x, tp, tc, tq, tw, fo, bias, residual, F, kh, kw, S, pad, relu, Ho, Wo, cache);
    return sparse_conv2d_batched<8>(x, tp, tc, tq, tw, fo, bias, residual, F, kh, kw, S, pad, relu, Ho, Wo, cache);
  }

  // Outputs narrower than a vector whose rows fill whole vectors, at large batches: several rows per vector
  // (sparse_conv2d_multirow). At batch 1 (4 vectors of an 8x8 map) it was within +-10% of the wide grid's one block
  // of 7 on a Zen 4 VM, faster or slower with the host's throttling (docs/runtime.md), hence 64+ vectors by default.
  // With AVX-512, 8x8 maps take the half-width row layout (below) instead: ResNet-56 at batch 64 ran 6% faster
  // with it than with multi-row (one process, 2 threads, Zen 4 VM), without the kw input copies.
  if (g_multirow && !half && S == 1 && Wo < VL && VL % Wo == 0 && Ho % (VL / Wo) == 0 &&
      P >= g_multirow_min_vectors * VL) {
    return sparse_conv2d_multirow(x, tp, tc, tq, tw, fo, bias, residual, F, kh, kw, pad, relu, Ho, Wo, cache);
  }
  const int64_t nthreads = std::max<int64_t>(1, nck::num_threads());
  if (g_row_layout && g_banded && (Wo % VL == 0 || half)) {
    // Banded (see direct_conv2d): each thread takes a contiguous range of output rows (at batch 1 a band of one
    // image, at large batches whole images), builds the padded phase planes of just those rows (+ halo) in a
    // buffer of its own and runs every filter over them in blocks of 8 row vectors. No single-threaded copy of
    // the whole input, and each thread mostly reads rows it wrote itself in the previous layer.
    // Small outputs (8x8 at batch 1: under g_sparse_band_min_vectors = 8 vectors per thread) split the filters
    // instead: every thread builds the whole padded input (in parallel, a few KiB) and runs its share of the filters
    // (dealt round-robin in the heaviest-first order). 16x16 outputs at batch 1 (8 vectors per thread) split rows
    // since 2026-12-05 (the threshold was 16): each thread copies half the input, a quarter of it at stride 2 (the
    // whole 32x32 input in 4 phase planes, 74 KiB for 16 channels, had made those layers 1.08x faster on 2 threads
    // than on 1); sparse ResNet-56 at batch 1, 2 threads, 1.028x (pattern) / 1.035x (90% unstructured) faster,
    // VGG-16 level (1.005x); a threshold of 4 (8x8 outputs by rows too) was level on ResNet-56, 0.98x on VGG-16.
    const int64_t R = N * Ho, HoWo = Ho * Wo;
    const int64_t work = E * N * Ho * Wo;
    const int64_t nt = work < g_parallel_threshold ? 1 : std::min<int64_t>(std::max<int64_t>(R, L), nthreads);
    // (bands small enough to stay in L1, 24-48 KiB, measured 5-20% slower at batch 64 than whole images: halo
    // copies and short sweeps)
    const int64_t vl = half ? VL / 2 : VL;  // (half: AVX-512 only, VL / 2 = HVL)
    const Bands bands(N, C, H, W, S, pad, kh, Ho, Wo, Wph, F, nt,
                      (R * (Wo / vl)) / nt >= g_sparse_band_min_vectors ? std::min<int64_t>(R, nt) : 1, vl);
    const int64_t bplane = bands.bplane, ng = bands.ng;
    std::vector<int64_t> boff(kh * kw);
    for (int64_t ky = 0; ky < kh; ++ky)
      for (int64_t kx = 0; kx < kw; ++kx) boff[ky * kw + kx] = ((ky % S) * S + kx % S) * bplane + (ky / S) * Wph + (kx / S);
    const int32_t* ptr = tp.data_ptr<int32_t>();
    const int32_t* ord = fo.data_ptr<int32_t>();
    const float* wv = tw.data_ptr<float>();
    const Taps btaps{tc.data_ptr<int32_t>(), tq.data_ptr<int32_t>(), wv, boff.data(), S * S * bplane};
    const auto offs_p = tap_offsets(btaps, E, bplane, Wph, S, cache);
    const int64_t* offs = offs_p->data();
    auto out = conv_output(N, F, Ho, Wo, x);
    const Epilogue ep(bias, residual, out, "sparse_conv2d");
    const float* bp = ep.bp;
    const float* rp = ep.rp;
    float* op = out.data_ptr<float>();
    const std::vector<int64_t> empty = empty_filters(ord, L, F);
    bands.run(x.data_ptr<float>(), [&](int64_t g, const float* pl, const int64_t* vin, const int64_t* vout,
                                       int64_t nvec) {
      alignas(64) float acc[BLOCK];
      for (int64_t v0 = 0; v0 < nvec; v0 += 8) {
        const int64_t nv = std::min<int64_t>(8, nvec - v0);
        const int64_t* voff = vin + v0;
        const int64_t* ooff = vout + v0;
#if defined(__AVX512F__)
        if (vl == HVL) {  // half-width rows: every block from the registers, empty filters element by element
          for (int64_t i = g; i < L; i += ng) {
            const int64_t t0 = ptr[i], nt = ptr[i + 1] - t0, f = ord[i];
            accumulate_part_store_h(pl, voff, offs + t0, wv + t0, nt, nv, op + f * HoWo, rp ? rp + f * HoWo : nullptr,
                                    ooff, bp ? bp[f] : 0.f, relu);
          }
          if (g == 0)
            for (int64_t f : empty)
              for (int64_t k = 0; k < nv; ++k)
                for (int64_t j = 0; j < HVL; ++j) {
                  const int64_t o = f * HoWo + ooff[k] + j;
                  const float v = (bp ? bp[f] : 0.f) + (rp ? rp[o] : 0.f);
                  op[o] = relu ? (v > 0.f ? v : 0.f) : v;  // as vmax0 (a NaN becomes 0)
                }
          continue;
        }
#endif
        for (int64_t i = g; i < L; i += ng) {
          const int64_t t0 = ptr[i], nt = ptr[i + 1] - t0;
          const int64_t f = ord[i];
          if (g_fused_store && nv >= 2) {
            accumulate_part_store(pl, voff, offs + t0, wv + t0, nt, nv, op + f * HoWo, rp ? rp + f * HoWo : nullptr,
                                  ooff, bp ? bp[f] : 0.f, relu);
            continue;
          }
          accumulate_part(pl, voff, offs + t0, wv + t0, nt, nv, acc);
          store_vecs(op + f * HoWo, rp ? rp + f * HoWo : nullptr, ooff, acc, nv, bp ? bp[f] : 0.f, relu);
        }
        if (g == 0 && !empty.empty()) {
          std::fill(acc, acc + nv * VL, 0.f);
          for (int64_t f : empty)
            store_vecs(op + f * HoWo, rp ? rp + f * HoWo : nullptr, ooff, acc, nv, bp ? bp[f] : 0.f, relu);
        }
      }
    });
    return out;
  }

  // Work split: the flat output range in chunks whose input windows (all channels and phases) stay in
  // L2 while every filter of a filter group sweeps them; jobs = chunks x filter groups (filters dealt to
  // the groups round-robin in the heaviest-first order, so the groups carry similar work).
  const int64_t l2_floats = 512 * 1024 / 4;
  int64_t chunk = std::max<int64_t>(BLOCK, l2_floats / std::max<int64_t>(1, C * S * S) / BLOCK * BLOCK);
  chunk = std::min<int64_t>({chunk, 2048, (total + VL - 1) / VL * VL});
  const int64_t nchunks = (total + chunk - 1) / chunk;
  const int64_t padded_total = nchunks * chunk;

  auto planes = phase_planes(x, S, pad, Hph, Wph, padded_total + slack);
  auto out = conv_output(N, F, Ho, Wo, x);
  const float* pl = planes.data_ptr<float>();
  const int32_t* ptr = tp.data_ptr<int32_t>();
  const float* wv = tw.data_ptr<float>();
  const int32_t* ord = fo.data_ptr<int32_t>();
  const Epilogue ep(bias, residual, out, "sparse_conv2d");
  const float* bp = ep.bp;
  const float* rp = ep.rp;
  float* op = out.data_ptr<float>();

  // filters without taps (all-zero weights) are absent from the lists: list index L stands for all of them
  const std::vector<int64_t> empty = empty_filters(ord, L, F);
  const int64_t lists = L + (empty.empty() ? 0 : 1);

  const WideStore store{op, rp, bp, relu, F, Ho, Wo, Hph, Wph, plane, total};
  const auto offs_p = tap_offsets(taps, E, group, Wph, S, cache);
  const int64_t* offs = offs_p->data();
  if (g_row_layout && Wo % VL == 0) {
    // Row layout (output widths a multiple of the vector): blocks of 8 vectors, each VL pixels of one output
    // row read from its own base, so no lane computes a padding column of the wide grid (13% of the lanes at
    // 32x32, 27% at 16x16, 56% at 8x8 with pad 1); chunks and filter groups as on the wide grid below.
    const int64_t WV = Wo / VL, nvec = N * Ho * WV, HoWo = Ho * Wo;
    std::vector<int64_t> vin, vout;
    row_tables(N, Ho, Wo, plane, Wph, F, 8, vin, vout);
    const int64_t chunkv = std::max<int64_t>(8, std::min<int64_t>(chunk / VL, (nvec + 7) / 8 * 8));
    const int64_t nch = (nvec + chunkv - 1) / chunkv;
    const int64_t ng = std::min<int64_t>(lists, std::max<int64_t>(1, (4 * nthreads + nch - 1) / nch));
    run_row_blocks(pl, offs, ptr, wv, ord, empty, L, vin, vout, nvec, chunkv, ng, op, rp, bp, relu, HoWo,
                   E * nvec * VL);
    return out;
  }
  const int64_t ngroups = std::min<int64_t>(lists, std::max<int64_t>(1, (4 * nthreads + nchunks - 1) / nchunks));
  // layers with little work run inline: waking the thread team costs more than it saves there
  const int64_t work = E * padded_total;  // multiply-adds computed
  const int64_t grain = work < g_parallel_threshold ? nchunks * ngroups : 1;
  nck::parallel_for(0, nchunks * ngroups, grain, [&](int64_t b, int64_t e) {
    alignas(64) float acc[BLOCK];
    for (int64_t job = b; job < e; ++job) {
      const int64_t g = job % ngroups, c0 = (job / ngroups) * chunk;
      const int64_t cn = std::min<int64_t>(chunk, padded_total - c0);
      // block-outer: the input windows of one block are reused by every filter of the group
      for (int64_t q0 = c0; q0 < c0 + cn; q0 += BLOCK) {
        const int64_t qn = std::min<int64_t>(BLOCK, c0 + cn - q0);
        for (int64_t i = g; i < lists; i += ngroups) {
          if (i < L) {
            const int64_t t0 = ptr[i], nt = ptr[i + 1] - t0;
            const int64_t* off = offs + t0;
            if (qn == BLOCK) {
              accumulate<8>(pl, off, wv + t0, nt, q0, acc);
            } else {
              int64_t vo[8];
              for (int64_t k = 0; k < 8; ++k) vo[k] = q0 + k * VL;
              accumulate_part(pl, vo, off, wv + t0, nt, (qn + VL - 1) / VL, acc);
            }
            store(acc, ord[i], q0, qn);
          } else {
            std::fill(acc, acc + qn, 0.f);
            for (int64_t f : empty) store(acc, f, q0, qn);
          }
        }
      }
    }
  });
  return out;
}


// ------------------------------------------------------------------------------------------------------------
// direct_conv2d: a dense conv (every tap, zeros included) as a register-blocked direct convolution. Eight
// (AVX2: four) output channels x 3 vectors of output pixels stay in registers while every input row k =
// (c, ky, kx) is loaded once per block and multiplied by the filters' broadcast weights: 3 loads + 8
// broadcasts per 24 multiply-adds (the tap-list kernel above needs one load per multiply-add, fine for 10% density but
// load-bound for dense layers). Vectorised over pixels, so narrow (channel-pruned) layers lose nothing to
// vector width. Rows are shifted windows of the phase planes (as sparse_conv2d) or, for small outputs where
// the wide grid wastes many lanes, rows of an im2col matrix. Bias, residual and ReLU are fused into the store.
// wpack: (ceil(F / 8), C * kh * kw, 8) fp32, filters zero-padded to a multiple of 8 (runtime/kernels.py:
// direct_pack). The reference twin is F.conv2d on the dense weight.
namespace {

constexpr int64_t FBLK = 8;   // output channels per packed weight block (the pack format)
// The register block, by ISA: AVX-512 (32 registers of 16 floats): all 8 filters x 3 vectors (24
// accumulators + 3 inputs + 1 weight). AVX2 (16 registers of 8 floats): 8 x 3 would spill most
// accumulators (measured on a Zen 3: ~10 GFLOP/s, 4-10x slower than oneDNN), so 4 filters x 3 vectors of 8
// (12 accumulators + 3 inputs + 1 weight = 16: 40-75 GFLOP/s), the packed block of 8 filters in two passes
// (4 x 3 beat 8 x 1 there).
#if defined(__AVX512F__)
constexpr int DFB = 8;       // filters held in registers
#else
constexpr int DFB = 4;
#endif
constexpr int DNV = 3;       // pixel vectors per register block

// The vector operations of the register blocks below (blockf, blockf_store): full-width vectors (vecf) or, with
// AVX-512, half-width ones (vech) for the banded row layout of outputs whose rows are a multiple of 8 but not of 16
// (8x8 maps; see sparse_conv2d's half-width rows)
template <typename V>
struct VOps;
template <>
struct VOps<vecf> {
  static constexpr int64_t n = VL;
  static inline __attribute__((always_inline)) vecf load(const float* p) { return loadu(p); }
  static inline __attribute__((always_inline)) void store(float* p, vecf v) { storeu(p, v); }
  static inline __attribute__((always_inline)) vecf set1(float w) { return bcast(w); }
  static inline __attribute__((always_inline)) vecf max0(vecf a) { return nck::vmax0(a); }
};
#if defined(__AVX512F__)
template <>
struct VOps<vech> {
  static constexpr int64_t n = HVL;
  static inline __attribute__((always_inline)) vech load(const float* p) { return loadh(p); }
  static inline __attribute__((always_inline)) void store(float* p, vech v) { storeh(p, v); }
  static inline __attribute__((always_inline)) vech set1(float w) { return bcasth(w); }
  static inline __attribute__((always_inline)) vech max0(vech a) { return vmax0h(a); }
};
#endif

// The register block's accumulation (blockf, blockf_store)
template <typename V, int FB, int NV>
static inline __attribute__((always_inline)) void blockf_loop(const float* __restrict base,
                                                              const int64_t* __restrict voff,
                                                              const int64_t* __restrict off,
                                                              const float* __restrict wp, int64_t K,
                                                              V (&a)[FB][NV]) {
  using O = VOps<V>;
  const float* src[NV];
#pragma GCC unroll 4
  for (int i = 0; i < NV; ++i) src[i] = base + voff[i];
#pragma GCC unroll 16
  for (int j = 0; j < FB; ++j)
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) a[j][i] = O::set1(0.f);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t o = off[k];
    const float* w = wp + FBLK * k;
    V v[NV];
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) v[i] = O::load(src[i] + o);
#pragma GCC unroll 16
    for (int j = 0; j < FB; ++j) {
      const V wj = O::set1(w[j]);
#pragma GCC unroll 4
      for (int i = 0; i < NV; ++i) a[j][i] += wj * v[i];
    }
  }
}

// acc[j * ldacc + i * n ..] = a[j][i] of blockf_loop (n: the vector's floats), the sum over the K rows of
// wp[k * FBLK + j] * base[voff[i] + off[k] ..] for the FB filters j of the packed block at wp and the NV vectors i.
// Vector i reads from its own base: in the "row" layout every vector is n pixels of one output row (outputs whose
// width is a multiple of n), so no lane computes a padding column of the wide grid (13% of the lanes at 32x32, 27%
// at 16x16, 56% at 8x8 with pad 1). Half-width vectors hold 8 filters x NV vectors of ymm accumulators.
template <typename V, int FB, int NV>
static inline void blockf(const float* __restrict base, const int64_t* __restrict voff, const int64_t* __restrict off,
                          const float* __restrict wp, int64_t K, float* __restrict acc, int64_t ldacc) {
  V a[FB][NV];
  blockf_loop<V, FB, NV>(base, voff, off, wp, K, a);
#pragma GCC unroll 16
  for (int j = 0; j < FB; ++j)
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) VOps<V>::store(acc + j * ldacc + i * VOps<V>::n, a[j][i]);
}

// blockf with the epilogue from the registers (the row layout, g_fused_store): the block's first nf <= FB filters,
// output channels f0 + j, get bias bp[j] (+ the residual at rp) and ReLU, stored to op + (f0 + j) * HoWo + ooff[i]
template <typename V, int FB, int NV>
static inline void blockf_store(const float* __restrict base, const int64_t* __restrict voff,
                                const int64_t* __restrict off, const float* __restrict wp, int64_t K,
                                float* __restrict op, const float* __restrict rp, const int64_t* __restrict ooff,
                                const float* __restrict bp, int64_t f0, int64_t HoWo, int64_t nf, bool relu) {
  using O = VOps<V>;
  V a[FB][NV];
  blockf_loop<V, FB, NV>(base, voff, off, wp, K, a);
#pragma GCC unroll 16
  for (int j = 0; j < FB; ++j) {
    if (j >= nf) break;
    const V b = O::set1(bp ? bp[j] : 0.f);
    float* o = op + (f0 + j) * HoWo;
    const float* r = rp ? rp + (f0 + j) * HoWo : nullptr;
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) {
      V t = a[j][i] + b;
      if (r) t += O::load(r + ooff[i]);
      if (relu) t = O::max0(t);
      O::store(o + ooff[i], t);
    }
  }
}

#if defined(__AVX512F__)
// store_vecs for half-width vectors
static inline void store_vecs_h(float* __restrict op, const float* __restrict rp, const int64_t* __restrict ooff,
                                const float* __restrict acc, int64_t nv, float bias, bool relu) {
  const vech b = bcasth(bias);
  for (int64_t k = 0; k < nv; ++k) {
    const int64_t o = ooff[k];
    vech a = loadh(acc + k * HVL) + b;
    if (rp) a += loadh(rp + o);
    if (relu) a = vmax0h(a);
    storeh(op + o, a);
  }
}
#endif

// Stores one filter's outputs for positions [q0, q0 + qn) of the compact output order q = n * Ho * Wo + r.
struct CompactStore {
  float* op;
  const float* rp;
  const float* bp;
  bool relu;
  int64_t F, HW, total;
  void operator()(const float* acc, int64_t f, int64_t q0, int64_t qn) const {
    const float bv = bp ? bp[f] : 0.f;
    const int64_t qe = std::min<int64_t>(q0 + qn, total);
    for (int64_t q = q0; q < qe;) {
      const int64_t n = q / HW, r = q % HW, seg = std::min<int64_t>(HW - r, qe - q);
      float* o = op + (n * F + f) * HW + r;
      const float* rr = rp ? rp + (n * F + f) * HW + r : nullptr;
      if (relu)
        store_row<true>(o, acc + (q - q0), rr, bv, seg);
      else
        store_row<false>(o, acc + (q - q0), rr, bv, seg);
      q += seg;
    }
  }
};

}  // namespace

// The banded split of direct_conv2d: nb bands of rows (each thread all filter blocks of its rows) or one band whose
// filter blocks are dealt over the threads. Chosen by the register blocks the busiest thread runs (bands are cut
// per image into segments of ceil(rows * vpr / DNV) blocks; a filter group runs ceil(FB / ng) filter blocks):
// 24 filters (3 blocks of 8) over 2 threads split by filters left one thread 2 blocks and the other 1, a third
// of a layer idle (channel-pruned ResNet-56, 24-wide 16x16 layers: 1.35x from 1 to 2 threads). Ties keep the
// measured rule: filters for small outputs (under 4 register blocks of vectors per thread), rows otherwise.
bool g_direct_balanced_split = true;

static int64_t direct_bands(int64_t N, int64_t Ho, int64_t vpr, int64_t FB, int64_t nt, int64_t dnv) {
  const int64_t R = N * Ho, nb_rows = std::min<int64_t>(R, nt);
  const int64_t old_rule = (R * vpr) / nt >= 4 * dnv || FB < nt ? nb_rows : 1;
  if (!g_direct_balanced_split || nt <= 1) return old_rule;
  auto cost = [&](int64_t nb) {
    const int64_t ng = std::max<int64_t>(1, nt / nb);
    int64_t worst = 0;
    for (int64_t b = 0; b < nb; ++b) {
      int64_t blocks = 0;
      for (int64_t r = b * R / nb, r1 = (b + 1) * R / nb; r < r1;) {
        const int64_t y1 = std::min<int64_t>(Ho, r % Ho + (r1 - r)), rows = y1 - r % Ho;
        blocks += (rows * vpr + dnv - 1) / dnv;
        r += rows;
      }
      worst = std::max(worst, blocks);
    }
    return worst * ((FB + ng - 1) / ng);
  };
  const int64_t cr = cost(nb_rows), cf = cost(1);
  return cr < cf ? nb_rows : cf < cr ? 1 : old_rule;
}

int64_t direct_split(int64_t N, int64_t Ho, int64_t vpr, int64_t FB, int64_t nt) {
  return direct_bands(N, Ho, vpr, FB, nt, DNV);
}

// The offsets of the K = C * kh * kw input rows of a banded conv in its band planes (channel c's S x S phase
// planes of bplane floats each): the kh * kw tap offsets once, then one add per row (the divisions by S per row,
// on one thread while the other waited, were ~1% of a batch-1 plan)
static std::vector<int64_t> band_offsets(int64_t C, int64_t kh, int64_t kw, int64_t S, int64_t bplane, int64_t Wph) {
  const int64_t T = kh * kw;
  std::vector<int64_t> off(C * T);
  for (int64_t ky = 0; ky < kh; ++ky)
    for (int64_t kx = 0; kx < kw; ++kx)
      off[ky * kw + kx] = ((ky % S) * S + kx % S) * bplane + (ky / S) * Wph + (kx / S);
  for (int64_t c = 1; c < C; ++c)
    for (int64_t t = 0; t < T; ++t) off[c * T + t] = off[t] + c * S * S * bplane;
  return off;
}

// band_offsets through a plan step's cache (a conv's prelude runs on one thread while the others wait: computing
// and allocating the offsets, with the band split, took ~0.4 us of each conv's ~1.1 us prelude at batch 1, timed by
// the cycle counter in a ResNet-56 plan on this Zen 4 VM)
static std::shared_ptr<const std::vector<int64_t>> cached_band_offsets(int64_t C, int64_t kh, int64_t kw, int64_t S,
                                                                       int64_t bplane, int64_t Wph,
                                                                       TapOffCache* cache) {
  const int64_t key[4] = {C, S, bplane, Wph};
  if (cache && g_lean_steps) {
    std::lock_guard<std::mutex> lock(cache->m);
    if (cache->doffs && std::equal(key, key + 4, cache->dkey)) return cache->doffs;
  }
  auto o = std::make_shared<const std::vector<int64_t>>(band_offsets(C, kh, kw, S, bplane, Wph));
  if (cache && g_lean_steps) {
    std::lock_guard<std::mutex> lock(cache->m);
    std::copy(key, key + 4, cache->dkey);
    cache->doffs = o;
  }
  return o;
}

int64_t g_direct_im2col_max = (int64_t)1 << 17;  // floats of im2col matrix the direct conv may build (512 KiB)

torch::Tensor direct_conv2d(torch::Tensor x, torch::Tensor wpack, c10::optional<torch::Tensor> bias,
                            c10::optional<torch::Tensor> residual, int64_t out_channels, int64_t kh, int64_t kw,
                            int64_t stride, int64_t pad, bool relu, TapOffCache* cache) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32, "direct_conv2d: x must be (N, C, H, W) float32");
  TORCH_CHECK(stride >= 1 && pad >= 0 && kh >= 1 && kw >= 1, "direct_conv2d: bad geometry");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), S = stride, F = out_channels;
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad, T = kh * kw, K = C * T;
  TORCH_CHECK(Hp >= kh && Wp >= kw, "direct_conv2d: input smaller than the kernel");
  const int64_t FB = (F + FBLK - 1) / FBLK;
  TORCH_CHECK(wpack.scalar_type() == torch::kFloat32 && wpack.dim() == 3 && wpack.size(0) == FB &&
                  wpack.size(1) == K && wpack.size(2) == FBLK,
              "direct_conv2d: packed weight must be (ceil(F/8), C*kh*kw, 8) float32 for this input");
  auto wp_t = wpack.contiguous();
  const int64_t Ho = (Hp - kh) / S + 1, Wo = (Wp - kw) / S + 1;
  const int64_t Hph = (Hp + S - 1) / S, Wph = (Wp + S - 1) / S, plane = Hph * Wph;
  const int64_t P = N * Ho * Wo, BLKPX = DNV * VL;

  auto out = conv_output(N, F, Ho, Wo, x);
  const Epilogue ep(bias, residual, out, "direct_conv2d");
  const float* bp = ep.bp;
  const float* rp = ep.rp;
  float* op = out.data_ptr<float>();

  const int64_t Pp = (P + BLKPX - 1) / BLKPX * BLKPX;
  // rows (outputs whose width is a multiple of the vector: every lane a real output) before the wide grid
  const bool row_mode = g_row_layout && Wo % VL == 0;
  const int64_t nthreads = std::max<int64_t>(1, nck::num_threads());
  const int64_t WV = Wo / VL;  // row mode: vectors per output row
#if defined(__AVX512F__)
  if (g_half_rows && g_row_layout && g_banded && !row_mode && Wo % HVL == 0) {
    // 8x8-style outputs in half-width row vectors (banded, as below; 8 filters x 3 ymm vectors in registers)
    const int64_t R = N * Ho, WVH = Wo / HVL, BLKH = DNV * HVL;
    const int64_t work = K * FB * FBLK * N * Ho * Wo;
    const int64_t nt = work < g_parallel_threshold ? 1 : std::min<int64_t>(std::max<int64_t>(R, FB), nthreads);
    const Bands bands(N, C, H, W, S, pad, kh, Ho, Wo, Wph, F, nt, direct_bands(N, Ho, WVH, FB, nt, DNV), HVL);
    const int64_t bplane = bands.bplane;
    const auto offs = cached_band_offsets(C, kh, kw, S, bplane, Wph, cache);
    const std::vector<int64_t>& off = *offs;
    const float* wpk = wp_t.data_ptr<float>();
    const int64_t ng = bands.ng;
    bands.run(x.data_ptr<float>(), [&](int64_t g, const float* pl, const int64_t* vin, const int64_t* vout,
                                       int64_t nvec) {
      alignas(64) float acc[FBLK * DNV * HVL];
      for (int64_t fb = g * FB / ng; fb < (g + 1) * FB / ng; ++fb) {
        const float* wp = wpk + fb * K * FBLK;
        const int64_t nf = std::min<int64_t>(FBLK, F - fb * FBLK);
        for (int64_t v0 = 0; v0 < nvec; v0 += DNV) {
          const int64_t nv = std::min<int64_t>(DNV, nvec - v0);
          if (g_fused_store) {
            const int64_t f0 = fb * FBLK, HW = Ho * Wo, *vi = vin + v0, *vo = vout + v0, *of = off.data();
            const float* bb = bp ? bp + f0 : nullptr;
            switch (nv) {
              case 3: blockf_store<vech, FBLK, 3>(pl, vi, of, wp, K, op, rp, vo, bb, f0, HW, nf, relu); break;
              case 2: blockf_store<vech, FBLK, 2>(pl, vi, of, wp, K, op, rp, vo, bb, f0, HW, nf, relu); break;
              default: blockf_store<vech, FBLK, 1>(pl, vi, of, wp, K, op, rp, vo, bb, f0, HW, nf, relu); break;
            }
            continue;
          }
          switch (nv) {
            case 3: blockf<vech, FBLK, 3>(pl, vin + v0, off.data(), wp, K, acc, BLKH); break;
            case 2: blockf<vech, FBLK, 2>(pl, vin + v0, off.data(), wp, K, acc, BLKH); break;
            default: blockf<vech, FBLK, 1>(pl, vin + v0, off.data(), wp, K, acc, BLKH); break;
          }
          for (int64_t j = 0; j < nf; ++j) {
            const int64_t f = fb * FBLK + j, fo = f * Ho * Wo;
            store_vecs_h(op + fo, rp ? rp + fo : nullptr, vout + v0, acc + j * BLKH, nv, bp ? bp[f] : 0.f, relu);
          }
        }
      }
    });
    return out;
  }
#endif
  if (row_mode && g_banded) {
    // Banded: each thread takes a contiguous range of output rows (all filters; at batch 1 a band of the image,
    // at large batches whole images) and builds the padded phase planes of just its rows (+ halo) in a buffer of
    // its own, so no step runs on one thread while the other waits, and the rows it reads are mostly the ones it
    // wrote in the previous layer (in its own cache). The shared-planes path below copies the whole input on one
    // thread at small batches, then all threads read all of it (measured 1.0-1.5x slower per layer at batch 1,
    // 1.07-1.2x over whole ResNet-56 plans at batch 64).
    const int64_t R = N * Ho;
    const int64_t work = K * FB * FBLK * N * Ho * Wo;
    // Small outputs (8x8 at batch 1: under a dozen vectors per thread) split the filter blocks instead (3-vector
    // register blocks, no halo rows; measured faster there) where that balances as well (direct_bands): every
    // thread builds the whole padded input (in parallel, a few KiB) and runs its share of the filter blocks.
    const int64_t nt = work < g_parallel_threshold ? 1 : std::min<int64_t>(std::max<int64_t>(R, FB), nthreads);
    const Bands bands(N, C, H, W, S, pad, kh, Ho, Wo, Wph, F, nt, direct_bands(N, Ho, WV, FB, nt, DNV));
    const int64_t bplane = bands.bplane, ng = bands.ng;
    const auto offs = cached_band_offsets(C, kh, kw, S, bplane, Wph, cache);
    const std::vector<int64_t>& off = *offs;
    const float* wpk = wp_t.data_ptr<float>();
    bands.run(x.data_ptr<float>(), [&](int64_t g, const float* pl, const int64_t* vin, const int64_t* vout,
                                       int64_t nvec) {
      alignas(64) float acc[FBLK * DNV * VL];
      for (int64_t fb = g * FB / ng; fb < (g + 1) * FB / ng; ++fb) {
        const float* wp = wpk + fb * K * FBLK;
        const int64_t nf = std::min<int64_t>(FBLK, F - fb * FBLK);
        for (int64_t v0 = 0; v0 < nvec; v0 += DNV) {
          const int64_t nv = std::min<int64_t>(DNV, nvec - v0);
          if (g_fused_store) {
            const int64_t HW = Ho * Wo, *vi = vin + v0, *vo = vout + v0, *of = off.data();
            for (int64_t h = 0; h < nf; h += DFB) {  // (AVX2: two passes of 4 filters)
              const int64_t f0 = fb * FBLK + h, nh = std::min<int64_t>(DFB, nf - h);
              const float* bb = bp ? bp + f0 : nullptr;
              switch (nv) {
                case 3: blockf_store<vecf, DFB, 3>(pl, vi, of, wp + h, K, op, rp, vo, bb, f0, HW, nh, relu); break;
                case 2: blockf_store<vecf, DFB, 2>(pl, vi, of, wp + h, K, op, rp, vo, bb, f0, HW, nh, relu); break;
                default: blockf_store<vecf, DFB, 1>(pl, vi, of, wp + h, K, op, rp, vo, bb, f0, HW, nh, relu); break;
              }
            }
            continue;
          }
          for (int64_t h = 0; h < nf; h += DFB) {
            float* ah = acc + h * BLKPX;
            switch (nv) {
              case 3: blockf<vecf, DFB, 3>(pl, vin + v0, off.data(), wp + h, K, ah, BLKPX); break;
              case 2: blockf<vecf, DFB, 2>(pl, vin + v0, off.data(), wp + h, K, ah, BLKPX); break;
              default: blockf<vecf, DFB, 1>(pl, vin + v0, off.data(), wp + h, K, ah, BLKPX); break;
            }
          }
          for (int64_t j = 0; j < nf; ++j) {
            const int64_t f = fb * FBLK + j, fo = f * Ho * Wo;
            store_vecs(op + fo, rp ? rp + fo : nullptr, vout + v0, acc + j * BLKPX, nv, bp ? bp[f] : 0.f, relu);
          }
        }
      }
    });
    return out;
  }
  // im2col only where the wide grid wastes over a third of the lanes (measured: building the matrix costs
  // more than a quarter's waste at 16x16); g_direct_im2col_max < 0 forces it (tests)
  const bool use_cols =
      !row_mode && (g_direct_im2col_max < 0 || (2 * N * plane > 3 * P && K * Pp <= g_direct_im2col_max));
  torch::Tensor rows;
  std::vector<int64_t> off(K);
  int64_t total;
  if (use_cols) {
    rows = im2col_rows(x, kh, kw, S, pad, Ho, Wo, Pp);
    for (int64_t k = 0; k < K; ++k) off[k] = k * Pp;
    total = P;
  } else {
    total = N * plane;
    const int64_t group = N * plane, padded = (total + BLKPX - 1) / BLKPX * BLKPX;
    rows = phase_planes(x, S, pad, Hph, Wph, padded + Wph * (kh / S + 1) + kw + BLKPX);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t ky = 0; ky < kh; ++ky)
        for (int64_t kx = 0; kx < kw; ++kx)
          off[(c * kh + ky) * kw + kx] =
              c * S * S * group + ((ky % S) * S + kx % S) * group + (ky / S) * Wph + (kx / S);
  }
  const float* base = rows.data_ptr<float>();
  const float* wpk = wp_t.data_ptr<float>();
  const WideStore wide{op, rp, bp, relu, F, Ho, Wo, Hph, Wph, plane, total};
  const CompactStore compact{op, rp, bp, relu, F, Ho * Wo, total};

  // jobs: chunks of pixel blocks whose input rows stay in L2 while the filter blocks sweep them
  const int64_t nvec = N * Ho * WV;  // row mode: vectors of output rows
  std::vector<int64_t> vin, vout;
  if (row_mode) row_tables(N, Ho, Wo, plane, Wph, F, DNV, vin, vout);
  const int64_t nblocks = row_mode ? (nvec + DNV - 1) / DNV : (total + BLKPX - 1) / BLKPX;
  // Chunks of pixel blocks whose input rows stay in L2 while the filter blocks sweep them; the work units
  // (chunk, filter block, pixel block), chunk-major, are split over the threads in equal contiguous ranges of
  // whole blocks. At batch 1 a layer has only a few dozen blocks: whole jobs (chunk x filter block) over two
  // threads left one idle for up to a fifth of the layer (an 8-filter 32x32 layer once split 37 / 12 blocks).
  const int64_t max_per_chunk = std::max<int64_t>(1, std::min<int64_t>(nblocks, ((int64_t)1 << 16) / (K * BLKPX)));
  const int64_t nchunks = (nblocks + max_per_chunk - 1) / max_per_chunk;
  const int64_t units = nblocks * FB;
  const int64_t work = K * FB * FBLK * nblocks * BLKPX;
  const int64_t ntasks = work < g_parallel_threshold ? 1 : std::min<int64_t>(units, nthreads);
  auto run_block = [&](float* acc, int64_t fb, int64_t blk) {
    const float* wp = wpk + fb * K * FBLK;
    const int64_t nf = std::min<int64_t>(FBLK, F - fb * FBLK);
    // the block's NV vectors: output-row vectors (row layout) or contiguous from q0 (wide grid / im2col)
    int64_t nv, q0 = 0, qn = 0;
    const float* src = base;
    const int64_t* voff = kContiguous;
    if (row_mode) {
      nv = std::min<int64_t>(DNV, nvec - blk * DNV);
      voff = vin.data() + blk * DNV;
    } else {
      q0 = blk * BLKPX;
      qn = std::min<int64_t>(BLKPX, total - q0);
      nv = (qn + VL - 1) / VL;
      src = base + q0;
    }
    for (int64_t h = 0; h < nf; h += DFB) {  // AVX2: the second half only when it holds real filters
      float* ah = acc + h * BLKPX;
      switch (nv) {
        case 3: blockf<vecf, DFB, 3>(src, voff, off.data(), wp + h, K, ah, BLKPX); break;
        case 2: blockf<vecf, DFB, 2>(src, voff, off.data(), wp + h, K, ah, BLKPX); break;
        default: blockf<vecf, DFB, 1>(src, voff, off.data(), wp + h, K, ah, BLKPX); break;
      }
    }
    if (row_mode) {
      for (int64_t j = 0; j < nf; ++j) {
        const int64_t f = fb * FBLK + j, fo = f * Ho * Wo;
        store_vecs(op + fo, rp ? rp + fo : nullptr, vout.data() + blk * DNV, acc + j * BLKPX, nv, bp ? bp[f] : 0.f,
                   relu);
      }
    } else if (use_cols) {
      for (int64_t j = 0; j < nf; ++j) compact(acc + j * BLKPX, fb * FBLK + j, q0, qn);
    } else {
      wide.block(acc, BLKPX, fb * FBLK, nf, q0, qn);
    }
  };
  nck::parallel_for(0, ntasks, 1, [&](int64_t tb, int64_t te) {
    alignas(64) float acc[FBLK * DNV * VL];
    const int64_t u0 = tb * units / ntasks, u1 = te * units / ntasks;
    for (int64_t c = 0; c < nchunks; ++c) {  // chunk c: blocks [cs, ce), units [FB * cs, FB * ce)
      const int64_t cs = c * nblocks / nchunks, ce = (c + 1) * nblocks / nchunks, len = ce - cs;
      if (FB * ce <= u0) continue;
      if (FB * cs >= u1) break;
      for (int64_t fb = 0; fb < FB; ++fb) {
        const int64_t ub = FB * cs + fb * len;  // unit of (fb, cs)
        const int64_t b0 = std::max<int64_t>(ub, u0) - ub, b1 = std::min<int64_t>(ub + len, u1) - ub;
        for (int64_t i = b0; i < b1; ++i) run_block(acc, fb, cs + i);
      }
    }
  });
  return out;
}
