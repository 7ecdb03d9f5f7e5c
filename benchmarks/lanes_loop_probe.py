"""What limits the lanes conv's inner loop (netcarve.runtime.lanes, csrc/lanes.cpp)? A standalone C++ probe on one
thread: one 3x3 stride-1 sparse conv over 16 images in the vector lanes, C channels in and out, laid out as the runtime
lays it out ([channel][row + 2][column + 2][16 images]), run the way the runtime runs it (register blocks of 8 pixels
of one row, taps in chunks of input channels whose window fits 32 KiB, each filter's partial sums in a buffer between
chunks) and in variants of it, alternated over ``--rounds`` rounds in one process:

- ``taps``: the runtime's loop (per tap: one broadcast, one offset load, 8 multiply-adds with memory operands);
- ``one-channel window``: the same instructions, but every tap of a chunk reads the chunk's first input channel (a
  2 KiB window instead of ~30 KiB): how fast the loop would run if every load hit L1 at once (its result is not
  the conv's, so it is not checked);
- ``kernel rows``: one pass per (channel, kernel row) with taps instead of per tap, each input vector loaded once for
  the up to 3 taps of the row (seven loops per filter, one per row mask);
- ``filter pairs``: two filters per pass, their tap lists interleaved and the shorter one padded with zero weights;
- ``256-bit``: the loop in 8-float halves (16 accumulators of 8 floats).

``--pattern`` draws 4-of-9 kernel patterns (8 shapes) on 28% of the kernels (about 12% density, PatDNN's ~8x) instead
of 10% unstructured taps. Reported per variant: GFLOP/s of the non-zero multiply-adds (best of ``--reps`` passes per
round, the best round) and the median over rounds of its speed ratio to ``taps`` in the same round.

    python benchmarks/lanes_loop_probe.py
    python benchmarks/lanes_loop_probe.py --pattern

Writes ``benchmarks/results/lanes_loop_probe[-pattern]-<cpu>.json`` (``--out``) with the environment. Needs g++.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _cxx_probe import RESULTS, build_and_run, cpu_slug, save_probe

from netcarve.measure import environment

SRC = r"""
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
static inline v16 ld(const float* p) { return *reinterpret_cast<const v16*>(p); }
static inline void st(float* p, v16 a) { *reinterpret_cast<v16*>(p) = a; }
static inline v16 bc(float w) { return (v16)_mm512_set1_ps(w); }
static inline v8 ld8(const float* p) { return *reinterpret_cast<const v8*>(p); }
static inline void st8(float* p, v8 a) { *reinterpret_cast<v8*>(p) = a; }
static inline v8 bc8(float w) { return (v8)_mm256_set1_ps(w); }

constexpr int P = 8;  // pixels per register block (one row)

struct Chunk {
  std::vector<int> ptr, off;  // per filter: taps [ptr[f], ptr[f + 1])
  std::vector<float> w;
  std::vector<int> one;       // off with every channel replaced by the chunk's first
  std::vector<int> sptr, soff;  // kernel rows: per filter 7 lists (row masks 1-7) of (channel, ky) segments
  std::vector<float> sw;        // 3 weights per segment
  std::vector<int> pptr, poff;  // filter pairs: per pair, interleaved taps (A0 B0 A1 B1 ...)
  std::vector<float> pw;
};

static inline void load_acc(v16 (&a)[P], const float* part, bool first) {
  for (int i = 0; i < P; ++i) a[i] = first ? bc(0.f) : ld(part + i * 16);
}
static inline void save_acc(const v16 (&a)[P], float* dst, long stride) {
  for (int i = 0; i < P; ++i) st(dst + i * stride, a[i]);
}

// the runtime's loop over one block (pixels [x0, x0 + 8) of row y) and every chunk and filter
template <bool ONE>
static void taps(const float* X, int Wp, const std::vector<Chunk>& ch, int F, float* part, float* out, long oplane,
                 int y, int x0) {
  const float* base = X + ((long)y * Wp + x0) * 16;
  for (size_t q = 0; q < ch.size(); ++q) {
    const Chunk& c = ch[q];
    const int* off = ONE ? c.one.data() : c.off.data();
    for (int f = 0; f < F; ++f) {
      v16 a[P];
      float* pp = part + (long)f * P * 16;
      load_acc(a, pp, q == 0);
      for (int t = c.ptr[f]; t < c.ptr[f + 1]; ++t) {
        const v16 we = bc(c.w[t]);
        const float* b = base + off[t];
#pragma GCC unroll 8
        for (int i = 0; i < P; ++i) a[i] += we * ld(b + i * 16);
      }
      if (q + 1 < ch.size()) save_acc(a, pp, 16);
      else save_acc(a, out + f * oplane + ((long)y * (Wp - 2) + x0) * 16, 16);
    }
  }
}

template <int M>
static inline void segs(const float* base, const int* off, const float* w, int s0, int s1, v16 (&a)[P]) {
  for (int s = s0; s < s1; ++s) {
    const float* b = base + off[s];
    v16 wk[3];
#pragma GCC unroll 3
    for (int k = 0; k < 3; ++k)
      if (M >> k & 1) wk[k] = bc(w[3 * s + k]);
#pragma GCC unroll 10
    for (int ix = 0; ix < P + 2; ++ix) {
      bool need = false;
#pragma GCC unroll 3
      for (int k = 0; k < 3; ++k) need |= (M >> k & 1) && ix - k >= 0 && ix - k < P;
      if (!need) continue;
      const v16 v = ld(b + ix * 16);
#pragma GCC unroll 3
      for (int k = 0; k < 3; ++k)
        if ((M >> k & 1) && ix - k >= 0 && ix - k < P) a[ix - k] += wk[k] * v;
    }
  }
}

static void rows(const float* X, int Wp, const std::vector<Chunk>& ch, int F, float* part, float* out, long oplane,
                 int y, int x0) {
  const float* base = X + ((long)y * Wp + x0) * 16;
  for (size_t q = 0; q < ch.size(); ++q) {
    const Chunk& c = ch[q];
    for (int f = 0; f < F; ++f) {
      v16 a[P];
      float* pp = part + (long)f * P * 16;
      load_acc(a, pp, q == 0);
      const int* sp = c.sptr.data() + f * 8;
      segs<1>(base, c.soff.data(), c.sw.data(), sp[0], sp[1], a);
      segs<2>(base, c.soff.data(), c.sw.data(), sp[1], sp[2], a);
      segs<3>(base, c.soff.data(), c.sw.data(), sp[2], sp[3], a);
      segs<4>(base, c.soff.data(), c.sw.data(), sp[3], sp[4], a);
      segs<5>(base, c.soff.data(), c.sw.data(), sp[4], sp[5], a);
      segs<6>(base, c.soff.data(), c.sw.data(), sp[5], sp[6], a);
      segs<7>(base, c.soff.data(), c.sw.data(), sp[6], sp[7], a);
      if (q + 1 < ch.size()) save_acc(a, pp, 16);
      else save_acc(a, out + f * oplane + ((long)y * (Wp - 2) + x0) * 16, 16);
    }
  }
}

static void pairs(const float* X, int Wp, const std::vector<Chunk>& ch, int F, float* part, float* out, long oplane,
                  int y, int x0) {
  const float* base = X + ((long)y * Wp + x0) * 16;
  for (size_t q = 0; q < ch.size(); ++q) {
    const Chunk& c = ch[q];
    for (int f = 0; f < F; f += 2) {
      v16 a[P], b[P];
      float* pa = part + (long)f * P * 16;
      load_acc(a, pa, q == 0);
      load_acc(b, pa + P * 16, q == 0);
      for (int t = c.pptr[f / 2]; t < c.pptr[f / 2 + 1]; t += 2) {
        const v16 wa = bc(c.pw[t]), wb = bc(c.pw[t + 1]);
        const float* xa = base + c.poff[t];
        const float* xb = base + c.poff[t + 1];
#pragma GCC unroll 8
        for (int i = 0; i < P; ++i) {
          a[i] += wa * ld(xa + i * 16);
          b[i] += wb * ld(xb + i * 16);
        }
      }
      if (q + 1 < ch.size()) {
        save_acc(a, pa, 16);
        save_acc(b, pa + P * 16, 16);
      } else {
        save_acc(a, out + f * oplane + ((long)y * (Wp - 2) + x0) * 16, 16);
        save_acc(b, out + (f + 1) * oplane + ((long)y * (Wp - 2) + x0) * 16, 16);
      }
    }
  }
}

static void halves(const float* X, int Wp, const std::vector<Chunk>& ch, int F, float* part, float* out, long oplane,
                   int y, int x0) {
  const float* base = X + ((long)y * Wp + x0) * 16;
  for (size_t q = 0; q < ch.size(); ++q) {
    const Chunk& c = ch[q];
    for (int f = 0; f < F; ++f) {
      v8 a[2 * P];
      float* pp = part + (long)f * P * 16;
      for (int i = 0; i < 2 * P; ++i) a[i] = q == 0 ? bc8(0.f) : ld8(pp + i * 8);
      for (int t = c.ptr[f]; t < c.ptr[f + 1]; ++t) {
        const v8 we = bc8(c.w[t]);
        const float* b = base + c.off[t];
#pragma GCC unroll 16
        for (int i = 0; i < 2 * P; ++i) a[i] += we * ld8(b + i * 8);
      }
      float* dst = q + 1 < ch.size() ? pp : out + f * oplane + ((long)y * (Wp - 2) + x0) * 16;
      for (int i = 0; i < 2 * P; ++i) st8(dst + i * 8, a[i]);
    }
  }
}

static float* floats(long n) {
  float* p = static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64));
  std::fill(p, p + n, 0.f);
  return p;
}

int main(int argc, char** argv) {
  const int C = std::atoi(argv[1]), H = std::atoi(argv[2]), pattern = std::atoi(argv[3]), reps = std::atoi(argv[4]),
            rounds = std::atoi(argv[5]);
  const int F = C, W = H, Wp = W + 2, Hp = H + 2;
  const int K = std::max(1, std::min(C, 32768 / (3 * (P + 2) * 64) / 8 * 8));  // the runtime's chunk (32 KiB window)
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> u(-1.f, 1.f), p01(0.f, 1.f);
  float* X = floats((long)C * Hp * Wp * 16);
  for (int c = 0; c < C; ++c)
    for (int y = 0; y < H; ++y)
      for (int x = 0; x < W; ++x)
        for (int l = 0; l < 16; ++l) X[(((long)c * Hp + y + 1) * Wp + x + 1) * 16 + l] = u(rng);
  const int pats[8][4] = {{1, 3, 4, 5}, {1, 4, 5, 7}, {3, 4, 5, 7}, {1, 3, 4, 7},
                          {0, 1, 3, 4}, {1, 2, 4, 5}, {3, 4, 6, 7}, {4, 5, 7, 8}};
  std::vector<float> wt((long)F * C * 9, 0.f);
  for (int f = 0; f < F; ++f)
    for (int c = 0; c < C; ++c) {
      float* k = &wt[((long)f * C + c) * 9];
      if (pattern) {
        if (p01(rng) < 0.28f) for (int e : pats[rng() % 8]) k[e] = u(rng);
      } else {
        for (int e = 0; e < 9; ++e) if (p01(rng) < 0.1f) k[e] = u(rng);
      }
    }
  std::vector<Chunk> ch((C + K - 1) / K);
  long nnz = 0;
  for (size_t q = 0; q < ch.size(); ++q) {
    Chunk& t = ch[q];
    const int c0 = q * K, c1 = std::min(C, c0 + K);
    for (int f = 0; f < F; ++f) {
      t.ptr.push_back(t.off.size());
      for (int c = c0; c < c1; ++c)
        for (int e = 0; e < 9; ++e) {
          const float v = wt[((long)f * C + c) * 9 + e];
          if (v == 0.f) continue;
          t.off.push_back(((c * Hp + e / 3) * Wp + e % 3) * 16);
          t.one.push_back(((c0 * Hp + e / 3) * Wp + e % 3) * 16);
          t.w.push_back(v);
          ++nnz;
        }
      for (int m = 1; m <= 7; ++m) {
        t.sptr.push_back(t.soff.size());
        for (int c = c0; c < c1; ++c)
          for (int ky = 0; ky < 3; ++ky) {
            int mm = 0;
            for (int kx = 0; kx < 3; ++kx) mm |= (wt[((long)f * C + c) * 9 + ky * 3 + kx] != 0.f) << kx;
            if (mm != m) continue;
            t.soff.push_back((c * Hp + ky) * Wp * 16);
            for (int kx = 0; kx < 3; ++kx) t.sw.push_back(wt[((long)f * C + c) * 9 + ky * 3 + kx]);
          }
      }
      t.sptr.push_back(t.soff.size());
    }
    t.ptr.push_back(t.off.size());
    for (int f = 0; f < F; f += 2) {
      t.pptr.push_back(t.poff.size());
      const int na = t.ptr[f + 1] - t.ptr[f], nb = f + 1 < F ? t.ptr[f + 2] - t.ptr[f + 1] : 0, n = std::max(na, nb);
      for (int i = 0; i < n; ++i) {
        t.poff.push_back(i < na ? t.off[t.ptr[f] + i] : 0);
        t.pw.push_back(i < na ? t.w[t.ptr[f] + i] : 0.f);
        t.poff.push_back(i < nb ? t.off[t.ptr[f + 1] + i] : 0);
        t.pw.push_back(i < nb ? t.w[t.ptr[f + 1] + i] : 0.f);
      }
    }
    t.pptr.push_back(t.poff.size());
  }
  long padded_all = 0;
  for (auto& t : ch) padded_all += (long)t.poff.size() - (long)t.off.size();
  const long oplane = (long)H * W * 16;
  float* part = floats((long)F * P * 16);
  float* ref = floats((long)F * oplane);
  for (int f = 0; f < F; ++f)
    for (int c = 0; c < C; ++c)
      for (int e = 0; e < 9; ++e) {
        const float v = wt[((long)f * C + c) * 9 + e];
        if (v == 0.f) continue;
        for (int y = 0; y < H; ++y)
          for (int x = 0; x < W; ++x)
            for (int l = 0; l < 16; ++l)
              ref[f * oplane + ((long)y * W + x) * 16 + l] += v * X[(((long)c * Hp + y + e / 3) * Wp + x + e % 3) * 16 + l];
      }
  typedef void (*Fn)(const float*, int, const std::vector<Chunk>&, int, float*, float*, long, int, int);
  const char* names[5] = {"taps", "one-channel window", "kernel rows", "filter pairs", "256-bit"};
  Fn fns[5] = {&taps<false>, &taps<true>, &rows, &pairs, &halves};
  std::vector<float*> outs;
  for (int v = 0; v < 5; ++v) outs.push_back(floats((long)F * oplane));
  std::vector<std::vector<double>> t(5);
  for (int r = 0; r < rounds; ++r)
    for (int v = 0; v < 5; ++v) {
      double best = 1e30;
      for (int rep = 0; rep < reps; ++rep) {
        auto t0 = std::chrono::steady_clock::now();
        for (int y = 0; y < H; ++y)
          for (int x0 = 0; x0 < W; x0 += P) fns[v](X, Wp, ch, F, part, outs[v], oplane, y, x0);
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      t[v].push_back(best);
    }
  double mx = 0;
  for (long i = 0; i < F * oplane; ++i) mx = std::max(mx, (double)std::fabs(ref[i]));
  const double flop = 2.0 * nnz * H * W * 16;
  std::printf("{\"channels\": %d, \"map\": %d, \"pattern\": %s, \"density\": %.4f, \"chunk_channels\": %d, "
              "\"window_kib\": %.1f, \"pair_padding\": %.3f, \"variants\": [", C, H, pattern ? "true" : "false",
              (double)nnz / ((double)F * C * 9), K, K * 3.0 * (P + 2) * 64 / 1024, (double)padded_all / nnz);
  for (int v = 0; v < 5; ++v) {
    std::vector<double> ratio;
    for (int r = 0; r < rounds; ++r) ratio.push_back(t[0][r] / t[v][r]);
    std::sort(ratio.begin(), ratio.end());
    double err = -1;
    if (v != 1) {
      err = 0;
      for (long i = 0; i < F * oplane; ++i) err = std::max(err, (double)std::fabs(outs[v][i] - ref[i]));
      err /= mx;
    }
    std::printf("%s{\"variant\": \"%s\", \"gflops\": %.1f, \"ratio_to_taps\": %.3f, \"ratio_min\": %.3f, "
                "\"ratio_max\": %.3f, \"max_rel_err\": %.2e}", v ? ", " : "", names[v],
                flop / *std::min_element(t[v].begin(), t[v].end()) / 1e9, ratio[rounds / 2], ratio.front(),
                ratio.back(), err);
  }
  std::printf("]}\n");
}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["64x32", "128x16", "256x8"], help="CHANNELSxMAP (maps of 8+)")
    p.add_argument("--pattern", action="store_true", help="4-of-9 kernel patterns on 28%% of the kernels")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    rows = []
    for shape in a.shapes:
        c, hw = (int(v) for v in shape.split("x"))
        if hw % 8 or c % 2:
            raise SystemExit(f"{shape}: maps must be a multiple of 8 wide (one row of 8 pixels per block) and the "
                             "channel count even (the filter-pairs variant)")
        res, _, _ = build_and_run(SRC, [str(c), str(hw), str(int(a.pattern)), str(a.reps), str(a.rounds)],
                                  flags=("-std=c++17",))
        rows.append(res)
        for v in res["variants"]:
            err = "" if v["max_rel_err"] < 0 else f"  err {v['max_rel_err']:.1e}"
            print(f"C={c:<4d} {hw:>2d}x{hw:<2d} density {res['density']:.3f} (chunks of {res['chunk_channels']}): "
                  f"{v['variant']:<19s} {v['gflops']:6.1f} GFLOP/s  {v['ratio_to_taps']:.2f}x "
                  f"({v['ratio_min']:.2f}-{v['ratio_max']:.2f}){err}", flush=True)
        if any(v["max_rel_err"] > 1e-4 for v in res["variants"]):
            raise SystemExit(f"{shape}: a variant's output differs from the reference")
    out = a.out or RESULTS / f"lanes_loop_probe{'-pattern' if a.pattern else ''}-{cpu_slug(environment())}.json"
    save_probe("lanes_loop_probe", {"arguments": sys.argv[1:], "threads": 1, "images": 16, "pixels_per_block": 8,
                                    "reps": a.reps, "rounds": a.rounds, "shapes": rows}, out)


if __name__ == "__main__":
    main()
