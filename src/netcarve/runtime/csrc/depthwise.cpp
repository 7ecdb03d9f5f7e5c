// Depthwise conv (groups = in channels = out channels, one kh x kw filter per channel), fp32 NCHW, any stride /
// zero padding, dilation 1, with the bias (BN folded), a residual and ReLU fused into the store. The reference twin
// is F.conv2d(x, w, b, stride, pad, groups=C).
//
// Per (image, channel) plane: the plane is copied once into a thread-local buffer, zero-padded and split into S
// column phases (phase rx holds padded columns rx, rx + S, ...), so every tap (ky, kx) of an output row is one
// contiguous window: phase kx % S, row y * S + ky, from column x + kx / S. Each output row is computed in vectors
// over x, 4 rows at a time where the stride is 1 (an input row loaded once feeds up to kh of the 4 rows' sums),
// the kh * kw weights kept in registers as broadcasts; the tail of a row that is not a whole vector is computed in
// full (the buffer is padded for it) and stored element by element. Planes are split over the threads (torch's
// pool, nck::parallel_for: inside a plan's team region too). A depthwise layer does kh * kw multiply-adds per output,
// so it is bound by moving the plane, not by the FMAs.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

using namespace nck;

namespace {

constexpr int64_t MAXK = 49;  // taps held in registers (7 x 7); larger kernels loop over the weights from memory

// Vectors of W floats (W = the register width VL, or 8 / 4 for rows that narrow: 8 x 8 and 4 x 4 maps, where a
// full-width vector would compute mostly discarded lanes), through GCC's vector extensions
template <int W>
struct DV {
  typedef float v __attribute__((vector_size(W * 4)));
  typedef float vu __attribute__((vector_size(W * 4), aligned(4)));
  static inline v load(const float* p) { return *reinterpret_cast<const vu*>(p); }
  static inline void store(float* p, v a) { *reinterpret_cast<vu*>(p) = a; }
  static inline v splat(float x) { return v{} + x; }
  // ReLU as torch.relu: negatives to zero, a NaN stays NaN (the comparison is false for it)
  static inline v relu(v a) { return a < v{} ? v{} : a; }
};

template <int W, bool RELU>
static inline void store_tail(float* __restrict o, const float* __restrict r, typename DV<W>::v a, float bias,
                              int64_t n) {
  alignas(64) float t[W];
  DV<W>::store(t, a);
  for (int64_t i = 0; i < n; ++i) {
    float v = t[i] + bias + (r ? r[i] : 0.f);
    if (RELU) v = v < 0.f ? 0.f : v;  // (as DV::relu)
    o[i] = v;
  }
}

template <int W, bool RELU>
static inline void store_vec(float* __restrict o, const float* __restrict rr, typename DV<W>::v a, float bias,
                             int64_t left) {
  using D = DV<W>;
  if (left >= W) {
    typename D::v v = a + D::splat(bias);
    if (rr) v += D::load(rr);
    if (RELU) v = D::relu(v);
    D::store(o, v);
  } else {
    store_tail<W, RELU>(o, rr, a, bias, left);
  }
}

// every output row of one plane from the phase buffer pb (phase stride ps, row stride Wb), in vectors of W floats
template <int W, bool RELU>
static void plane_rows(const float* __restrict pb, int64_t ps, int64_t Wb, const float* __restrict w, int64_t kh,
                       int64_t kw, int64_t S, int64_t Wo, float bias, const float* __restrict res, float* __restrict out,
                       int64_t Ho) {
  using D = DV<W>;
  using V = typename D::v;
  const int64_t KK = kh * kw;
  std::vector<V> wvv;
  V wv_local[MAXK];
  V* wv = wv_local;
  if (KK > MAXK) {
    wvv.resize(KK);
    wv = wvv.data();
  }
  for (int64_t t = 0; t < KK; ++t) wv[t] = D::splat(w[t]);
  int64_t y = 0;
  if (S == 1) {
    // 4 output rows per pass: input row iy = y + r feeds output rows y + r - ky for the taps of row ky
    for (; y + 4 <= Ho; y += 4) {
      for (int64_t x0 = 0; x0 < Wo; x0 += W) {
        V a0 = V{}, a1 = a0, a2 = a0, a3 = a0;
        for (int64_t r = 0; r < kh + 3; ++r) {
          const float* row = pb + (y + r) * Wb + x0;
          for (int64_t kx = 0; kx < kw; ++kx) {
            const V v = D::load(row + kx);
            if (r < kh) a0 += wv[r * kw + kx] * v;
            if (r >= 1 && r - 1 < kh) a1 += wv[(r - 1) * kw + kx] * v;
            if (r >= 2 && r - 2 < kh) a2 += wv[(r - 2) * kw + kx] * v;
            if (r >= 3 && r - 3 < kh) a3 += wv[(r - 3) * kw + kx] * v;
          }
        }
        const V acc[4] = {a0, a1, a2, a3};
        for (int64_t j = 0; j < 4; ++j)
          store_vec<W, RELU>(out + (y + j) * Wo + x0, res ? res + (y + j) * Wo + x0 : nullptr, acc[j], bias,
                             Wo - x0);
      }
    }
  }
  for (; y < Ho; ++y) {
    for (int64_t x0 = 0; x0 < Wo; x0 += W) {
      V a = V{};
      for (int64_t ky = 0; ky < kh; ++ky) {
        const float* row = pb + (y * S + ky) * Wb + x0;
        for (int64_t kx = 0; kx < kw; ++kx) a += wv[ky * kw + kx] * D::load(row + (kx % S) * ps + kx / S);
      }
      store_vec<W, RELU>(out + y * Wo + x0, res ? res + y * Wo + x0 : nullptr, a, bias, Wo - x0);
    }
  }
}

// the vector width for rows of Wo outputs: the register's, or the narrowest of 8 / 4 that holds a whole row
static int64_t row_width(int64_t Wo) { return Wo <= 4 ? 4 : Wo <= 8 && VL > 8 ? 8 : VL; }

template <bool RELU>
static void plane_rows_any(int64_t vw, const float* pb, int64_t ps, int64_t Wb, const float* w, int64_t kh, int64_t kw,
                           int64_t S, int64_t Wo, float bias, const float* res, float* out, int64_t Ho) {
  if (vw == 4) return plane_rows<4, RELU>(pb, ps, Wb, w, kh, kw, S, Wo, bias, res, out, Ho);
  if (vw == 8) return plane_rows<8, RELU>(pb, ps, Wb, w, kh, kw, S, Wo, bias, res, out, Ho);
  plane_rows<VL, RELU>(pb, ps, Wb, w, kh, kw, S, Wo, bias, res, out, Ho);
}

}  // namespace

torch::Tensor depthwise_conv2d(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias,
                               c10::optional<torch::Tensor> residual, int64_t stride, int64_t pad, bool relu) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32, "depthwise_conv2d: x must be (N, C, H, W) float32");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.scalar_type() == torch::kFloat32,
              "depthwise_conv2d: weight must be (C, 1, kh, kw) float32, got ", weight.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(weight.size(0) == C, "depthwise_conv2d: ", weight.size(0), " filters for ", C,
              " input channels (a depthwise conv has one per channel)");
  TORCH_CHECK(stride >= 1 && pad >= 0, "depthwise_conv2d: bad stride / padding");
  const int64_t S = stride, Hp = H + 2 * pad, Wp = W + 2 * pad;
  TORCH_CHECK(Hp >= kh && Wp >= kw, "depthwise_conv2d: input smaller than the kernel");
  const int64_t Ho = (Hp - kh) / S + 1, Wo = (Wp - kw) / S + 1;
  x = x.contiguous();
  auto w = weight.contiguous();
  torch::Tensor b, r;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == torch::kFloat32 && b.numel() == C, "depthwise_conv2d: bias must be ", C,
                " float32 values");
  }
  auto out = torch::empty({N, C, Ho, Wo}, x.options());
  if (residual.has_value() && residual->defined()) {
    r = residual->contiguous();
    TORCH_CHECK(r.sizes() == out.sizes() && r.scalar_type() == torch::kFloat32,
                "depthwise_conv2d: residual shape differs from the output");
  }
  // phase buffer: S phases of Hb rows x Wb floats; Wb covers the widest window of a row (the last vector read
  // in full from column Wo rounded up to a vector, plus the taps' kw / S) with a vector of slack
  const int64_t vw = row_width(Wo);
  const int64_t Wph = (Wp + S - 1) / S, Wv = (Wo + vw - 1) / vw * vw;
  const int64_t Wb = std::max<int64_t>(Wph, Wv + (kw - 1) / S) + VL;
  const int64_t Hb = std::max<int64_t>(Hp, (Ho + 3) * S + kh);  // (the 4-row pass reads up to row y + kh + 2)
  const int64_t ps = Hb * Wb, bfloats = S * ps;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* rp = r.defined() ? r.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t per_plane = Ho * Wo * kh * kw;
  const int64_t grain = std::max<int64_t>(1, g_parallel_threshold / std::max<int64_t>(1, per_plane));
  const nck::PhaseCols pc(S, pad);
  nck::parallel_for(0, N * C, grain, [&](int64_t p0, int64_t p1) {
    // the padded plane, column phase rx = (padded column) % S at pb + rx * ps. Only the input's own positions
    // are written per plane: the padding stays zero from when the buffer was last laid out for this geometry
    thread_local std::vector<float> buf;
    thread_local int64_t laid[6] = {-1, -1, -1, -1, -1, -1};
    const int64_t geom[6] = {H, W, S, pad, Wb, Hb};
    if ((int64_t)buf.size() < bfloats || !std::equal(geom, geom + 6, laid)) {
      if ((int64_t)buf.size() < bfloats) buf.resize(bfloats);
      std::fill(buf.begin(), buf.end(), 0.f);
      std::copy(geom, geom + 6, laid);
    }
    float* pb = buf.data();
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % C;
      const float* src = xp + p * H * W;
      for (int64_t iy = 0; iy < H; ++iy) {
        const float* sr = src + iy * W;
        const int64_t py = iy + pad;
        if (S == 1) {
          std::copy(sr, sr + W, pb + py * Wb + pad);
          continue;
        }
#if defined(__AVX512F__)
        if (S == 2) {  // both column phases by vector permutes
          const int64_t re = pc.x0[0] == 0 ? 0 : 1;  // the phase of the even columns
          nck::split_even_odd(sr, W, pb + re * ps + py * Wb + pc.dx[re], pb + (1 - re) * ps + py * Wb + pc.dx[1 - re]);
          continue;
        }
#endif
        for (int64_t rx = 0; rx < S; ++rx) {  // input columns ix with (ix + pad) % S == rx, in order
          float* d = pb + rx * ps + py * Wb + pc.dx[rx];
          for (int64_t ix = pc.x0[rx]; ix < W; ix += S) *d++ = sr[ix];
        }
      }
      const float bias_c = bp ? bp[c] : 0.f;
      const float* res_p = rp ? rp + p * Ho * Wo : nullptr;
      if (relu)
        plane_rows_any<true>(vw, pb, ps, Wb, wp + c * kh * kw, kh, kw, S, Wo, bias_c, res_p, op + p * Ho * Wo, Ho);
      else
        plane_rows_any<false>(vw, pb, ps, Wb, wp + c * kh * kw, kh, kw, S, Wo, bias_c, res_p, op + p * Ho * Wo, Ho);
    }
  });
  return out;
}
