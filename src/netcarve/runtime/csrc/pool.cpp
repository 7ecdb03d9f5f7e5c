// max_pool2d: max pooling of an NCHW fp32 tensor (dilation 1), the semantics of torch's max_pool2d: padding is
// -inf (never selected), ceil_mode windows that would start in the right / bottom padding are dropped, and a NaN
// in a window makes that output NaN. Parallel over the N * C planes; each window's rows are reduced with
// vector maxes across the whole row, then its columns. Measured on a Zen 3 VM (2 threads, torch 2.13): ATen's
// max_pool2d took 219 us on a 64 x 32 x 32 input at batch 1 and 13.8 ms at batch 64, 14% of a pattern-sparse
// VGG-16's time in netcarve's plan at batch 1. The reference twin is F.max_pool2d.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

using namespace nck;

bool g_native_pool = true;
bool g_native_clamp = true;
bool g_pool_flat = true;

namespace {

// max with NaN propagation (torch's rule: a NaN input wins)
static inline float maxnan(float m, float v) { return (v > m || std::isnan(v)) ? v : m; }
static inline vecf vmaxnan(vecf m, vecf v) {
  return (v > m) | (v != v) ? v : m;  // lane-wise: v where v > m or v is NaN
}

int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, bool ceil_mode) {
  const int64_t span = in + 2 * p - k;
  int64_t out = (ceil_mode ? (span + s - 1) / s : span / s) + 1;
  // torch: the last window must start inside the input or the left padding
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

// One plane: per output row, the max over the window's rows for every input column (vectorised over the row),
// then over each output's window columns. Rows wider than the buffer are pooled in column chunks.
constexpr int64_t MROW = 2048;

void pool_plane(const float* __restrict src, float* __restrict dst, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  alignas(64) float m[MROW];
  // output columns [c0, c1) read input columns [c0 * sw - pw, (c1 - 1) * sw - pw + kw) clipped to the input
  const int64_t per_chunk = std::max<int64_t>(1, (MROW - kw) / sw + 1);
  for (int64_t c0 = 0; c0 < Wo; c0 += per_chunk) {
    const int64_t c1 = std::min<int64_t>(Wo, c0 + per_chunk);
    const int64_t xa = std::max<int64_t>(0, c0 * sw - pw), xb = std::min<int64_t>(W, (c1 - 1) * sw - pw + kw);
    const int64_t w = xb - xa;
    for (int64_t oy = 0; oy < Ho; ++oy) {
      const int64_t y0 = std::max<int64_t>(0, oy * sh - ph), y1 = std::min<int64_t>(H, oy * sh - ph + kh);
      const float* r = src + y0 * W + xa;
      int64_t x = 0;
      for (; x < w; ++x) m[x] = r[x];
      for (int64_t y = y0 + 1; y < y1; ++y) {
        r = src + y * W + xa;
        for (x = 0; x + VL <= w; x += VL) storeu(m + x, vmaxnan(loadu(m + x), loadu(r + x)));
        for (; x < w; ++x) m[x] = maxnan(m[x], r[x]);
      }
      float* o = dst + oy * Wo;
      if (kw == 2 && sw == 2 && pw == 0 && xb == 2 * c1) {  // whole 2-wide windows
        for (int64_t ox = c0; ox < c1; ++ox) o[ox] = maxnan(m[2 * ox - xa], m[2 * ox + 1 - xa]);
        continue;
      }
      for (int64_t ox = c0; ox < c1; ++ox) {
        const int64_t x0 = std::max<int64_t>(0, ox * sw - pw), x1 = std::min<int64_t>(W, ox * sw - pw + kw);
        float v = m[x0 - xa];
        for (int64_t xx = x0 + 1; xx < x1; ++xx) v = maxnan(v, m[xx - xa]);
        o[ox] = v;
      }
    }
  }
}

#if defined(__AVX512F__)
// 2x2 windows at stride 2 without padding over even H and W of 2-32 columns (VGG's 32x32 to 2x2 maps): the planes
// are one sequence of row pairs (2W floats -> W/2 outputs, never crossing a plane as H is even), so every 64 input
// floats (whole row pairs, as 2W divides 64) give 16 consecutive outputs: the maxima of adjacent columns by two
// permutes of each two vectors, then of the two rows of each pair by two more. The per-plane path below ran an 8x8
// or 4x4 plane through scalar loops: 16 us for a 256 x 8 x 8 input at batch 1, 1.5 ms for 64 x 512 x 4 x 4 (Zen 4
// VM, 2 threads), more than ATen.
void pool2x2_flat(const float* __restrict src, float* __restrict dst, int64_t W, int64_t outputs) {
  alignas(64) int32_t ie[16], io[16], it[16], ib[16];
  const int64_t half = W / 2;
  for (int l = 0; l < 16; ++l) {
    ie[l] = 2 * l;
    io[l] = 2 * l + 1;
    it[l] = (int32_t)((l / half) * W + l % half);
    ib[l] = it[l] + (int32_t)half;
  }
  const __m512i pe = _mm512_load_si512(ie), po = _mm512_load_si512(io), pt = _mm512_load_si512(it),
                pb = _mm512_load_si512(ib);
  auto mx = [](__m512 m, __m512 v) {  // vmaxnan: v where v > m or v is NaN
    const __mmask16 k = _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_mov_ps(m, k, v);
  };
  const int64_t chunks = outputs / 16;
  const int64_t grain = 256;  // 16k input floats per task
  nck::parallel_for(0, chunks, grain, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const float* s = src + j * 64;
      const __m512 v0 = _mm512_loadu_ps(s), v1 = _mm512_loadu_ps(s + 16), v2 = _mm512_loadu_ps(s + 32),
                   v3 = _mm512_loadu_ps(s + 48);
      const __m512 h0 = mx(_mm512_permutex2var_ps(v0, pe, v1), _mm512_permutex2var_ps(v0, po, v1));
      const __m512 h1 = mx(_mm512_permutex2var_ps(v2, pe, v3), _mm512_permutex2var_ps(v2, po, v3));
      _mm512_storeu_ps(dst + j * 16, mx(_mm512_permutex2var_ps(h0, pt, h1), _mm512_permutex2var_ps(h0, pb, h1)));
    }
  });
  for (int64_t o = chunks * 16; o < outputs; ++o) {  // the last outputs (fewer than 16)
    const float* s = src + (o / half) * 2 * W + 2 * (o % half);
    dst[o] = maxnan(maxnan(s[0], s[1]), maxnan(s[W], s[W + 1]));
  }
}
#endif

}  // namespace

torch::Tensor max_pool2d(torch::Tensor x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                         bool ceil_mode) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32, "max_pool2d: x must be (N, C, H, W) float32");
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && ph >= 0 && pw >= 0, "max_pool2d: bad geometry");
  TORCH_CHECK(2 * ph <= kh && 2 * pw <= kw, "max_pool2d: padding must be at most half the kernel");
  TORCH_CHECK(kw <= MROW, "max_pool2d: windows wider than ", MROW, " columns are not supported");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H + 2 * ph >= kh && W + 2 * pw >= kw, "max_pool2d: a ", H, "x", W, " input (padded by ", ph, ", ", pw,
              ") is smaller than the ", kh, "x", kw, " window");
  const int64_t Ho = pooled_size(H, kh, sh, ph, ceil_mode), Wo = pooled_size(W, kw, sw, pw, ceil_mode);
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "max_pool2d: output would be empty for a ", H, "x", W, " input");
  auto out = torch::empty({N, C, Ho, Wo}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
#if defined(__AVX512F__)
  if (g_pool_flat && kh == 2 && kw == 2 && sh == 2 && sw == 2 && ph == 0 && pw == 0 && H % 2 == 0 &&
      32 % W == 0) {  // W in {2, 4, 8, 16, 32} (W >= kw)
    pool2x2_flat(xp, op, W, N * C * Ho * Wo);
    return out;
  }
#endif
  const int64_t planes = N * C, per_plane = std::max<int64_t>(1, H * W);
  // about 16k input floats per task: small layers stay on the calling thread
  const int64_t grain = std::max<int64_t>(1, ((int64_t)1 << 14) / per_plane);
  nck::parallel_for(0, planes, grain, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const float* s = xp + p * H * W;
      float* d = op + p * Ho * Wo;
      pool_plane(s, d, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw);
    }
  });
  return out;
}

// Global average pooling: (N, C, H, W) -> (N, C, 1, 1), the mean of each plane (vector partial sums, then the
// lanes). The reference twin is x.mean((2, 3), keepdim=True).
torch::Tensor global_avg_pool(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32, "global_avg_pool: x must be (N, C, H, W) float32");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK(HW > 0, "global_avg_pool: empty planes");
  auto out = torch::empty({N, C, 1, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, ((int64_t)1 << 15) / HW);
  nck::parallel_for(0, N * C, grain, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const float* s = xp + p * HW;
      vecf a0 = bcast(0.f), a1 = a0;
      int64_t i = 0;
      for (; i + 2 * VL <= HW; i += 2 * VL) {
        a0 += loadu(s + i);
        a1 += loadu(s + i + VL);
      }
      for (; i + VL <= HW; i += VL) a0 += loadu(s + i);
      a0 += a1;
      float sum = 0.f;
      for (int64_t l = 0; l < VL; ++l) sum += a0[l];
      for (; i < HW; ++i) sum += s[i];
      op[p] = sum / (float)HW;
    }
  });
  return out;
}

// The option-A shortcut of CIFAR ResNets: x subsampled by `stride` in both spatial dims (rows and columns 0,
// stride, 2 * stride, ...), its channels placed into `channels` output channels: at [before, before + C) with zeros
// around them, or, given src / dst (int64), output channel dst[i] = input channel src[i] and zeros elsewhere (a
// channel-pruned model's map). The reference twin: slicing + constant_pad_nd / index_copy_ (plan.py).
torch::Tensor shortcut_subsample(torch::Tensor x, int64_t stride, int64_t channels, int64_t before,
                                 c10::optional<torch::Tensor> src, c10::optional<torch::Tensor> dst) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32, "shortcut: x must be (N, C, H, W) float32");
  TORCH_CHECK(stride >= 1 && channels >= 1, "shortcut: bad stride / channels");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), S = stride;
  const int64_t Ho = (H + S - 1) / S, Wo = (W + S - 1) / S;
  std::vector<int64_t> from(channels, -1);  // input channel of each output channel, -1: zeros
  if (src.has_value() && src->defined()) {
    TORCH_CHECK(dst.has_value() && dst->defined() && src->numel() == dst->numel() &&
                    src->scalar_type() == torch::kLong && dst->scalar_type() == torch::kLong,
                "shortcut: src / dst must be int64 index tensors of one length");
    auto sc = src->contiguous(), dc = dst->contiguous();
    const int64_t* s = sc.data_ptr<int64_t>();
    const int64_t* d = dc.data_ptr<int64_t>();
    for (int64_t i = 0; i < sc.numel(); ++i) {
      TORCH_CHECK(s[i] >= 0 && s[i] < C && d[i] >= 0 && d[i] < channels, "shortcut: channel map out of range");
      from[d[i]] = s[i];
    }
  } else {
    TORCH_CHECK(before >= 0 && before + C <= channels, "shortcut: ", C, " channels do not fit into ", channels,
                " at offset ", before);
    for (int64_t c = 0; c < C; ++c) from[before + c] = c;
  }
  auto out = torch::empty({N, channels, Ho, Wo}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, ((int64_t)1 << 15) / std::max<int64_t>(1, Ho * Wo));
  nck::parallel_for(0, N * channels, grain, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t n = p / channels, c = from[p % channels];
      float* o = op + p * Ho * Wo;
      if (c < 0) {
        std::fill(o, o + Ho * Wo, 0.f);
        continue;
      }
      const float* s = xp + (n * C + c) * H * W;
      for (int64_t y = 0; y < Ho; ++y)
        for (int64_t xx = 0; xx < Wo; ++xx) o[y * Wo + xx] = s[y * S * W + xx * S];
    }
  });
  return out;
}

torch::Tensor clamp_native(torch::Tensor x, double lo, double hi, bool in_place) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "clamp: x must be float32");
  TORCH_CHECK(!(lo > hi), "clamp: lower bound ", lo, " above the upper bound ", hi);
  torch::Tensor src = x.contiguous();
  torch::Tensor out = in_place && src.is_same(x) ? x : torch::empty_like(src);
  const float l = (float)lo, h = (float)hi;
  const vecf vl = bcast(l), vh = bcast(h);
  const float* sp = src.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = src.numel();
  nck::parallel_for(0, (n + VL - 1) / VL, 2048, [&](int64_t b, int64_t e) {
    const int64_t i1 = std::min<int64_t>(n, e * VL);
    int64_t i = b * VL;
    for (; i + VL <= i1; i += VL) {
      vecf v = loadu(sp + i);
      v = v < vl ? vl : v;  // (comparisons are false for NaN: it passes through, as in torch.clamp)
      v = v > vh ? vh : v;
      storeu(op + i, v);
    }
    for (; i < i1; ++i) {
      float v = sp[i];
      v = v < l ? l : v;
      op[i] = v > h ? h : v;
    }
  });
  return out;
}
