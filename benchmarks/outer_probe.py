"""Would generated code that keeps 16 *output channels* in registers (an outer product per im2col row) beat
netcarve's batched sparse-conv loop at large batches? A standalone C++ microbenchmark, one thread, both variants on
the same layer side by side in one process.

netcarve's large-batch path for small maps (``sparse_conv2d_batched`` in ``csrc/sparse_conv.cpp``) is
output-stationary per filter: for every filter, every tap loads a vector of im2col columns and does one FMA with the
tap's broadcast weight, so every FMA needs its own vector load (from a 48 KiB block: mostly L2 on this Zen 4, whose
L1D is 32 KiB), and each filter's accumulators are loaded and stored once per K-tile. On VGG-16 at batch 64 those
layers run at 40-55 useful GMAC/s on 2 threads against DeepSparse's ~2x. The variant probed here is what a code
generator with the layer's sparsity known at compile time can do instead:

- ``generic``: the runtime's loop (``accumulate_add<8>``): a column tile of 8 vectors (128 im2col columns), K cut
  into tiles of 96 rows (48 KiB blocks), every filter's 8 accumulators loaded, its taps in the tile added, stored;
- ``outer``: per column tile of one vector (16 columns; its K x 16 im2col block, 147 KiB for K = 2304, stays in L2)
  and per block of 16 filters, one generated function holds the 16 filters' accumulators in 16 registers for all
  of K: each im2col row any of them uses is loaded once and feeds every one of those filters' FMAs, with the weights
  as constants (embedded broadcasts). Each vector load then serves ~1.6 FMAs at 10% density instead of one.

The gathers that build the im2col blocks are the same work for both and are left out; each variant reads a block
buffer that stays in cache as a freshly gathered one would (correctness is checked on distinct blocks).

    python benchmarks/outer_probe.py --out benchmarks/results/outer_probe-zen4.json

Needs g++ with -march=native and AVX-512. Prints and writes per-layer times (minimum over rounds), the median of
per-round ratios, useful GMAC/s, the generated code size and compile time, and the environment.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from _cxx_probe import build_and_run, median, write_results

# (C = F, output positions, density): VGG-16's 128-channel layers (K = 1152) and 256-channel 8x8 ones (K = 2304)
# at 90% unstructured sparsity, the 256-channel one also at pattern + connectivity density (12.3%)
LAYERS = [(128, 0.10), (256, 0.10), (256, 0.123)]

SRC_HEAD = r"""
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>
typedef float vecf __attribute__((vector_size(64)));
typedef float vecfu __attribute__((vector_size(64), aligned(4)));
static inline vecf loadu(const float* p) { return *reinterpret_cast<const vecfu*>(p); }
static inline void storeu(float* p, vecf v) { *reinterpret_cast<vecfu*>(p) = v; }
static inline vecf bcast(float w) { return (vecf)_mm512_set1_ps(w); }
// the runtime's accumulate_add<8>
__attribute__((noinline)) static void accumulate_add8(const float* __restrict in, const int32_t* __restrict off,
    const float* __restrict w, int64_t ntaps, float* __restrict acc) {
  vecf a[8];
  for (int i = 0; i < 8; ++i) a[i] = loadu(acc + i * 16);
  for (int64_t e = 0; e < ntaps; ++e) {
    const float* s = in + off[e];
    const vecf we = bcast(w[e]);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) a[i] += we * loadu(s + i * 16);
  }
  for (int i = 0; i < 8; ++i) storeu(acc + i * 16, a[i]);
}
typedef void (*outfn)(const float* __restrict x, float* __restrict acc);
"""

SRC_MAIN = r"""
int main(int argc, char** argv) {
  const int REPS = argc > 1 ? atoi(argv[1]) : 20, ROUNDS = argc > 2 ? atoi(argv[2]) : 30;
  const int64_t NT = (K + BR - 1) / BR;  // K-tiles of the generic loop
  // distinct data: X (K x 128 columns) as the generic loop's blocks [tile][row][128] and as the outer variant's
  // column blocks [coltile][row][16]
  std::vector<float> blocks(NT * BR * 128, 0.f), cols(8 * K * 16);
  for (int64_t r = 0; r < K; ++r)
    for (int64_t j = 0; j < 128; ++j) {
      const float v = (float)(((r * 131 + j) * 2654435761u) % 1000) / 1000.f - 0.5f;
      blocks[(r / BR) * BR * 128 + (r % BR) * 128 + j] = v;
      cols[(j / 16) * K * 16 + r * 16 + j % 16] = v;
    }
  std::vector<float> acc(F * 128), y0(F * 128), y1(F * 128);
  // generic: one column tile of 128 columns, every K-tile's block, every filter
  auto generic = [&](bool distinct, float* y) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t k = 0; k < NT; ++k) {
      const float* blk = blocks.data() + (distinct ? k : 0) * BR * 128;
      for (int64_t f = 0; f < F; ++f) {
        const int32_t t0 = KPTR[k * F + f], t1 = KPTR[k * F + f + 1];
        if (t0 < t1) accumulate_add8(blk, KOFF + t0, KW + t0, t1 - t0, acc.data() + f * 128);
      }
    }
    for (int64_t f = 0; f < F; ++f)
      for (int64_t j = 0; j < 128; ++j) y[f * 128 + j] = acc[f * 128 + j];
  };
  // outer: 8 column tiles of 16, every block of 16 filters (writes y[f][16 columns] per tile)
  std::vector<float> ytile(8 * F * 16);
  auto outer = [&](bool distinct, float* y) {
    // K in chunks of KC rows (a column tile's chunk, KC x 64 bytes, stays in L1 while every filter block's
    // generated function for that chunk adds into its 16 accumulators, loaded and stored per chunk)
    std::fill(ytile.begin(), ytile.end(), 0.f);
    for (int64_t kc = 0; kc < NKC; ++kc)
      for (int64_t ct = 0; ct < 8; ++ct) {
        const float* x = cols.data() + (distinct ? ct : 0) * K * 16;
        for (int64_t b = 0; b < F / 16; ++b) GEN[b * NKC + kc](x, ytile.data() + (ct * (F / 16) + b) * 256);
      }
    for (int64_t ct = 0; ct < 8; ++ct)
      for (int64_t b = 0; b < F / 16; ++b)
        for (int64_t i = 0; i < 16; ++i)
          for (int64_t j = 0; j < 16; ++j)
            y[(b * 16 + i) * 128 + ct * 16 + j] = ytile[(ct * (F / 16) + b) * 256 + i * 16 + j];
  };
  generic(true, y0.data());
  outer(true, y1.data());
  double md = 0, mx = 0;
  for (size_t i = 0; i < y0.size(); ++i) { md = std::max(md, (double)std::fabs(y0[i] - y1[i])); mx = std::max(mx, (double)std::fabs(y0[i])); }
  printf("{\"max_abs_diff\": %g, \"max_abs\": %g, \"us\": [", md, mx);
  for (int r = 0; r < ROUNDS; ++r) {
    double t[2];
    for (int v = 0; v < 2; ++v) {
      auto a = std::chrono::steady_clock::now();
      for (int i = 0; i < REPS; ++i) { if (v == 0) generic(false, y0.data()); else outer(false, y1.data()); }
      t[v] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count() / REPS;
    }
    printf("%s[%.3f, %.3f]", r ? ", " : "", t[0], t[1]);
  }
  printf("]}\n");
}
"""


def layer_source(C: int, density: float, seed: int, KC: int = 384) -> tuple[str, int]:
    F, K, BR = C, C * 9, 96
    funcs: list[tuple[int, int, str]] = []
    rng = random.Random(seed)
    w = [{r: round(rng.uniform(-1, 1), 6) for r in range(K) if rng.random() < density} for _ in range(F)]
    nnz = sum(len(t) for t in w)
    # the generic loop's tile-major taps (as build_ktiles): per K-tile, per filter, offsets into the 128-wide block
    kptr, koff, kw = [0], [], []
    nt = (K + BR - 1) // BR
    for k in range(nt):
        for f in range(F):
            for r in sorted(t for t in w[f] if k * BR <= t < (k + 1) * BR):
                koff.append((r - k * BR) * 128)
                kw.append(w[f][r])
            kptr.append(len(koff))
    src = [SRC_HEAD, f"constexpr int64_t F = {F}, K = {K}, BR = {BR};",
           "static const int32_t KPTR[] = {" + ",".join(map(str, kptr)) + "};",
           "static const int32_t KOFF[] = {" + ",".join(map(str, koff)) + "};",
           "static const float KW[] = {" + ",".join(f"{v}f" for v in kw) + "};"]
    nkc = (K + KC - 1) // KC
    for b in range(F // 16):
        # each FMA as one instruction (inline asm): the accumulator is the destination and the weight an embedded
        # broadcast from the block's constant table (left to itself GCC picked vfmadd132ps forms that overwrite
        # the loaded row, plus register copies)
        wtab: list[float] = []
        for kc in range(nkc):
            body = [f"  vecf a{i} = loadu(acc + {i * 16});" for i in range(16)]
            for r in range(kc * KC, min(K, (kc + 1) * KC)):
                users = [i for i in range(16) if r in w[b * 16 + i]]
                if not users:
                    continue
                fmas = []
                for i in users:
                    fmas.append(f'asm("vfmadd231ps %[w]%{{1to16%}}, %[x], %[a]" : [a] "+v"(a{i}) : [x] "v"(x), '
                                f'[w] "m"(WB{b}[{len(wtab)}]));')
                    wtab.append(w[b * 16 + i][r])
                body.append(f"  {{ vecf x = loadu(xs + {r * 16}); asm(\"\" : \"+v\"(x)); " + " ".join(fmas) + " }")
            body += [f"  storeu(acc + {i * 16}, a{i});" for i in range(16)]
            src.append(f"static void gen{b}_{kc}(const float* __restrict xs, float* __restrict acc);")
            funcs.append((b, kc, "\n".join(body)))
        src.append(f"static const float WB{b}[] = {{" + ",".join(f"{v}f" for v in wtab) + "};")
    for b, kc, body in funcs:
        src.append(f"__attribute__((noinline)) static void gen{b}_{kc}(const float* __restrict xs, "
                   f"float* __restrict acc) {{\n{body}\n}}")
    src.append(f"constexpr int64_t NKC = {nkc};")
    src.append("static const outfn GEN[] = {" + ",".join(f"gen{b}_{kc}" for b in range(F // 16) for kc in range(nkc))
               + "};")
    src.append(SRC_MAIN)
    return "\n".join(src), nnz


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20, help="runs per variant per round (each: 128 output columns)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kc", type=int, default=384, help="im2col rows per generated chunk (outer variant)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    rows = []
    for C, dens in LAYERS:
        src, nnz = layer_source(C, dens, a.seed, a.kc)
        res, code, compile_s = build_and_run(src, [str(a.reps), str(a.rounds)], opt="-O2")
        us = res["us"]
        mins = {k: min(r[i] for r in us) for i, k in enumerate(("generic", "outer"))}
        macs = nnz * 128  # per run: every non-zero weight times 128 output columns
        row = {"layer": f"{C}x{C}x3x3 (K = {C * 9}), density {dens}", "channels": C, "density": dens,
               "nonzeros": nnz, "columns": 128, "kc": a.kc, "generated_code_bytes": code,
               "compile_seconds": round(compile_s, 1), "max_abs_diff": res["max_abs_diff"], "max_abs": res["max_abs"],
               "min_us": {k: round(v, 2) for k, v in mins.items()},
               "useful_gmacs_per_s": {k: round(macs / v / 1e3, 1) for k, v in mins.items()},
               "speedup_outer": round(median([r[0] / r[1] for r in us]), 3)}
        rows.append(row)
        print(f"{row['layer']:<40} code {code / 1024:7.1f} KiB ({compile_s:.0f} s)  generic "
              f"{mins['generic']:8.1f} us ({row['useful_gmacs_per_s']['generic']} GMAC/s)  outer "
              f"{mins['outer']:8.1f} us ({row['useful_gmacs_per_s']['outer']} GMAC/s)  x{row['speedup_outer']:.3f}"
              f"  max diff {res['max_abs_diff']:.1e}", flush=True)
    write_results("outer_probe", a.out, a.reps, a.rounds, rows)

if __name__ == "__main__":
    main()
