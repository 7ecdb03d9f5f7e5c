"""Would images in the vector lanes close DeepSparse's lead on small maps at large batches? A standalone C++ probe on
one thread: a 3x3 stride-1 sparse conv (random 10%-dense filters, C channels in and out) over 16 images held in the
16 lanes of each vector, activations laid out [channel][row + 2][column + 2][16 images] with zero borders, so that every
tap of every output pixel is one aligned 64-byte load and one multiply-add, with no lane shifts and no special first or
last rows. A filter's register block is 8 output pixels (one row of an 8x8 map, half a row of 16x16, two rows of 4x4)
for the 16 images; its taps are (channel, ky, kx, weight) lists. Variants:

- ``lanes``: every filter over all its taps at once (the rows of the block's window, all channels, read from L2);
- ``lanes, chunks of K``: the taps split by chunks of K input channels whose window fits L1, every filter's partial
  sums kept in a buffer between chunks (loaded and stored once per filter and chunk).

Reported: GFLOP/s of the non-zero multiply-adds, and the fraction of the one-thread FMA peak measured by the same
program (register-only zmm FMAs; on the Zen 4 VM that loop runs at half speed or less in some phases, so compare the
variants of one run with each other). For comparison, netcarve's kx-split path runs VGG-16's 256-channel 8x8 layers at batch
64 at ~50 GFLOP/s per thread and DeepSparse at ~100-110 (``deepsparse_layers-zen4.json``, 2 threads).

    python benchmarks/lanes_probe.py

Writes ``benchmarks/results/lanes_probe-<cpu>.json`` (``--out``) with the environment. Needs g++.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _cxx_probe import build_and_run, save_probe

SRC = r"""
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <tuple>
#include <vector>

typedef float v16 __attribute__((vector_size(64)));
static inline v16 ld(const float* p) { return *reinterpret_cast<const v16*>(p); }
static inline void st(float* p, v16 a) { *reinterpret_cast<v16*>(p) = a; }
static inline v16 bc(float w) { return (v16)_mm512_set1_ps(w); }

struct Taps { std::vector<int> ptr; std::vector<int> off; std::vector<float> w; };

// out[f][y][x][16] over output pixels [p0, p0 + 8) of the H x W map (R rows of W = 8 / R pixels), taps [t0, t1)
template <int R, int W>
static inline void block(const float* __restrict X, int Wp, int y0, const int* __restrict off,
                         const float* __restrict w, int t0, int t1, v16 (&acc)[R * W]) {
  for (int t = t0; t < t1; ++t) {
    const v16 we = bc(w[t]);
    const float* b = X + off[t] + (long)(y0 * Wp) * 16;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int x = 0; x < W; ++x) acc[r * W + x] += we * ld(b + (long)(r * Wp + x) * 16);
  }
}

static float* aligned_floats(long n) {  // 64-byte aligned, zeroed: whole-line vector loads
  float* p = static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64));
  std::fill(p, p + n, 0.f);
  return p;
}

template <int R, int W>
static double run(int C, int F, int H, int K, const float* X, const std::vector<Taps>& chunks, float* out,
                  float* part, int reps) {
  const int Wp = W + 2, Q = (int)chunks.size();
  double best = 1e30;
  for (int rep = 0; rep < reps; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int y0 = 0; y0 < H; y0 += R) {
      for (int q = 0; q < Q; ++q) {
        const Taps& tp = chunks[q];
        for (int f = 0; f < F; ++f) {
          v16 acc[R * W];
          float* pp = part + (long)f * R * W * 16;
          if (q == 0)
            for (int i = 0; i < R * W; ++i) acc[i] = bc(0.f);
          else
            for (int i = 0; i < R * W; ++i) acc[i] = ld(pp + i * 16);
          block<R, W>(X, Wp, y0, tp.off.data(), tp.w.data(), tp.ptr[f], tp.ptr[f + 1], acc);
          if (q + 1 < Q) {
            for (int i = 0; i < R * W; ++i) st(pp + i * 16, acc[i]);
          } else {
            float* o = out + ((long)f * H + y0) * W * 16;
            for (int i = 0; i < R * W; ++i) st(o + i * 16, acc[i]);
          }
        }
      }
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s);
  }
  (void)C; (void)K;
  return best;
}

static double peak(int reps) {  // register-only zmm FMAs, 12 chains (as l1_probe.py measures it)
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(i * 1e-3f);
  const __m512 b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-4f);
  const long n = 50000000;
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (long k = 0; k < n; ++k)
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  float s = 0;
  for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_ps(a[i]);
  if (s == 12345.f) std::printf("#");
  return 2.0 * 16 * 12 * n / best / 1e9;
}

int main(int argc, char** argv) {
  const int C = std::atoi(argv[1]), H = std::atoi(argv[2]), reps = std::atoi(argv[3]);
  const int F = C, W = H, Wp = W + 2, Hp = H + 2;
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  float* X = aligned_floats((long)C * Hp * Wp * 16);
  for (int c = 0; c < C; ++c)
    for (int y = 0; y < H; ++y)
      for (int x = 0; x < W; ++x)
        for (int l = 0; l < 16; ++l) X[(((long)c * Hp + y + 1) * Wp + x + 1) * 16 + l] = u(rng);
  // 10% dense 3x3 filters: (c, ky, kx, w) per filter, ascending c
  std::vector<std::vector<std::tuple<int, int, int, float>>> taps(F);
  std::uniform_real_distribution<float> p(0.f, 1.f);
  long nnz = 0;
  for (int f = 0; f < F; ++f)
    for (int c = 0; c < C; ++c)
      for (int k = 0; k < 9; ++k)
        if (p(rng) < 0.1f) { taps[f].emplace_back(c, k / 3, k % 3, u(rng)); ++nnz; }
  auto make = [&](int K) {
    std::vector<Taps> ch((C + K - 1) / K);
    for (auto& t : ch) t.ptr.push_back(0);
    for (int f = 0; f < F; ++f) {
      for (auto& [c, ky, kx, w] : taps[f]) {
        Taps& t = ch[c / K];
        t.off.push_back(((c * Hp + ky) * Wp + kx) * 16);
        t.w.push_back(w);
      }
      for (auto& t : ch) t.ptr.push_back((int)t.off.size());
    }
    return ch;
  };
  float* out = aligned_floats((long)F * H * W * 16);
  float* part = aligned_floats((long)F * 16 * 16);
  // reference (scalar) for checking
  std::vector<float> ref((long)F * H * W * 16, 0.f);
  for (int f = 0; f < F; ++f)
    for (auto& [c, ky, kx, w] : taps[f])
      for (int y = 0; y < H; ++y)
        for (int x = 0; x < W; ++x)
          for (int l = 0; l < 16; ++l)
            ref[(((long)f * H + y) * W + x) * 16 + l] += w * X[(((long)c * Hp + y + ky) * Wp + x + kx) * 16 + l];
  const double pk = peak(3);
  const double flop = 2.0 * nnz * H * W * 16;
  std::printf("{\"channels\": %d, \"map\": %d, \"nonzeros\": %ld, \"peak_gflops\": %.1f, \"rows\": [", C, H, nnz, pk);
  const int Ks[] = {0, 8, 16, 32, 64};
  bool first = true;
  for (int K : Ks) {
    if (K >= C) continue;
    auto ch = make(K == 0 ? C : K);
    double s;
    if (H == 8) s = run<1, 8>(C, F, H, K, X, ch, out, part, reps);
    else if (H == 16) s = run<1, 16>(C, F, H, K, X, ch, out, part, reps);
    else s = run<2, 4>(C, F, H, K, X, ch, out, part, reps);
    double err = 0, mx = 0;
    for (size_t i = 0; i < ref.size(); ++i) { err = std::max(err, (double)std::fabs(out[i] - ref[i])); mx = std::max(mx, (double)std::fabs(ref[i])); }
    const double window = (double)(K == 0 ? C : K) * ((H == 4 ? 2 : 1) + 2) * ((H == 16 ? 16 : H == 8 ? 8 : 4) + 2) * 64 / 1024;
    std::printf("%s{\"variant\": \"%s\", \"chunk_channels\": %d, \"window_kib\": %.1f, \"ms\": %.4f, \"gflops\": %.1f, "
                "\"of_peak\": %.3f, \"max_rel_err\": %.2e}", first ? "" : ", ", K == 0 ? "lanes" : "lanes, chunks",
                K == 0 ? C : K, window, s * 1e3, flop / s / 1e9, flop / s / 1e9 / pk, err / mx);
    first = false;
  }
  std::printf("]}\n");
}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["256x8", "512x8", "128x16", "512x4"], help="CHANNELSxMAP")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    rows = []
    for shape in a.shapes:
        c, hw = shape.split("x")
        res, _, _ = build_and_run(SRC, [c, hw, str(a.reps)], flags=("-std=c++17",))
        rows.append(res)
        for r in res["rows"]:
            print(f"C={c:>4} {hw}x{hw}: {r['variant']:13s} K={r['chunk_channels']:<4d} window {r['window_kib']:7.1f} KiB "
                  f"{r['ms']:8.3f} ms {r['gflops']:6.1f} GFLOP/s ({100 * r['of_peak']:.0f}% of {res['peak_gflops']:.0f}) "
                  f"err {r['max_rel_err']:.1e}", flush=True)
    path = save_probe("lanes_probe", {"threads": 1, "images": 16, "density": 0.1, "shapes": rows}, a.out)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
