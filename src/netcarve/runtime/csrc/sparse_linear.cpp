// netcarve block-sparse (BSR) matmul and recurrent layers (fp32).
//
// bsr_linear: y (M, R) = x (M, K) @ W^T + bias with W stored as BSR tiles of bh x bw (netcarve.pack "bsr"
// layout: indptr per block row, block column per tile, tile values row-major). Per block row, the bh output
// rows keep one vector accumulator each over all tiles of the row (x's bw-wide slice loaded once per tile and
// shared by the bh rows); one horizontal sum per output at the end. Block rows are split over torch's thread
// pool when there is enough work.
//
// rnn_layer: one unidirectional LSTM / GRU layer over a (N, T, I) sequence, PyTorch's gate order and
// equations; the input projection of all time steps is one matmul, the recurrent one a matmul per step;
// either may be dense (ATen) or BSR.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
static inline v16 loadu(const float* p) { return *reinterpret_cast<const v16u*>(p); }
static inline v16 bcast16(float w) { return v16{w, w, w, w, w, w, w, w, w, w, w, w, w, w, w, w}; }

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
  for (int mm = 0; mm < MB; ++mm)
    for (int r = 0; r < RH; ++r) out[mm * BH + r0 + r] = hsum(acc[mm][r]);
}

template <int BH>
static void bsr_rows(const float* __restrict x, int64_t M, int64_t K, const int32_t* __restrict ptr,
                     const int32_t* __restrict idx, const float* __restrict val, int64_t bw, int64_t rb0,
                     int64_t rb1, const float* bias, float* __restrict y, int64_t R) {
  constexpr int RH = BH < RMAX ? BH : RMAX;  // tile rows per pass (AVX2: 16-row tiles in two passes)
  constexpr int MB = RH >= RMAX ? 1 : RMAX / RH;
  const bool vec = bw % RL == 0;
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

// Batched path (M >= 16): x transposed to xt (K, Mp), RL batch rows per vector, so no horizontal sums;
// MC vectors of batch rows at once reuse every broadcast weight MC times; tile rows [r0, r0 + RH) per pass.
// Output transposed: yt (R, Mp).
template <int BH, int RH, int MC>
static void bsr_rows_t(const float* __restrict xt, int64_t Mp, int64_t mv0, const int32_t* __restrict ptr,
                       const int32_t* __restrict idx, const float* __restrict val, int64_t bw, int64_t rb0,
                       int64_t rb1, const float* bias, float* __restrict yt, int64_t R) {
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
#pragma GCC unroll 4
          for (int k = 0; k < MC; ++k) xv[k] = rload(xc + c * Mp + k * RL);
#pragma GCC unroll 16
          for (int r = 0; r < RH; ++r) {
            const vr wv = rbcast(w[r * bw + c]);
#pragma GCC unroll 4
            for (int k = 0; k < MC; ++k) acc[r][k] += wv * xv[k];
          }
        }
      }
      for (int r = 0; r < RH; ++r) {
        const int64_t row = rb * BH + r0 + r;
        if (row >= R) break;
        const vr bv = rbcast(bias ? bias[row] : 0.f);
        for (int k = 0; k < MC; ++k) rstore(yt + row * Mp + (mv0 + k) * RL, acc[r][k] + bv);
      }
    }
  }
}

}  // namespace

torch::Tensor bsr_linear(torch::Tensor x, torch::Tensor indptr, torch::Tensor indices, torch::Tensor values,
                         c10::optional<torch::Tensor> bias, int64_t out_features) {
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
  auto y = torch::empty({M, R}, x.options());
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
  const int64_t grain = work < g_parallel_threshold ? RB : std::max<int64_t>(1, RB / (8 * at::get_num_threads()));
  if (M >= 16 && (bh == 1 || bh == 2 || bh == 4 || bh == 8 || bh == 16)) {
    const int64_t Mp = (M + 15) / 16 * 16, nmv = Mp / RL;
    auto xt = torch::zeros({Kp, Mp}, x.options());
    xt.narrow(1, 0, M).copy_(xp.t());
    auto yt = torch::empty({RB * bh, Mp}, x.options());
    const float* xtd = xt.data_ptr<float>();
    float* ytd = yt.data_ptr<float>();
    at::parallel_for(0, RB, grain, [&](int64_t b0, int64_t b1) {
      int64_t mv = 0;
      // batch vectors per pass: RH * MC <= RMAX accumulators (16 of 32 AVX-512 registers, 8 of 16 AVX2 ones)
      const int64_t mc = bh >= RMAX ? 1 : 2;
#define NC_BSR_T(BHV, RHV, MCV) bsr_rows_t<BHV, RHV, MCV>(xtd, Mp, mv, pd, id, vd, bw, b0, b1, bp, ytd, R)
      for (; mv + mc <= nmv; mv += mc) {
        switch (bh) {
          case 1: NC_BSR_T(1, 1, 2); break;
          case 2: NC_BSR_T(2, 2, 2); break;
          case 4: NC_BSR_T(4, 4, 2); break;
          case 8: if (RMAX > 8) NC_BSR_T(8, 8, 2); else NC_BSR_T(8, 8, 1); break;
          default: NC_BSR_T(16, RMAX, 1); break;
        }
      }
      for (; mv < nmv; ++mv) {
        switch (bh) {
          case 1: NC_BSR_T(1, 1, 1); break;
          case 2: NC_BSR_T(2, 2, 1); break;
          case 4: NC_BSR_T(4, 4, 1); break;
          case 8: NC_BSR_T(8, 8, 1); break;
          default: NC_BSR_T(16, RMAX, 1); break;
        }
      }
#undef NC_BSR_T
    });
    return yt.narrow(0, 0, R).narrow(1, 0, M).t().contiguous();
  }
  at::parallel_for(0, RB, grain, [&](int64_t b0, int64_t b1) {
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

torch::Tensor MatW::apply(const torch::Tensor& x) const {
  if (sparse) {
    c10::optional<torch::Tensor> b;
    if (bias.defined()) b = bias;
    return bsr_linear(x, ptr, idx, val, b, out);
  }
  return bias.defined() ? at::addmm(bias, x, w.t()) : at::mm(x, w.t());
}

static inline float sigm(float v) { return 1.f / (1.f + std::exp(-v)); }

// exp on 16 lanes: n = round(x / ln2), r = x - n ln2 (two-part ln2), degree-6 Taylor polynomial of e^r on
// |r| <= ln2/2 (relative error < 2e-7), times 2^n built in the exponent bits; x clamped to [-87, 88]
typedef int32_t v16i __attribute__((vector_size(64)));
static inline v16 vexp(v16 x) {
  const v16 hi = bcast16(88.f), lo = bcast16(-87.f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const v16 fn = x * bcast16(1.44269504088896341f);
  const v16i n = __builtin_convertvector(fn + (fn >= 0 ? bcast16(0.5f) : bcast16(-0.5f)), v16i);
  const v16 nf = __builtin_convertvector(n, v16);
  const v16 r = (x - nf * bcast16(0.693145751953125f)) - nf * bcast16(1.428606765330187e-06f);
  v16 p = bcast16(1.f / 720.f);
  p = p * r + bcast16(1.f / 120.f);
  p = p * r + bcast16(1.f / 24.f);
  p = p * r + bcast16(1.f / 6.f);
  p = p * r + bcast16(0.5f);
  p = p * r + bcast16(1.f);
  p = p * r + bcast16(1.f);
  const v16i bits = (n + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
static inline v16 vsigm(v16 x) { return bcast16(1.f) / (bcast16(1.f) + vexp(-x)); }
static inline v16 vtanh(v16 x) { return bcast16(1.f) - bcast16(2.f) / (vexp(x + x) + bcast16(1.f)); }

// x: (N, T, I); returns the (N, T, H) outputs of one LSTM (gates i, f, g, o) or GRU (r, z, n) layer.
torch::Tensor rnn_layer(const torch::Tensor& x, const MatW& ih, const MatW& hh, int64_t hidden, bool lstm) {
  const int64_t N = x.size(0), T = x.size(1), H = hidden, G = lstm ? 4 : 3;
  auto gx = ih.apply(x.reshape({N * T, x.size(2)})).reshape({N, T, G * H}).contiguous();
  auto out = torch::empty({N, T, H}, x.options());
  auto h = torch::zeros({N, H}, x.options());
  auto c = torch::zeros({N, H}, x.options());
  const float* gxp = gx.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    auto gh = hh.apply(h).contiguous();  // (N, G*H) with b_hh
    const float* ghp = gh.data_ptr<float>();
    auto hn = torch::empty({N, H}, x.options());
    float* hp = h.data_ptr<float>();
    float* hnp = hn.data_ptr<float>();
    float* cp = c.data_ptr<float>();
    for (int64_t n = 0; n < N; ++n) {
      const float* a = gxp + (n * T + t) * G * H;
      const float* b = ghp + n * G * H;
      int64_t k0 = 0;
      for (; k0 + 16 <= H; k0 += 16) {  // 16 hidden units at a time
        v16 hv;
        if (lstm) {
          const v16 i = vsigm(loadu(a + k0) + loadu(b + k0)), f = vsigm(loadu(a + H + k0) + loadu(b + H + k0));
          const v16 g = vtanh(loadu(a + 2 * H + k0) + loadu(b + 2 * H + k0));
          const v16 o = vsigm(loadu(a + 3 * H + k0) + loadu(b + 3 * H + k0));
          const v16 cv = f * loadu(cp + n * H + k0) + i * g;
          *reinterpret_cast<v16u*>(cp + n * H + k0) = cv;
          hv = o * vtanh(cv);
        } else {
          const v16 r = vsigm(loadu(a + k0) + loadu(b + k0)), z = vsigm(loadu(a + H + k0) + loadu(b + H + k0));
          const v16 nn = vtanh(loadu(a + 2 * H + k0) + r * loadu(b + 2 * H + k0));
          hv = (bcast16(1.f) - z) * nn + z * loadu(hp + n * H + k0);
        }
        *reinterpret_cast<v16u*>(hnp + n * H + k0) = hv;
        *reinterpret_cast<v16u*>(op + (n * T + t) * H + k0) = hv;
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
    h = hn;
  }
  return out;
}
