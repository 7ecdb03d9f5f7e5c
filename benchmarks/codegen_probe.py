"""Would per-layer code generation (PatDNN-style: a layer's sparsity known at compile time) beat netcarve's
generic tap loop? A standalone C++ microbenchmark of the row-layout sparse conv's inner loop, one thread, three
variants of the same layer side by side in one process:

- ``generic``: the runtime's loop (``accumulate_rows<8>`` in ``csrc/sparse_conv.cpp``): per tap, its offset and
  weight loaded from tables, 8 vector FMAs into registers; the 8 accumulators stored to a buffer, then the epilogue
  (bias + ReLU) reads them back and writes the output (``store_vecs``);
- ``fused``: the same loop with the epilogue applied to the registers (no buffer round trip);
- ``generated``: one function per filter with its taps unrolled, offsets as immediate displacements and weights as
  constants (and the fused epilogue): what a code generator would emit.

    python benchmarks/codegen_probe.py --out benchmarks/results/codegen_probe-zen4.json

Layers: random taps at the stated density over a C x 3 x 3 kernel (the loop's cost does not depend on which
positions), the input as the banded path's padded planes (row width W + 2), output rows of whole vectors (W a
multiple of the vector: the row layout). Each variant runs the whole layer (every filter over every 8-vector block)
``--reps`` times per round; per round all three run back to back, and the speedups are the medians over rounds of
the per-round ratios (this VM runs at two speeds for seconds at a time). Needs g++ with -march=native; AVX-512
only (the generated code uses 16-float vectors). Writes the per-layer times, ratios, taps per filter, the
generated code's size and the environment.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from _cxx_probe import build_and_run, median, write_results

VL = 16
# (C = F, H = W, density): ResNet-56's 16-channel 32x32 and 32-channel 16x16 layers at pattern + connectivity
# density (12.3%), the 16-channel one at 25%, and a 64-channel 16x16 layer (71 taps per filter)
LAYERS = [(16, 32, 0.123), (32, 16, 0.123), (16, 32, 0.25), (64, 16, 0.123)]

HEADER = r"""
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>
constexpr int64_t VL = 16;
typedef float vecf __attribute__((vector_size(VL * 4)));
typedef float vecfu __attribute__((vector_size(VL * 4), aligned(4)));
static inline vecf loadu(const float* p) { return *reinterpret_cast<const vecfu*>(p); }
static inline void storeu(float* p, vecf v) { *reinterpret_cast<vecfu*>(p) = v; }
static inline vecf bcast(float w) { return (vecf)_mm512_set1_ps(w); }
static inline vecf relu(vecf a) { return (vecf)_mm512_max_ps((__m512)a, _mm512_setzero_ps()); }
template <int NV>
__attribute__((noinline)) static void acc_rows(const float* __restrict in, const int64_t* __restrict voff,
    const int64_t* __restrict off, const float* __restrict w, int64_t nt, float* __restrict dst) {
  vecf a[NV]; const float* src[NV];
  for (int i = 0; i < NV; ++i) { a[i] = bcast(0.f); src[i] = in + voff[i]; }
  for (int64_t e = 0; e < nt; ++e) { const int64_t o = off[e]; const vecf we = bcast(w[e]);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) a[i] += we * loadu(src[i] + o); }
  for (int i = 0; i < NV; ++i) storeu(dst + i * VL, a[i]);
}
static void store_vecs(float* __restrict op, const int64_t* __restrict ooff, const float* __restrict acc, int nv,
                       float bias) {
  const vecf b = bcast(bias);
  for (int k = 0; k < nv; ++k) storeu(op + ooff[k], relu(loadu(acc + k * VL) + b));
}
template <int NV>
__attribute__((noinline)) static void acc_fused(const float* __restrict in, const int64_t* __restrict voff,
    const int64_t* __restrict off, const float* __restrict w, int64_t nt, float* __restrict op,
    const int64_t* __restrict ooff, float bias) {
  vecf a[NV]; const float* src[NV];
  for (int i = 0; i < NV; ++i) { a[i] = bcast(0.f); src[i] = in + voff[i]; }
  for (int64_t e = 0; e < nt; ++e) { const int64_t o = off[e]; const vecf we = bcast(w[e]);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) a[i] += we * loadu(src[i] + o); }
  const vecf b = bcast(bias);
  for (int i = 0; i < NV; ++i) storeu(op + ooff[i], relu(a[i] + b));
}
typedef void (*genfn)(const float* __restrict, const int64_t* __restrict, float* __restrict,
                      const int64_t* __restrict, float);
"""

MAIN = r"""
int main(int argc, char** argv) {
  const int REPS = argc > 1 ? atoi(argv[1]) : 100, ROUNDS = argc > 2 ? atoi(argv[2]) : 60;
  std::vector<float> in(C * PLANE + 64), out0(F * H * W), out1(F * H * W), out2(F * H * W);
  for (size_t i = 0; i < in.size(); ++i) in[i] = (float)((i * 2654435761u) % 1000) / 1000.f - 0.5f;
  const int64_t nvec = H * (W / VL);
  std::vector<int64_t> vin(nvec), vout(nvec);
  for (int64_t v = 0; v < nvec; ++v) {
    const int64_t y = v / (W / VL), x0 = (v % (W / VL)) * VL;
    vin[v] = y * WPH + x0; vout[v] = y * W + x0;
  }
  alignas(64) float acc[8 * VL];
  auto run0 = [&]() { for (int64_t v0 = 0; v0 < nvec; v0 += 8) for (int f = 0; f < F; ++f) {
      acc_rows<8>(in.data(), vin.data() + v0, OFF + PTR[f], WV + PTR[f], PTR[f + 1] - PTR[f], acc);
      store_vecs(out0.data() + f * H * W, vout.data() + v0, acc, 8, 0.01f); } };
  auto run1 = [&]() { for (int64_t v0 = 0; v0 < nvec; v0 += 8) for (int f = 0; f < F; ++f)
      acc_fused<8>(in.data(), vin.data() + v0, OFF + PTR[f], WV + PTR[f], PTR[f + 1] - PTR[f],
                   out1.data() + f * H * W, vout.data() + v0, 0.01f); };
  auto run2 = [&]() { for (int64_t v0 = 0; v0 < nvec; v0 += 8) for (int f = 0; f < F; ++f)
      GEN[f](in.data(), vin.data() + v0, out2.data() + f * H * W, vout.data() + v0, 0.01f); };
  run0(); run1(); run2();
  double md = 0;
  for (size_t i = 0; i < out0.size(); ++i) md = std::max(md, (double)std::fabs(out0[i] - out1[i]) + std::fabs(out0[i] - out2[i]));
  printf("{\"max_abs_diff\": %g, \"us\": [", md);
  for (int r = 0; r < ROUNDS; ++r) {
    double t[3];
    for (int k = 0; k < 3; ++k) {
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < REPS; ++i) { if (k == 0) run0(); else if (k == 1) run1(); else run2(); }
      t[k] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / REPS;
    }
    printf("%s[%.3f, %.3f, %.3f]", r ? ", " : "", t[0], t[1], t[2]);
  }
  printf("]}\n");
}
"""


def layer_source(C: int, W: int, density: float, seed: int) -> tuple[str, int]:
    F, H = C, W
    wph, plane = W + 2, (H + 2) * (W + 2)
    rng = random.Random(seed)
    taps = [[(c * plane + (k // 3) * wph + k % 3, round(rng.uniform(-1, 1), 6))
             for c in range(C) for k in range(9) if rng.random() < density] for _ in range(F)]
    ptr = [0]
    for t in taps:
        ptr.append(ptr[-1] + len(t))
    src = [HEADER, f"constexpr int64_t C = {C}, F = {F}, H = {H}, W = {W}, WPH = {wph}, PLANE = {plane};",
           "static const int64_t OFF[] = {" + ",".join(str(o) for t in taps for o, _ in t) + "};",
           "static const float WV[] = {" + ",".join(f"{w}f" for t in taps for _, w in t) + "};",
           "static const int64_t PTR[] = {" + ",".join(map(str, ptr)) + "};"]
    for f, t in enumerate(taps):
        body = [f"  const float* s{i} = in + voff[{i}]; vecf a{i} = bcast(0.f);" for i in range(8)]
        body += ["  { const vecf we = bcast(" + f"{w}f); " + " ".join(f"a{i} += we * loadu(s{i} + {o});" for i in range(8))
                 + " }" for o, w in t]
        body += ["  const vecf b = bcast(bias);"] + [f"  storeu(op + ooff[{i}], relu(a{i} + b));" for i in range(8)]
        src.append(f"__attribute__((noinline)) static void gen{f}(const float* __restrict in, const int64_t* __restrict voff, "
                   "float* __restrict op, const int64_t* __restrict ooff, float bias) {\n" + "\n".join(body) + "\n}")
    src.append("static const genfn GEN[] = {" + ",".join(f"gen{f}" for f in range(F)) + "};")
    src.append(MAIN)
    return "\n".join(src), ptr[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=100, help="whole-layer runs per variant per round")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    rows = []
    for C, W, dens in LAYERS:
        src, ntaps = layer_source(C, W, dens, a.seed)
        res, code, _ = build_and_run(src, [str(a.reps), str(a.rounds)])
        us = res["us"]
        row = {"layer": f"{C}x{C}x3x3 at {W}x{W}, batch 1", "channels": C, "width": W, "density": dens,
               "taps": ntaps, "taps_per_filter": round(ntaps / C, 1), "generated_code_bytes": code,
               "max_abs_diff": res["max_abs_diff"],
               "min_us": {k: round(min(r[i] for r in us), 2) for i, k in enumerate(("generic", "fused", "generated"))},
               "speedup_fused": round(median([r[0] / r[1] for r in us]), 3),
               "speedup_generated": round(median([r[0] / r[2] for r in us]), 3)}
        rows.append(row)
        print(f"{row['layer']:<32} {row['taps_per_filter']:5.1f} taps/filter  code {code / 1024:6.1f} KiB  "
              f"generic {row['min_us']['generic']:7.2f} us  fused x{row['speedup_fused']:.3f}  "
              f"generated x{row['speedup_generated']:.3f}", flush=True)
    write_results("codegen_probe", a.out, a.reps, a.rounds, rows)

if __name__ == "__main__":
    main()
