"""Why does a second core buy so little at batch 1? A standalone C++ probe of the kx-split sparse conv (16 channels,
32x32, 12% density, ten chained layers, rows split between the threads as the runtime splits them), with the two
threads either sharing each layer's activation (thread 0 computes rows 0-15, thread 1 rows 16-31 of the same
tensors, as in a plan) or each working on private copies of every activation (the same work and the same spin
barrier after each layer, but no cache line ever written by one core and read by the other), and variants between
the two: the filters split instead of the rows, the halo rows loaded / prefetched / the boundary blocks' rows copied
before computing, the boundary blocks reading a private copy (wrong halo values, timing only), reading private and
writing shared tensors and the reverse, and ghost rows (every second layer computes one extra row per thread into a
private tensor, so that the next layer reads only its own thread's rows: a hand-over every second layer), and each
channel's two halves in separate 4 KiB pages with the boundary rows pushed into the other half's halo slots by their
producer (the only lines that move between the cores are the two halo rows). 1 and 2 threads; microseconds per layer, the best of 7 rounds of 2,000
passes over the ten layers.

    python benchmarks/share_probe.py

Writes ``benchmarks/results/share_probe-<cpu>.json`` (committed: ``share_probe-emr.json``) (``--out``) with the environment. Needs g++ with OpenMP.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _cxx_probe import build_and_run, save_probe

SRC = r"""

#include <initializer_list>
#include <immintrin.h>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <omp.h>
typedef float vecf __attribute__((vector_size(64)));
typedef float vecfu __attribute__((vector_size(64), aligned(4)));
static inline vecf ld(const float* p) { return *(const vecfu*)p; }
static inline void st(float* p, vecf v) { *(vecfu*)p = v; }
static inline vecf bc(float w) { return (vecf)_mm512_set1_ps(w); }
const int C = 16, F = 16, H = 32, W = 32, HW = H * W, PLANE = HW + 2 * W, L = 10;
struct Taps { std::vector<int> seg, off; std::vector<float> w; };
// one filter over a block of 4 rows (8 vectors), per kernel column kx a sum shifted by one lane (netcarve's kx_block)
template <bool REV, int NV = 8>
static void blockT(const float* x, int y0, const Taps& t, int f, float* o) {
  const float* src[NV];
  for (int v = 0; v < NV; ++v) src[v] = x + (y0 + v / 2) * W + (v % 2) * 16;
  vecf out[NV];
  for (int v = 0; v < NV; ++v) out[v] = bc(0);
  const __m512i z = _mm512_setzero_si512();
  for (int kx = 0; kx < 3; ++kx) {
    vecf p[NV];
    for (int v = 0; v < NV; ++v) p[v] = bc(0);
    for (int e = t.seg[f * 3 + kx]; e < t.seg[f * 3 + kx + 1]; ++e) {
      const vecf ww = bc(t.w[e]);
      const int oo = t.off[e];
#pragma GCC unroll 8
      for (int q = 0; q < NV; ++q) { const int v = REV ? NV - 1 - q : q; p[v] += ww * ld(src[v] + oo); }
    }
    for (int v = 0; v < NV; ++v) {
      if (kx == 1) {
        out[v] += p[v];
      } else if (kx == 0) {
        const __m512i l = v % 2 == 0 ? z : _mm512_castps_si512((__m512)p[v > 0 ? v - 1 : 0]);
        out[v] += (vecf)_mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512((__m512)p[v]), l, 15));
      } else {
        const __m512i r = v % 2 == 1 ? z : _mm512_castps_si512((__m512)p[v + 1 < NV ? v + 1 : v]);
        out[v] += (vecf)_mm512_castsi512_ps(_mm512_alignr_epi32(r, _mm512_castps_si512((__m512)p[v]), 1));
      }
    }
  }
  for (int q = 0; q < NV; ++q) { const int v = REV ? NV - 1 - q : q; st(o + (y0 + v / 2) * W + (v % 2) * 16, out[v]); }
}
static void block(const float* x, int y0, const Taps& t, int f, float* o) { blockT<false>(x, y0, t, f, o); }
static float* plane_buf() {  // C channels of 32x32 with a zero row above and below each
  float* b = (float*)aligned_alloc(64, (C * PLANE + 64) * 4);
  for (int i = 0; i < C * PLANE + 64; ++i) b[i] = 0;
  for (int c = 0; c < C; ++c)
    for (int i = 0; i < HW; ++i) b[c * PLANE + W + i] = 1.0f;
  return b;
}
int main() {
  srand(1);
  Taps t;
  t.seg.push_back(0);
  for (int f = 0; f < F; ++f)
    for (int kx = 0; kx < 3; ++kx) {
      for (int c = 0; c < C; ++c)
        for (int ky = 0; ky < 3; ++ky)
          if (rand() % 100 < 12) {
            t.off.push_back(c * PLANE + (ky - 1) * W);
            t.w.push_back(0.01f);
          }
      t.seg.push_back(t.off.size());
    }
  float* scratch[2] = {plane_buf(), plane_buf()};
  Taps t2 = t;
  for (size_t e = 0; e < t2.off.size(); ++e) { const int c = (t.off[e] + W) / PLANE; t2.off[e] = t.off[e] - c * PLANE + c * 2048; }
  std::vector<float*> halves;
  for (int l = 0; l <= L; ++l) { float* b = (float*)aligned_alloc(4096, (C * 2048 + 64) * 4); for (int i = 0; i < C * 2048 + 64; ++i) b[i] = 1.0f;
    for (int c = 0; c < C; ++c) { for (int q = 0; q < W; ++q) { b[(c * 2) * 1024 + q] = 0; b[(c * 2 + 1) * 1024 + 17 * W + q] = 0; } } halves.push_back(b); }
  std::vector<float*> shared;
  std::vector<std::vector<float*>> priv(2);
  for (int l = 0; l <= L; ++l) shared.push_back(plane_buf());
  for (int k = 0; k < 2; ++k)
    for (int l = 0; l <= L; ++l) priv[k].push_back(plane_buf());
  printf("{\"taps\": %zu, \"rows\": [", t.off.size());
  bool first = true;
  for (int mode : {0, 1, 2, 3, 4, 10, 11, 12, 9, 7, 8, 13, 14})
    for (int th : {1, 2}) {
      double best = 1e18;
      for (int rep = 0; rep < 7; ++rep) {
        std::atomic<int> bar{0};
        auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(th)
        {
          const int tid = omp_get_thread_num();
          int gen = 0;
          for (int it = 0; it < 2000; ++it)
            for (int l = 0; l < L; ++l) {
              const float* x = (mode == 1 || mode == 7 ? priv[tid][l] : shared[l]) + W;
              float* o = (mode == 1 || mode == 8 ? priv[tid][l + 1] : shared[l + 1]) + W;
              if (mode == 14) {  // halves of each channel in separate 4 KiB pages, halo rows pushed by their producer
                for (int h = (th == 1 ? 0 : tid); h <= (th == 1 ? 1 : tid); ++h) {
                  const float* xh = halves[l] + h * 1024 + (1 - h * 16) * W;
                  float* oh = halves[l + 1] + h * 1024 + (1 - h * 16) * W;
                  for (int b = h * 4; b < h * 4 + 4; ++b) for (int f = 0; f < F; ++f) block(xh, b * 4, t2, f, oh + f * 2048);
                  for (int f = 0; f < F; ++f) {  // push the boundary row into the other half's halo slot
                    const float* src = oh + f * 2048 + (h == 0 ? 15 : 16) * W;
                    float* dst = halves[l + 1] + (f * 2 + (1 - h)) * 1024 + (h == 0 ? 0 : 17) * W;
                    for (int q = 0; q < W; q += 16) _mm512_storeu_ps(dst + q, _mm512_loadu_ps(src + q));
                  }
                }
              } else if (mode == 13) {  // ghost rows: even layers compute one extra row into a private tensor, odd layers read it
                if (th == 1) {
                  for (int b = 0; b < 8; ++b) for (int f = 0; f < F; ++f) block(x, b * 4, t, f, o + f * PLANE);
                } else if (l % 2 == 0) {
                  float* po = priv[tid][l + 1] + W;
                  for (int b = tid * 4; b < tid * 4 + 4; ++b) for (int f = 0; f < F; ++f) block(x, b * 4, t, f, po + f * PLANE);
                  const int gr = tid == 0 ? 16 : 15;
                  for (int f = 0; f < F; ++f) blockT<false, 2>(x, gr, t, f, po + f * PLANE);
                } else {
                  const float* px = priv[tid][l] + W;
                  for (int b = tid * 4; b < tid * 4 + 4; ++b) for (int f = 0; f < F; ++f) block(px, b * 4, t, f, o + f * PLANE);
                }
              } else if (mode == 2) {
                for (int b = 0; b < 8; ++b)
                  for (int f = tid * F / th; f < (tid + 1) * F / th; ++f) block(x, b * 4, t, f, o + f * PLANE);
              } else if (mode == 10 || mode == 11) {  // shared; the halo row loaded (10) or prefetched (11) up front
                if (th == 2) {
                  const int hr = tid == 0 ? 16 : 15;
                  __m512 acc = _mm512_setzero_ps();
                  for (int c = 0; c < C; ++c)
                    for (int q = 0; q < W; q += 16) {
                      if (mode == 10) acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + c * PLANE + hr * W + q));
                      else _mm_prefetch((const char*)(x + c * PLANE + hr * W + q), _MM_HINT_T0);
                    }
                  if (mode == 10) { volatile float sink = _mm512_reduce_add_ps(acc); (void)sink; }
                }
                for (int b = tid * 8 / th; b < (tid + 1) * 8 / th; ++b)
                  for (int f = 0; f < F; ++f) block(x, b * 4, t, f, o + f * PLANE);
              } else if (mode == 12) {  // boundary blocks copy their rows (+ halos) into a thread-local plane first
                for (int b = tid * 8 / th; b < (tid + 1) * 8 / th; ++b) {
                  const bool bnd = th == 2 && ((tid == 0 && b == 3) || (tid == 1 && b == 4));
                  const float* xx = x;
                  if (bnd) {
                    float* lp = scratch[tid] + W;
                    for (int c = 0; c < C; ++c)
                      for (int r = b * 4 - 1; r <= b * 4 + 4; ++r)
                        for (int q = 0; q < W; q += 16)
                          _mm512_storeu_ps(lp + c * PLANE + r * W + q, _mm512_loadu_ps(x + c * PLANE + r * W + q));
                    xx = lp;
                  }
                  for (int f = 0; f < F; ++f) block(xx, b * 4, t, f, o + f * PLANE);
                }
              } else if (mode == 9) {  // boundary blocks read a private copy (timing only)
                for (int b = tid * 8 / th; b < (tid + 1) * 8 / th; ++b) {
                  const bool bnd = th == 2 && ((tid == 0 && b == 3) || (tid == 1 && b == 4));
                  const float* xx = bnd ? priv[tid][l] + W : x;
                  for (int f = 0; f < F; ++f) block(xx, b * 4, t, f, o + f * PLANE);
                }
              } else if (mode == 3) {  // thread 0 walks its blocks upwards and loads each block's rows descending
                if (tid == 0 && th == 2) { for (int b = 3; b >= 0; --b) for (int f = 0; f < F; ++f) blockT<true>(x, b * 4, t, f, o + f * PLANE); }
                else for (int b = tid * 8 / th; b < (tid + 1) * 8 / th; ++b) for (int f = 0; f < F; ++f) block(x, b * 4, t, f, o + f * PLANE);
              } else if (mode == 4) {  // rows split 12 / 20 (boundary not at the middle of the 4 KiB plane)
                int b0 = th == 2 ? (tid == 0 ? 0 : 3) : 0, b1 = th == 2 ? (tid == 0 ? 3 : 8) : 8;
                for (int b = b0; b < b1; ++b) for (int f = 0; f < F; ++f) block(x, b * 4, t, f, o + f * PLANE);
              } else {
                for (int b = tid * 8 / th; b < (tid + 1) * 8 / th; ++b)
                  for (int f = 0; f < F; ++f) block(x, b * 4, t, f, o + f * PLANE);
              }
              ++gen;
              bar.fetch_add(1);
              while (bar.load(std::memory_order_acquire) < gen * th) _mm_pause();
            }
        }
        const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
        if (ns < best) best = ns;
      }
      printf("%s{\"activations\": \"%s\", \"threads\": %d, \"us_per_layer\": %.3f}", first ? "" : ", ",
             mode == 14 ? "halves in separate pages, halo pushed" : mode == 13 ? "ghost rows: hand-over every second layer" : mode == 0 ? "shared, rows split (as the runtime)" : mode == 1 ? "private copies" :
             mode == 2 ? "shared, filters split" : mode == 3 ? "shared, thread 0 walking its rows downwards" :
             mode == 4 ? "shared, rows split 12 / 20" : mode == 10 ? "shared, halo row loaded first" :
             mode == 11 ? "shared, halo row prefetched first" : mode == 12 ? "shared, boundary blocks' rows copied first" :
             mode == 9 ? "shared, boundary blocks read a private copy (timing only)" :
             mode == 7 ? "read private copies, write shared" : "read shared (never rewritten), write private", th, best / 1000.0 / 2000 / L);
      first = false;
    }
  printf("]}\n");
}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    res, _, _ = build_and_run(SRC, [], flags=("-fopenmp",))
    by = {(r["activations"], r["threads"]): r["us_per_layer"] for r in res["rows"]}
    for kind in dict.fromkeys(r["activations"] for r in res["rows"]):
        one, two = by[(kind, 1)], by[(kind, 2)]
        print(f"{kind:58s} 1 thread {one:6.2f} us  2 threads {two:6.2f} us  x{one / two:.2f}")
    save_probe("share_probe", res, a.out)


if __name__ == "__main__":
    main()
