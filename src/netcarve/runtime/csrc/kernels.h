// netcarve native kernels: declarations shared by the kernel and executor sources.
#pragma once
#include <torch/extension.h>

#include <sched.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <immintrin.h>

// One vector register of floats (GCC vector extensions): 16 with AVX-512 (32 registers), 8 otherwise (AVX2:
// 16 registers of 8). Register blocks are sized in these; a 16-float vector on AVX2 would be a register pair
// and the blocks would spill (measured on a Zen 3: the dense direct conv at ~10 GFLOP/s instead of 40-75).
namespace nck {
#if defined(__AVX512F__)
constexpr int64_t VL = 16;
#else
constexpr int64_t VL = 8;
#endif
typedef float vecf __attribute__((vector_size(VL * 4)));
typedef float vecfu __attribute__((vector_size(VL * 4), aligned(4)));
static inline vecf loadu(const float* p) { return *reinterpret_cast<const vecfu*>(p); }
static inline void storeu(float* p, vecf v) { *reinterpret_cast<vecfu*>(p) = v; }
// A broadcast through the intrinsic: one vbroadcastss from memory. Built element by element, GCC 12 emitted a
// 128-bit broadcast plus a vinsertf128 (a shuffle-port uop per broadcast), which held the dense direct conv's
// inner loop (4 broadcasts per 12 FMAs) to ~60 of ~90 GFLOP/s on one Zen 3 core (measured standalone).
static inline vecf bcast(float w) {
#if defined(__AVX512F__)
  return (vecf)_mm512_set1_ps(w);
#elif defined(__AVX__)
  return (vecf)_mm256_set1_ps(w);
#else
  vecf v;
  for (int64_t i = 0; i < VL; ++i) v[i] = w;
  return v;
#endif
}
static inline vecf vmax0(vecf a) {
#if defined(__AVX512F__)
  return (vecf)_mm512_max_ps((__m512)a, _mm512_setzero_ps());
#elif defined(__AVX__)
  return (vecf)_mm256_max_ps((__m256)a, _mm256_setzero_ps());
#else
  for (int64_t i = 0; i < VL; ++i) a[i] = a[i] > 0.f ? a[i] : 0.f;
  return a;
#endif
}

// The column phases of a zero-padded row split by stride S: the input columns x with (x + pad) % S == rx go to
// phase rx, the first of them x0[rx], landing at column dx[rx] = (x0 + pad) / S of that phase. Computed once per
// call: integer divisions by a runtime S in the per-row loops cost ~20 cycles each, and with four of them per row
// and phase they were most of a stride-2 layer's time (a ResNet-56 8x8 stride-2 sparse conv at batch 1 in a plan
// on an Emerald Rapids VM: 30 us, 8 us without the copy).
struct PhaseCols {
  std::vector<int64_t> x0, dx;
  PhaseCols(int64_t S, int64_t pad) : x0(S), dx(S) {
    for (int64_t rx = 0; rx < S; ++rx) {
      x0[rx] = ((rx - pad) % S + S) % S;
      dx[rx] = (x0[rx] + pad) / S;
    }
  }
};

#if defined(__AVX512F__)
// d[0 .. n) = src[x0], src[x0 + 2], ... (n = (W - x0 + 1) / 2: every other float of a row of W, from column x0),
// 32 floats loaded at a time (masked to the row: nothing past it is read) and the 16 even ones permuted out; the
// earlier stride-2 copy of the banded conv paths, one phase at a time (set_phase_split(false))
inline void every_other(const float* __restrict src, int64_t W, int64_t x0, float* __restrict d) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const int64_t n = (W - x0 + 1) / 2;
  for (int64_t t = 0; t < n; t += 16) {
    const int64_t xs = x0 + 2 * t, left = W - xs;  // source floats left in the row (>= 1)
    const __mmask16 lo = (__mmask16)(left >= 16 ? 0xFFFF : (1u << left) - 1);
    const __mmask16 hi = (__mmask16)(left >= 32 ? 0xFFFF : left <= 16 ? 0 : (1u << (left - 16)) - 1);
    const __m512 v = _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(lo, src + xs), even,
                                            _mm512_maskz_loadu_ps(hi, src + xs + 16));
    const int64_t m = n - t < 16 ? n - t : 16;
    _mm512_mask_storeu_ps(d + t, (__mmask16)(m >= 16 ? 0xFFFF : (1u << m) - 1), v);
  }
}

// A row of W floats split by stride 2: its even columns (0, 2, ...) to ev[0 .. (W + 1) / 2), its odd ones to
// od[0 .. W / 2). Both phases from the same loads: 32 floats at a time (masked to the row: nothing past it is read),
// permuted into 16 even and 16 odd ones; rows of at most 16 from one load and one permute. The stride-2 column phases
// of the banded conv paths and of the depthwise kernel. (Each phase gathered on its own, with 2 masked loads and a
// permute per phase and 16 floats, the copy of a 16-wide 32-channel input took 2x as long in a plan on an Emerald
// Rapids VM as a scalar loop.)
inline void split_even_odd(const float* __restrict src, int64_t W, float* __restrict ev, float* __restrict od) {
  if (W <= 16) {
    const __m512i idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m512 v = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps((__mmask16)((1u << W) - 1), src));
    const int64_t ne = (W + 1) / 2, no = W / 2;
    _mm256_mask_storeu_ps(ev, (__mmask8)((1u << ne) - 1), _mm512_castps512_ps256(v));
    _mm256_mask_storeu_ps(od, (__mmask8)((1u << no) - 1), _mm512_extractf32x8_ps(v, 1));
    return;
  }
  const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t t = 0; t < W; t += 32) {
    const int64_t left = W - t;  // source floats left in the row (>= 1)
    const __mmask16 lo = (__mmask16)(left >= 16 ? 0xFFFF : (1u << left) - 1);
    const __mmask16 hi = (__mmask16)(left >= 32 ? 0xFFFF : left <= 16 ? 0 : (1u << (left - 16)) - 1);
    const __m512 a = _mm512_maskz_loadu_ps(lo, src + t);
    const __m512 b = hi ? _mm512_maskz_loadu_ps(hi, src + t + 16) : _mm512_setzero_ps();
    const int64_t ne = std::min<int64_t>(16, (left + 1) / 2), no = std::min<int64_t>(16, left / 2);
    _mm512_mask_storeu_ps(ev + t / 2, (__mmask16)(ne >= 16 ? 0xFFFF : (1u << ne) - 1), _mm512_permutex2var_ps(a, ie, b));
    if (no > 0)
      _mm512_mask_storeu_ps(od + t / 2, (__mmask16)(no >= 16 ? 0xFFFF : (1u << no) - 1),
                            _mm512_permutex2var_ps(a, io, b));
  }
}
#endif

// A plan's thread team: a run of plan steps executes inside one OpenMP parallel region of torch's own pool
// (plan.cpp), the calling thread running the steps and the others waiting for the steps' parallel loops, handed
// over through two atomics (about 0.07 us a loop on this 2-core VM) instead of a fork and join of the OpenMP team
// per loop (0.6 us measured; a channel-pruned ResNet-56 at batch 1 runs ~60 loops in ~0.7 ms). The loops split
// their range exactly as at::parallel_for does, so results do not depend on the mode.
struct Team {
  int64_t nt = 1;                                 // threads, the calling one included
  alignas(64) std::atomic<int64_t> seq{0};        // the current loop's number (workers wait for a new one); -1: done
  // the current loop's claims: its number (bits 32-63), chunks (bits 16-31) and next unclaimed chunk (bits 0-15), in
  // one word, so that a claim (a compare-exchange) is of one loop, whose fields were written before the word
  alignas(64) std::atomic<uint64_t> claims{0};
  alignas(64) std::atomic<int64_t> done{0};       // the current loop's chunks finished
  alignas(64) void (*fn)(const void*, int64_t, int64_t) = nullptr;  // the loop: fn(ctx, begin, end)
  const void* ctx = nullptr;
  int64_t begin = 0, end = 0, chunk = 0, ntasks = 0;
  std::exception_ptr err;  // a worker's exception (the first), rethrown on the calling thread
  std::atomic<bool> failed{false};

  // Waiting spins, then yields the core after kSpin pauses (~7 us on this Zen 4 at 27 ns a pause: more than the usual
  // gap between two loops of a plan): with more busy threads than cores (two plans called at once, other processes),
  // a thread spinning on a descheduled partner holds the core that partner needs. 2048 pauses (~55 us) left two
  // concurrent callers of a dense ResNet-56 plan 0.79x as fast as with a fork / join per loop; 256: 0.94-1.03x.
  static constexpr int kSpin = 256;
  static inline void pause_or_yield(int& spins) {
    if (++spins < kSpin) {
      _mm_pause();
    } else {
      sched_yield();
    }
  }
  // Chunks are claimed, not assigned: the calling thread runs chunk 0, then claims every chunk no worker has taken
  // yet, so it only ever waits for chunks a worker is running. A worker the OS has descheduled (other processes on
  // the cores: beside a niced training job, plans at batch 1 ran at times 2-80x slower when each thread had its own
  // chunk) costs at most its current chunk, not every loop it misses. The chunks are at::parallel_for's, so results
  // do not depend on which thread runs one.
  // claim the current loop's next chunk: its index, or -1 when none is left
  int64_t claim() {
    uint64_t c = claims.load(std::memory_order_acquire);
    while ((c & 0xFFFF) < ((c >> 16) & 0xFFFF))
      if (claims.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire))
        return (int64_t)(c & 0xFFFF);
    return -1;
  }
  void run_chunk(int64_t k) {
    const int64_t b = begin + k * chunk;
    if (b < end) {
      try {
        fn(ctx, b, std::min(end, b + chunk));
      } catch (...) {
        if (!failed.exchange(true)) err = std::current_exception();
      }
    }
    done.fetch_add(1, std::memory_order_acq_rel);
  }
  // the workers' loop: run chunks of every posted loop until the run ends
  void work() {
    int64_t seen = 0;
    for (;;) {
      int64_t s;
      int spins = 0;
      while ((s = seq.load(std::memory_order_acquire)) == seen) pause_or_yield(spins);
      if (s < 0) return;
      seen = s;
      // (a late worker may claim from a newer loop than s: it then runs that loop's chunk)
      for (int64_t k; (k = claim()) >= 0;) run_chunk(k);
    }
  }
  // ends the workers' loop (the calling thread, once)
  void release() { seq.store(-1, std::memory_order_release); }

  // at::parallel_for's split (ATen/ParallelOpenMP.h): min(nt, ceil(n / grain)) chunks of ceil(n / tasks)
  template <class F>
  void parallel_for(int64_t b, int64_t e, int64_t grain, const F& f) {
    const int64_t n = e - b;
    const int64_t tasks = grain > 0 ? std::min<int64_t>(nt, (n + grain - 1) / grain) : nt;
    if (n <= grain || n <= 1 || tasks <= 1) {
      f(b, e);
      return;
    }
    fn = [](const void* c, int64_t x, int64_t y) { (*static_cast<const F*>(c))(x, y); };
    ctx = &f;
    begin = b;
    end = e;
    ntasks = tasks;
    chunk = (n + tasks - 1) / tasks;
    done.store(0, std::memory_order_relaxed);
    const int64_t loop = seq.load(std::memory_order_relaxed) + 1;
    claims.store(((uint64_t)loop << 32) | ((uint64_t)tasks << 16) | 1u, std::memory_order_release);  // (0: ours)
    seq.store(loop, std::memory_order_release);
    run_chunk(0);
    for (int64_t k; (k = claim()) >= 0;) run_chunk(k);
    // (f lives on this stack: wait for every claimed chunk before leaving)
    int spins = 0;
    while (done.load(std::memory_order_acquire) < ntasks) pause_or_yield(spins);
    if (failed.load(std::memory_order_acquire)) {
      std::exception_ptr e2 = err;
      err = nullptr;
      failed.store(false);
      std::rethrow_exception(e2);
    }
  }
};
// The team of the plan run on this thread (set on the calling thread inside a team region; null elsewhere)
extern thread_local Team* t_team;

// at::parallel_for, through the plan's team when called on its calling thread inside a team region
template <class F>
inline void parallel_for(int64_t b, int64_t e, int64_t grain, const F& f) {
  if (b >= e) return;
  if (Team* t = t_team) {
    t->parallel_for(b, e, grain, f);
    return;
  }
  at::parallel_for(b, e, grain, f);
}
// at::get_num_threads(), or the team's size inside a team region
inline int64_t num_threads() { return t_team ? t_team->nt : at::get_num_threads(); }
}  // namespace nck

// Work (multiply-adds) below which a kernel runs on the calling thread instead of waking torch's thread team.
// Waking a sleeping OpenMP team costs tens of microseconds on small VMs; with OMP_WAIT_POLICY=ACTIVE (threads
// spin, as onnxruntime's do by default) a lower threshold pays off. Set with set_parallel_threshold().
extern int64_t g_parallel_threshold;
// Outputs of at most 16 x this many floats (N * Ho * Wo, at most 256) take the im2col path of sparse_conv2d.
extern int64_t g_small_max_vectors;

// A plan step's cache of its taps' input offsets for one geometry of the (banded) phase planes: computing them
// is serial work proportional to the taps, repeated on every call otherwise. Owned by the step (its taps never
// change); safe for concurrent runs (a call that finds another geometry computes and swaps in its own).
// The small-output path's taps regrouped by im2col row (input channel x kernel position) for the filter groups of
// one thread count: per group, for each row, the (filter - first filter of the group, weight) pairs.
struct RowTaps {
  int64_t ngroups = 0;
  std::vector<int64_t> f0;                // group g holds filters [f0[g], f0[g + 1])
  std::vector<std::vector<int32_t>> ptr;  // per group: C * kh * kw + 1 offsets into fil / w
  std::vector<std::vector<uint16_t>> fil;  // (16-bit: 6 instead of 8 bytes per tap streamed; F <= 65536)
  std::vector<std::vector<float>> w;
};

// The batched small-output path's taps (sparse_conv2d_batched): the taps cut at tiles of `rows` im2col rows, tile
// by tile, and within a tile by filter list (ascending rows): list i's taps in tile k are [ptr[k * L + i],
// ptr[k * L + i + 1]), each an offset into the tile's block of rows (row in tile x row_len) and a weight.
struct KTiles {
  int64_t rows = 0, ntiles = 0, row_len = 0;
  std::vector<int32_t> ptr, off;
  std::vector<float> w;
};

template <typename T>
struct SegTaps;  // sparse_conv.cpp: taps grouped by kernel position (kx-split: by (kx, ky); tiny maps: by position)
struct K22Taps;  // ... the tiny-map path's 2x2 kernels (9 weights each)
struct TapOffCache {
  std::mutex m;
  int64_t key[3] = {-1, -1, -1};
  std::shared_ptr<const std::vector<int64_t>> offs;
  std::shared_ptr<const RowTaps> rows;     // the small-output path (sparse_conv2d_small), keyed by its ngroups
  std::shared_ptr<const KTiles> ktiles;    // the batched small-output path (sparse_conv2d_batched)
  // the small-output path's im2col row of each tap (chan * kh * kw + pos): 16-bit where the rows allow (6 bytes
  // streamed per tap with the weight instead of 8), else 32-bit
  std::shared_ptr<const std::vector<uint16_t>> xrows16;
  std::shared_ptr<const std::vector<int32_t>> xrows32;
  // direct_conv2d's banded input-row offsets (band_offsets) for one geometry: key {C, S, bplane, Wph}
  int64_t dkey[4] = {-1, -1, -1, -1};
  std::shared_ptr<const std::vector<int64_t>> doffs;
  std::shared_ptr<const SegTaps<int32_t>> kx;     // the kx-split path (sparse_conv2d_kx), keyed by H, W
  std::shared_ptr<const SegTaps<int32_t>> kxs;    // ... with staged rows (offsets into the per-thread copy)
  std::shared_ptr<const SegTaps<uint16_t>> tiny;  // the tiny-map path (sparse_conv2d_tiny), keyed by H, W
  std::shared_ptr<const K22Taps> k22;    // ... its 2x2 kernels
};
// 3x3 stride-1 pad-1 sparse convs whose output rows are 1, 2, 4 or 8 vectors run the kx-split path (AVX-512: no
// padded input copy, aligned loads) unless this is off (set_kx_split)
extern bool g_kx_split;
// ... it and the tiny-map path split into at least this many jobs per thread (blocks x filter groups; set_kx_jobs)
extern int64_t g_kx_jobs;
// ... the kx-split path copies each block's input rows (with the halo) into a per-thread buffer first where they
// exceed g_kx_stage_bytes (32 KiB), blocks have 4+ rows and the channel planes are a multiple of 4 KiB apart,
// unless this is off (set_kx_stage, set_kx_stage_bytes)
extern bool g_kx_stage;
extern int64_t g_kx_stage_bytes;
extern std::atomic<int64_t> g_kx_calls;
// 3x3 stride-1 pad-1 sparse convs on 4x4 / 2x2 maps at batches up to g_tiny_max_batch (16) run the tiny-map path (AVX-512:
// one image per vector, per kernel position a sum of whole input channels shifted in registers) unless this is off
// (set_tiny_maps)
extern bool g_tiny_maps;
extern int64_t g_tiny_max_batch;
// ... 2x2 maps as one 4 x 4 matrix per kernel (off: per kernel position; set_tiny_2x2_kernels)
extern bool g_tiny_2x2_kernels;
// Outputs the wide grid would compute mostly in padding (4x4 and 2x2 maps with more than a few vectors of
// positions, e.g. at batch 64) run as a sparse matrix times im2col tiles (sparse_conv2d_batched) unless this is
// off (set_batched_small).
extern bool g_batched_small;
// ... when the output fills less than this fraction of the padded wide grid (Ho * Wo < fill * plane; default 0.6)
extern double g_batched_fill;
// ... in tiles of this many accumulator vectors (2, 4 or 8; 0 = by output size) by g_batched_block bytes of im2col rows
extern int64_t g_batched_nv;
extern int64_t g_batched_block;
// Sparse convs with outputs narrower than a vector run several output rows per vector unless this is off
extern bool g_multirow;
// ... where the output spans at least this many vectors (default 64)
extern int64_t g_multirow_min_vectors;
// Row-vector blocks of sparse convs and of the banded direct conv apply the epilogue to the accumulator registers
// (default on; off: through a buffer, set_fused_store)
extern bool g_fused_store;
// With AVX-512, sparse and dense direct convs whose output rows are a multiple of 8 floats but not of 16 (8x8 maps)
// run the banded row layout with 8-float vectors (default on; off: the wide grid / multi-row paths, set_half_rows)
extern bool g_half_rows;
// direct_conv2d's banded split (rows or filter blocks over the threads) by the register blocks of the busiest thread
// (default on; off: the earlier rule, filters for small outputs, set_direct_balanced_split)
extern bool g_direct_balanced_split;
// the bands direct_conv2d cuts N * Ho output rows of vpr vectors into for FB filter blocks over nt threads (1: the
// filter blocks are split instead)
int64_t direct_split(int64_t N, int64_t Ho, int64_t vpr, int64_t FB, int64_t nt);
// AVX-512: stride-1 band planes written row by row with masked vector loads / stores, stride-2 rows split into
// their two phases by vector permutes (default on; off: memset + a memcpy per row / a scalar loop, set_band_copy_rows)
extern bool g_band_copy_rows;
// banded sparse convs split rows over the threads from this many row vectors per thread, filters below it
// (default 8; set_sparse_band_min_vectors)
extern int64_t g_sparse_band_min_vectors;
// Small outputs of plan steps run from their RowTaps (each thread a group of filters, the im2col rows streamed
// once) if this is on (set_small_rowtaps; default off since 2026-12-05: every filter gathers its taps' rows).
extern bool g_small_rowtaps;
// The small-output path's im2col rows are 4 / 8 floats (xmm / ymm multiply-adds) for outputs of at most 4 / 8
// positions (2x2 maps at batch 1-2) instead of whole 16-float vectors unless this is off (set_small_narrow).
extern bool g_small_narrow;

// Per-layer generated code (netcarve/runtime/codegen.py, PatDNN-style: the layer's sparsity and weights compiled
// in): a shared library whose table holds, per block b of 16 filters and chunk kc of `kc` im2col rows,
// fns[b * nkc + kc](xs, acc): acc[16 filters][16 columns] += the block's weights in that chunk x xs (the chunk's
// rows of 16 im2col columns, [row][16], 64-byte aligned).
typedef void (*GenConvFn)(const float* __restrict, float* __restrict);
struct GenConv {
  std::shared_ptr<void> lib;  // dlopen handle (dlclose when the last step using it goes)
  const GenConvFn* fns = nullptr;
  int64_t F = 0, K = 0, nblocks = 0, nkc = 0, kc = 0;
  std::string path;
};
// Loads (dlopen) a generated layer and checks its table; errors name the file.
std::shared_ptr<const GenConv> load_gen_conv(const std::string& path);
// The conv through generated code: im2col chunks of 16 columns gathered per K chunk, the generated functions add
// them into per-tile accumulators, then bias / residual / ReLU and the NCHW store.
torch::Tensor gen_conv2d(torch::Tensor x, const GenConv& g, c10::optional<torch::Tensor> bias,
                         c10::optional<torch::Tensor> residual, int64_t kh, int64_t kw, int64_t stride, int64_t pad,
                         bool relu);
// column tiles of 16 per job (0: by size)
extern int64_t g_gen_tiles;
// per K chunk: every block's function over the job's tiles (true) or every tile through all blocks (false)
extern bool g_gen_block_outer;

torch::Tensor sparse_conv2d(torch::Tensor x, torch::Tensor tap_ptr, torch::Tensor tap_chan, torch::Tensor tap_pos,
                            torch::Tensor tap_w, torch::Tensor filter_order, c10::optional<torch::Tensor> bias,
                            c10::optional<torch::Tensor> residual, int64_t out_channels, int64_t kh, int64_t kw,
                            int64_t stride, int64_t pad, bool relu, TapOffCache* cache = nullptr);

// Dense conv as a register-blocked direct convolution (8 filters x 48 pixels per block; AVX2: 4 x 24); wpack is
// (ceil(F/8), C*kh*kw, 8). Outputs under g_direct_im2col_max floats of im2col matrix may use im2col rows.
extern int64_t g_direct_im2col_max;
// Convs (direct and sparse) whose output width is a multiple of the vector run in the row layout (no padding
// lanes) unless this is off (set_row_layout).
extern bool g_row_layout;
// Convs (direct and sparse) in the row layout split output rows over the threads, each building its own rows'
// padded input (set_banded; off: planes shared by the threads).
extern bool g_banded;
// cache: the plan step's (band offsets kept per geometry; null: computed per call)
torch::Tensor direct_conv2d(torch::Tensor x, torch::Tensor wpack, c10::optional<torch::Tensor> bias,
                            c10::optional<torch::Tensor> residual, int64_t out_channels, int64_t kh, int64_t kw,
                            int64_t stride, int64_t pad, bool relu, TapOffCache* cache = nullptr);
// Depthwise conv (groups = C = F, weight (C, 1, kh, kw)), any stride / zero padding, bias, residual and ReLU fused
// (csrc/depthwise.cpp; reference twin F.conv2d(..., groups=C)).
torch::Tensor depthwise_conv2d(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias,
                               c10::optional<torch::Tensor> residual, int64_t stride, int64_t pad, bool relu);
// Conv outputs are allocated without the dispatcher (at::detail::empty_cpu), and plan steps' direct convs take their
// band offsets from the step's cache, unless this is off (set_lean_steps; off: torch::empty and offsets per call)
extern bool g_lean_steps;
extern bool g_phase_split;

// Max pooling of NCHW fp32 (dilation 1) with torch's semantics (-inf padding, ceil_mode, NaN propagation); the
// reference twin is F.max_pool2d (ATen's CPU max pooling measured 10-20x slower here).
// Plans run max pooling with this kernel unless set_native_pool(False) (then ATen's, for A/B measurement).
extern bool g_native_pool;
// Clamp (ReLU6, Hardtanh) of a float32 tensor with torch.clamp's semantics (a NaN stays NaN), vectorised, split over
// the threads; in_place: x is overwritten and returned (a plan's value nothing reads later). Plans use it unless
// set_native_clamp(False) (ATen's clamp: ~12 us per call for a 96 x 32 x 32 map at batch 1 on the Intel VM).
extern bool g_native_clamp;
torch::Tensor clamp_native(torch::Tensor x, double lo, double hi, bool in_place);

// dst[c * ldd + r] = src[r * lds + c] for rows x cols (16 x 16 / 8 x 8 register transposes where they fit; sparse_linear.cpp)
void transpose_block(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd);
// Transformer ops (transformer.cpp), used by plans unless set_native_transformer(False) (then ATen's):
extern bool g_native_transformer;
extern bool g_attention_transpose;  // K^T by register transposes (set_attention_transpose; off: scalar copies)
// softmax(scale * q k^T) v for float32 (B, [H,] L, E) q / k / v with equal leading dims (any strides, the last dim
// contiguous or copied so); causal: key j <= query i (torch's is_causal). attention_native_ok: whether it applies.
bool attention_native_ok(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v);
torch::Tensor attention_native(torch::Tensor q, torch::Tensor k, torch::Tensor v, bool causal,
                               c10::optional<double> scale);
// Multi-head self-attention straight from a packed qkv projection (B, T, 3 * heads * hd), laid out as q | k | v,
// each heads x hd: returns the heads merged, (B, T, heads * hd) (no head split / merge copies). With kv (cross-
// attention): qkv is the query projection (B, Tq, heads * hd) and kv the packed key | value projection (B, Tk, 2 *
// heads * hd) of another sequence; the key padding mask is then (B, Tk), the attention mask (Tq, Tk).
torch::Tensor attention_qkv(torch::Tensor qkv, int64_t heads, bool causal, c10::optional<double> scale,
                            c10::optional<torch::Tensor> key_padding_mask = c10::nullopt,
                            c10::optional<torch::Tensor> attn_mask = c10::nullopt,
                            c10::optional<torch::Tensor> kv = c10::nullopt);
// a (Tq, Tk) attention mask (bool: true = not attended, as nn.MultiheadAttention reads it; float: added) as a float
// bias
torch::Tensor attn_mask_bias(const torch::Tensor& mask, int64_t Tq, int64_t Tk);
// a (B, T) key padding mask (bool: true = padding; float: added) as the additive float bias the attention reads
torch::Tensor key_padding_bias(const torch::Tensor& mask, int64_t B, int64_t T);
// LayerNorm over the trailing ndims dims (weight / bias of their size, flattened, optional)
torch::Tensor layer_norm_native(torch::Tensor x, int64_t ndims, c10::optional<torch::Tensor> weight,
                                c10::optional<torch::Tensor> bias, double eps);
// Element-wise activation by plan code (0 gelu, 1 gelu tanh, 2 silu, 3 sigmoid, 5 hardswish, 6 hardsigmoid; not 4 tanh)
bool unary_native_ok(int64_t fn);
torch::Tensor unary_native(torch::Tensor x, int64_t fn);
// a + b (then ReLU) for float32 tensors of one shape (plans' residual additions)
bool add_native_ok(const torch::Tensor& a, const torch::Tensor& b);
torch::Tensor add_native(torch::Tensor a, torch::Tensor b, bool relu);
// With AVX-512, 2x2 / stride-2 pooling of even maps 2-32 columns wide runs over the whole tensor as one sequence of row
// pairs, 16 outputs per 4 vector loads (set_pool_flat; off: plane by plane)
extern bool g_pool_flat;
torch::Tensor max_pool2d(torch::Tensor x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                         bool ceil_mode);

// (N, C, H, W) -> (N, C, 1, 1) plane means; the option-A shortcut (subsample, then channels placed at an offset or
// by a map, zeros elsewhere). Plans use these (and max_pool2d) unless set_native_pool(False).
torch::Tensor global_avg_pool(torch::Tensor x);
torch::Tensor shortcut_subsample(torch::Tensor x, int64_t stride, int64_t channels, int64_t before,
                                 c10::optional<torch::Tensor> src, c10::optional<torch::Tensor> dst);

torch::Tensor bsr_linear(torch::Tensor x, torch::Tensor indptr, torch::Tensor indices, torch::Tensor values,
                         c10::optional<torch::Tensor> bias, int64_t out_features);
// bsr_linear with the tiles also transposed (values_t = bsr_tiles_t(values), or undefined): tiles 16 rows tall
// then run bsr_cols (AVX-512)
torch::Tensor bsr_linear_t(torch::Tensor x, torch::Tensor indptr, torch::Tensor indices, torch::Tensor values,
                           torch::Tensor values_t, c10::optional<torch::Tensor> bias, int64_t out_features);
// (nb, 16, bw) tiles -> (nb, bw, 16) contiguous; undefined for other tile heights
torch::Tensor bsr_tiles_t(const torch::Tensor& values);

// Dense linear / gate matmuls of at most 4 batch rows run netcarve's dot-product kernel unless this is off (then
// ATen's addmm; set_dense_small_linear)
extern bool g_dense_small_linear;
// linears packed for the panel kernel (MatW::direct) run on it unless this is off (set_direct_linear: ATen's addmm)
extern bool g_direct_linear;
// BSR matmuls at batch 1 (AVX-512, tiles a whole number of vectors wide) reduce 16 output rows at a time into one
// vector (reduce16) unless this is off (then per block row, lane sums and scalar stores; set_bsr_rows16)
extern bool g_bsr_rows16;
extern bool g_transpose16;  // AVX-512 16 x 16 transposes in the batched BSR path
// BSR matmuls with 16-row tiles whose transposed tiles are known (MatW::valt) run bsr_cols (AVX-512; set_bsr_cols)
extern bool g_bsr_cols;
// AVX-512: BSR matmuls (other than bsr_cols) below this batch reduce 16 rows per batch row (bsr_rows16), from it on
// they take the transposed batched path (set_bsr_batched_min)
extern int64_t g_bsr_batched_min;
// BSR matmuls of more than 2x this many rows (batch x tokens) run in row tiles of this size (0: all rows at once;
// set_bsr_row_tile). 32 since 2026-12-06 (benchmarks/bsr_row_tile_ab.py, Intel VM, 2 threads, one process: 1.0-2.5x
// faster than tiles of 64 from 65 to 2,048 rows, the ViT's 65-token matmuls at batch 1 1.4-2.1x; 16 was 15-25%
// faster again at 65-130 rows but 1.3x slower at 2,048)
extern int64_t g_bsr_row_tile;

// A matmul y = x W^T (+ bias) that is dense (w) or BSR (ptr / idx / val, sparse = true).
struct MatW {
  torch::Tensor w, ptr, idx, val, bias;
  torch::Tensor valt;  // BSR tiles 16 rows tall: each tile transposed (bsr_tiles_t), for bsr_cols
  torch::Tensor wp, bp;  // direct: w^T in column panels (P, K, 2 * VL) and the bias padded to P * 2 * VL
  int64_t out = 0;
  bool sparse = false;
  bool direct = false;  // dense by netcarve's panel kernel (dense_panel) for more than a few rows, not ATen's addmm
  torch::Tensor apply(const torch::Tensor& x) const;
  // whether apply(x) runs on netcarve's kernels only (BSR, or the small dense kernel), not ATen's addmm
  bool native(const torch::Tensor& x) const;
  bool use_direct(const torch::Tensor& x) const;
  bool small_rows(const torch::Tensor& x) const;
};

// Packs m.w (and m.bias) for the dense panel kernel and sets m.direct.
void pack_direct(MatW& m);
// y (M, N) = x (M, K) @ w^T (+ bias) by the panel kernel; wp / bp from pack_direct.
torch::Tensor dense_panel(const torch::Tensor& x, const torch::Tensor& wp, const torch::Tensor& bp, int64_t N);

// One unidirectional LSTM (lstm = true; gates i, f, g, o) or GRU (r, z, n) layer over x (N, T, I).
torch::Tensor rnn_layer(const torch::Tensor& x, const MatW& ih, const MatW& hh, int64_t hidden, bool lstm,
                        bool reverse = false);

// Plans run consecutive steps that only use netcarve's kernels (and cheap ATen ops) inside one OpenMP region as a
// Team unless this is off (set_team; off: every kernel loop forks and joins torch's OpenMP team)
extern bool g_team;

// The lanes layout (lanes.cpp): (G, C, H + 2, W + 2, 16) floats, 16 images in the lanes, zero borders.
// A conv's non-zero taps for one input map size, chunk-major: ptr (Q, F + 1) into off (float offsets of each tap's
// input within a group, for output pixel (0, 0)) and w; K input channels per chunk.
struct LanesTaps {
  int64_t H = 0, W = 0, K = 1, Q = 0;
  std::vector<int32_t> ptr, off;
  std::vector<float> w;
};
extern int64_t g_lanes_pixels;       // output pixels per register block (1-16)
extern int64_t g_lanes_chunk_bytes;  // bytes of a chunk's input window
LanesTaps lanes_taps(const torch::Tensor& weight, int64_t H, int64_t W, int64_t pad, int64_t chunk);
int64_t lanes_chunk(int64_t C, int64_t stride, int64_t Ho, int64_t Wo, bool pool);
torch::Tensor to_lanes(torch::Tensor x);
torch::Tensor from_lanes(torch::Tensor x, int64_t N);
torch::Tensor lanes_conv(torch::Tensor x, const LanesTaps& t, int64_t F, c10::optional<torch::Tensor> bias,
                         c10::optional<torch::Tensor> residual, int64_t k, int64_t stride, int64_t pad, bool relu,
                         bool pool = false);
torch::Tensor lanes_maxpool2(torch::Tensor x);
torch::Tensor lanes_shortcut(torch::Tensor x, int64_t stride, int64_t C, int64_t before,
                             c10::optional<torch::Tensor> src, c10::optional<torch::Tensor> dst);
torch::Tensor lanes_gap(torch::Tensor x);
