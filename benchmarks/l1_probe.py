"""Why do the sparse convs run at under half the FMA peak at large batches? A standalone C++ probe of the tap loop of
netcarve's kx-split sparse conv (one filter over a block of 8 zmm vectors: 4 rows of a 32-wide map or 8 rows of a
16-wide one; every tap is one broadcast weight and 8 multiply-adds with an aligned load each), on one thread, over 8
images of random 10%-dense 3x3 filters, with the input read in different ways:

- ``tensor``: straight from the NCHW activation, as the runtime does (channel planes 4 KiB apart on 32x32 maps, so
  the same row of every channel falls in the same L1 set);
- ``tensor, channels alternating``: the same, each filter's taps ordered by channel, up and down in turn;
- ``scratch``: each block's rows (with the halo rows, zeros outside the map) first copied into a contiguous buffer
  [channel][row][column], the copy timed too;
- ``scratch, chunks of K channels``: the same per chunk of K input channels, every filter's partial sums added
  through memory (the copy and the output traffic timed);
- ``tensor, prefetch``: software prefetch of the rows of the tap 8 ahead.

The kx shifts in registers are left out (they are the same in every variant). Each variant reports GFLOP/s of the
non-zero multiply-adds and the fraction of the one-thread FMA peak measured by the same program (register-only FMAs).

    python benchmarks/l1_probe.py

Writes ``benchmarks/results/l1_probe-<cpu>.json`` (committed: ``l1_probe-zen4.json``) (``--out``) with the
environment. Needs g++.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _cxx_probe import build_and_run, save_probe

SRC = r"""
#include <immintrin.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>
#include <omp.h>

static double peak() {  // one thread, register-only zmm FMAs, 12 chains
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(i * 1e-3f);
  const __m512 b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-4f);
  const long it = 50000000;
  double best = 1e9;
  for (int r = 0; r < 3; ++r) {
    double t0 = omp_get_wtime();
    for (long i = 0; i < it; ++i)
#pragma GCC unroll 12
      for (int k = 0; k < 12; ++k) a[k] = _mm512_fmadd_ps(a[k], b, c);
    best = std::min(best, omp_get_wtime() - t0);
  }
  float s = 0;
  for (int k = 0; k < 12; ++k) s += _mm512_reduce_add_ps(a[k]);
  if (s == 12345.f) printf("#");
  return 2.0 * 16 * 12 * it / best / 1e9;
}

static int WV = 2, PF = 0;
// p[0..8) += w[t] * base[off[t] + row(v) * rs + col(v)], rows of V vectors, prefetch of the tap P ahead (0: none)
template <int V, int P>
static inline __attribute__((always_inline)) void taps_t(const float* base, const int* off, const float* w, long n, __m512 (&p)[8], long rs) {
  for (long t = 0; t < n; ++t) {
    const __m512 we = _mm512_set1_ps(w[t]);
    const float* s = base + off[t];
    if (P) {
      const float* q = base + off[t + P < n ? t + P : t];
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) _mm_prefetch((const char*)(q + (v / V) * rs + (v % V) * 16), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) p[v] = _mm512_fmadd_ps(we, _mm512_load_ps(s + (v / V) * rs + (v % V) * 16), p[v]);
  }
}
static inline __attribute__((always_inline)) void taps(const float* base, const int* off, const float* w, long n, __m512 (&p)[8], long rs) {
  if (WV == 2) PF ? taps_t<2, 8>(base, off, w, n, p, rs) : taps_t<2, 0>(base, off, w, n, p, rs);
  else PF ? taps_t<1, 8>(base, off, w, n, p, rs) : taps_t<1, 0>(base, off, w, n, p, rs);
}

struct Tap { int c, ky, kx; float w; };

// variant: 0 tensor, 1 tensor channels alternating, 2 scratch, 3 scratch chunks, 4 tensor prefetch
static double run(int variant, int C, int Wd, int Cb, float d) {
  const int F = C, N = 8, H = Wd, W = Wd;
  WV = W / 16;
  const int R = 8 / WV;
  PF = variant == 4 ? 8 : 0;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> U(0, 1);
  std::vector<std::vector<Tap>> tl(F);
  long nt = 0;
  for (int f = 0; f < F; ++f)
    for (int c = 0; c < C; ++c)
      for (int k = 0; k < 9; ++k)
        if (U(rng) < d) { tl[f].push_back({c, k / 3, k % 3, 0.01f}); ++nt; }
  const long plane = (long)H * W, img = C * plane, sch = (long)(R + 2) * W;
  float* xall = (float*)aligned_alloc(64, 4 * (N * img + 2 * 4096));
  for (long i = 0; i < N * img + 2 * 4096; ++i) xall[i] = 1e-3f;
  float* x = xall + 4096;
  float* out = (float*)aligned_alloc(64, 4L * N * F * plane);
  memset(out, 0, 4L * N * F * plane);
  float* scratch = (float*)aligned_alloc(64, 4L * C * sch);
  const bool scr = variant == 2 || variant == 3;
  std::vector<std::vector<int>> off(F), cptr(F);
  std::vector<std::vector<float>> wv(F);
  const int nch = variant == 3 ? (C + Cb - 1) / Cb : 1;
  for (int f = 0; f < F; ++f) {
    auto t = tl[f];
    std::sort(t.begin(), t.end(), [&](const Tap& a, const Tap& b) {
      if (variant == 3 && a.c / Cb != b.c / Cb) return a.c / Cb < b.c / Cb;
      if (a.kx != b.kx) return a.kx < b.kx;
      if (variant == 1) {
        const bool up = ((a.kx + f) & 1) == 0;
        if (a.c != b.c) return up ? a.c < b.c : a.c > b.c;
        return a.ky < b.ky;
      }
      return std::make_tuple(a.ky, a.c) < std::make_tuple(b.ky, b.c);
    });
    int cur = -1;
    for (size_t i = 0; i < t.size(); ++i) {
      if (variant == 3) while (cur < t[i].c / Cb) { cptr[f].push_back((int)i); ++cur; }
      const int c = variant == 3 ? t[i].c % Cb : t[i].c;
      off[f].push_back(scr ? (int)(c * sch + t[i].ky * W) : (int)(c * plane + (t[i].ky - 1) * W));
      wv[f].push_back(t[i].w);
    }
    if (variant == 3) while (cur < nch) { cptr[f].push_back((int)t.size()); ++cur; }
  }
  auto copy = [&](const float* xn, int r0, int c0, int c1) {
    for (int c = c0; c < c1; ++c)
      for (int r = 0; r < R + 2; ++r) {
        const int y = r0 - 1 + r;
        float* dst = scratch + (c - c0) * sch + (long)r * W;
        for (int q = 0; q < W; q += 16)
          _mm512_store_ps(dst + q, y < 0 || y >= H ? _mm512_setzero_ps() : _mm512_load_ps(xn + c * plane + (long)y * W + q));
      }
  };
  double best = 1e9;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = omp_get_wtime();
    for (int n = 0; n < N; ++n) {
      const float* xn = x + n * img;
      for (int r0 = 0; r0 < H; r0 += R) {
        for (int k = 0; k < nch; ++k) {
          if (scr) copy(xn, r0, variant == 3 ? k * Cb : 0, variant == 3 ? std::min(C, (k + 1) * Cb) : C);
          const float* base = scr ? scratch : xn + (long)r0 * W;
          for (int f = 0; f < F; ++f) {
            float* o = out + ((long)n * F + f) * plane + (long)r0 * W;
            __m512 p[8];
            for (int v = 0; v < 8; ++v) p[v] = k == 0 ? _mm512_setzero_ps() : _mm512_load_ps(o + v * 16);
            const long a = variant == 3 ? cptr[f][k] : 0, b = variant == 3 ? cptr[f][k + 1] : (long)off[f].size();
            taps(base, off[f].data() + a, wv[f].data() + a, b - a, p, W);
            for (int v = 0; v < 8; ++v) _mm512_store_ps(o + v * 16, p[v]);
          }
        }
      }
    }
    best = std::min(best, omp_get_wtime() - t0);
  }
  free(xall); free(out); free(scratch);
  return 2.0 * nt * 128 * (H / R) * N / best / 1e9;
}

int main() {
  const double pk = peak();
  printf("{\"peak_gflops_1t\": %.2f, \"rows\": [\n", pk);
  const char* names[] = {"tensor", "tensor, channels alternating", "scratch", "scratch, chunks", "tensor, prefetch"};
  bool first = true;
  for (auto [C, Wd] : std::vector<std::pair<int, int>>{{16, 32}, {64, 32}, {64, 16}, {128, 16}}) {
    for (int v = 0; v < 5; ++v)
      for (int cb : (v == 3 ? std::vector<int>{16, 32} : std::vector<int>{0})) {
        if (v == 3 && cb >= C) continue;
        const double g = run(v, C, Wd, cb, 0.1f);
        printf("%s{\"channels\": %d, \"map\": %d, \"variant\": \"%s%s\", \"gflops\": %.2f, \"of_peak\": %.3f}\n",
               first ? "" : ",", C, Wd, names[v], v == 3 ? (cb == 16 ? " of 16" : " of 32") : "", g, g / pk);
        first = false;
      }
  }
  printf("]}\n");
}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    res, _, _ = build_and_run(SRC, [], flags=("-fopenmp",), env={"OMP_NUM_THREADS": "1"})
    print(f"one-thread FMA peak {res['peak_gflops_1t']:.1f} GFLOP/s")
    for r in res["rows"]:
        print(f"C={r['channels']:<4d} {r['map']}x{r['map']:<3d} {r['variant']:32s} {r['gflops']:6.1f} GFLOP/s "
              f"{100 * r['of_peak']:5.1f}% of peak")
    save_probe("l1_probe", res, a.out)


if __name__ == "__main__":
    main()
