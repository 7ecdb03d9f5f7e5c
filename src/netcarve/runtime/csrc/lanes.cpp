// The lanes layout: 16 images in the 16 lanes of each vector, for runs of convs and poolings at batches of 16 and
// more. A lanes tensor is (G, C, H + 2, W + 2, 16) floats: G = ceil(N / 16) groups of 16 images (missing images
// are zeros), every plane with a one-pixel zero border, so that each tap of a 3x3 (or 1x1) conv at each output
// pixel is one aligned 64-byte load and one multiply-add: no lane shifts, no first / last row cases, and no
// padding copies (benchmarks/lanes_probe.py measured the layout standalone; docs/runtime.md "Images in the vector
// lanes"). A conv keeps a register block of P output pixels (16 images each) per filter and runs its taps in chunks
// of K input channels, so the chunk's window of input rows stays in L1 while every filter passes over it; the
// partial sums live in the output between chunks.
//
// Steps (plan.cpp): lanes_in (NCHW -> lanes), lanes_conv (stride 1 or 2, kernel 1x1 pad 0 or 3x3 pad 1, bias,
// residual and ReLU fused), lanes_pool (2x2 max pooling at stride 2 of even maps), lanes_out (lanes -> NCHW).
// The reference twins are in netcarve/runtime/plan.py (to_lanes / from_lanes around the plain PyTorch ops).
#include "kernels.h"

#include <cmath>

using namespace nck;

int64_t g_lanes_pixels = 8;       // output pixels per register block (16 images each)
int64_t g_lanes_chunk_bytes = 32768;  // a chunk's input window: at most this many bytes (rounded to 8 channels)

namespace {

typedef float v16 __attribute__((vector_size(64)));
static inline v16 ld(const float* p) { return *reinterpret_cast<const v16*>(p); }
static inline void st(float* p, v16 a) { *reinterpret_cast<v16*>(p) = a; }
static inline v16 bc(float w) {  // (one vbroadcastss: see nck::bcast)
#if defined(__AVX512F__)
  return (v16)_mm512_set1_ps(w);
#else
  v16 r;
  for (int i = 0; i < 16; ++i) r[i] = w;
  return r;
#endif
}
static inline v16 relu16(v16 a) {
  const v16 z = bc(0.f);
  return a > z ? a : z;
}

// acc[r][x] += w[t] * X[off[t] + (r * S * Wp + x * S) * 16] for the taps [t0, t1)
template <int R, int PW, int S>
static inline void block(const float* __restrict X, int64_t Wp, const int32_t* __restrict off,
                         const float* __restrict w, int64_t t0, int64_t t1, v16 (&acc)[R * PW]) {
  for (int64_t t = t0; t < t1; ++t) {
    const v16 we = bc(w[t]);
    const float* b = X + off[t];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int x = 0; x < PW; ++x) acc[r * PW + x] += we * ld(b + (r * S * Wp + x * S) * 16);
  }
}

struct ConvArgs {
  const float* X;
  float* Y;
  const float* res;  // lanes residual (the output's shape) or null
  const float* bias;
  const int32_t* ptr;  // (Q, F + 1)
  const int32_t* off;
  const float* w;
  int64_t C, H, W, F, Ho, Wo, Q, G;
  bool relu;
  bool pool;  // 2x2 max pooling at stride 2 fused: Y is (G, F, Ho / 2 + 2, Wo / 2 + 2, 16); blocks of 2 rows
};

// one job: group g, output rows [y0, y0 + R), columns [x0, x0 + PW), filters [f0, f1), every chunk
template <int R, int PW, int S>
void conv_job(const ConvArgs& a, int64_t g, int64_t y0, int64_t x0, int64_t f0, int64_t f1) {
  const int64_t Hp = a.H + 2, Wp = a.W + 2;
  const int64_t Hop = (a.pool ? a.Ho / 2 : a.Ho) + 2, Wop = (a.pool ? a.Wo / 2 : a.Wo) + 2;
  const float* Xg = a.X + g * a.C * Hp * Wp * 16 + (y0 * S * Wp + x0 * S) * 16;
  const int64_t yplane = Hop * Wop * 16;
  float* Yg = a.Y + g * a.F * yplane + (a.pool ? ((1 + y0 / 2) * Wop + 1 + x0 / 2) : ((1 + y0) * Wop + 1 + x0)) * 16;
  const float* Rg = a.res ? a.res + g * a.F * yplane + ((1 + y0) * Wop + 1 + x0) * 16 : nullptr;
  // partial sums between chunks: per filter R * PW vectors, contiguous in a per-thread buffer (a pooled output has
  // no room for them; measured level with keeping them in the output where it has)
  thread_local std::vector<v16> scratch;
  if (a.Q > 1 && (int64_t)scratch.size() < (f1 - f0) * R * PW) scratch.resize((f1 - f0) * R * PW);
  for (int64_t q = 0; q < a.Q; ++q) {
    const int32_t* ptr = a.ptr + q * (a.F + 1);
    const bool first = q == 0, last = q + 1 == a.Q;
    for (int64_t f = f0; f < f1; ++f) {
      v16 acc[R * PW];
      float* yo = Yg + f * yplane;
      v16* sp = a.Q > 1 ? scratch.data() + (f - f0) * R * PW : nullptr;
      if (first) {
        const v16 b = bc(a.bias ? a.bias[f] : 0.f);
        for (int i = 0; i < R * PW; ++i) acc[i] = b;
      } else {
        for (int i = 0; i < R * PW; ++i) acc[i] = sp[i];
      }
      block<R, PW, S>(Xg, Wp, a.off, a.w, ptr[f], ptr[f + 1], acc);
      if (last) {
        if (Rg) {
          const float* ro = Rg + f * yplane;
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
            for (int x = 0; x < PW; ++x) acc[r * PW + x] += ld(ro + (r * Wop + x) * 16);
        }
        if (a.relu)
          for (int i = 0; i < R * PW; ++i) acc[i] = relu16(acc[i]);
        if constexpr (R % 2 == 0 && PW % 2 == 0) {
          if (a.pool) {  // the block's 2x2 windows (torch's rule: a NaN wins)
#pragma GCC unroll 8
            for (int r = 0; r < R; r += 2)
#pragma GCC unroll 8
              for (int x = 0; x < PW; x += 2) {
                v16 m = acc[r * PW + x];
                const v16 c[3] = {acc[r * PW + x + 1], acc[(r + 1) * PW + x], acc[(r + 1) * PW + x + 1]};
                for (int k = 0; k < 3; ++k) m = (c[k] > m) | (c[k] != c[k]) ? c[k] : m;
                st(yo + ((r / 2) * Wop + x / 2) * 16, m);
              }
            continue;
          }
        }
      } else {
        for (int i = 0; i < R * PW; ++i) sp[i] = acc[i];
        continue;
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int x = 0; x < PW; ++x) st(yo + (r * Wop + x) * 16, acc[r * PW + x]);
    }
  }
}

typedef void (*JobFn)(const ConvArgs&, int64_t, int64_t, int64_t, int64_t, int64_t);

template <int S>
JobFn pick_job(int R, int PW) {
#define NC_LANES_CASE(r, pw) \
  if (R == r && PW == pw) return &conv_job<r, pw, S>;
  NC_LANES_CASE(1, 1) NC_LANES_CASE(1, 2) NC_LANES_CASE(1, 4) NC_LANES_CASE(1, 8) NC_LANES_CASE(1, 16)
  NC_LANES_CASE(2, 1) NC_LANES_CASE(2, 2) NC_LANES_CASE(2, 4) NC_LANES_CASE(2, 8)
  NC_LANES_CASE(4, 1) NC_LANES_CASE(4, 2) NC_LANES_CASE(4, 4)
  NC_LANES_CASE(8, 1) NC_LANES_CASE(8, 2) NC_LANES_CASE(16, 1)
#undef NC_LANES_CASE
  return nullptr;
}

// the largest power of two <= cap dividing n
int64_t pow2_divisor(int64_t n, int64_t cap) {
  int64_t d = 1;
  while (d * 2 <= cap && n % (d * 2) == 0) d *= 2;
  return d;
}

// zero the one-pixel border of every (G x C) plane of a lanes tensor
void zero_borders(float* Y, int64_t planes, int64_t Hp, int64_t Wp) {
  nck::parallel_for(0, planes, 64, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      float* y = Y + p * Hp * Wp * 16;
      std::fill(y, y + Wp * 16, 0.f);
      std::fill(y + (Hp - 1) * Wp * 16, y + Hp * Wp * 16, 0.f);
      for (int64_t r = 1; r + 1 < Hp; ++r) {
        st(y + r * Wp * 16, bc(0.f));
        st(y + (r * Wp + Wp - 1) * 16, bc(0.f));
      }
    }
  });
}

void check_lanes(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 5 && x.size(4) == 16 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), what,
              ": expected a contiguous float32 lanes tensor (G, C, H + 2, W + 2, 16), got ", x.sizes(), " ",
              x.scalar_type());
}

torch::Tensor lanes_empty(int64_t G, int64_t C, int64_t Hp, int64_t Wp) {
  return torch::empty({G, C, Hp, Wp, 16}, torch::dtype(torch::kFloat32));
}

}  // namespace

LanesTaps lanes_taps(const torch::Tensor& weight, int64_t H, int64_t W, int64_t pad, int64_t chunk) {
  TORCH_CHECK(weight.dim() == 4, "lanes conv: weight must be (F, C, kh, kw), got ", weight.sizes());
  auto w = weight.contiguous().to(torch::kFloat32);
  const int64_t F = w.size(0), C = w.size(1), kh = w.size(2), kw = w.size(3), Hp = H + 2, Wp = W + 2;
  const float* p = w.data_ptr<float>();
  LanesTaps t;
  t.H = H;
  t.W = W;
  t.K = std::max<int64_t>(1, std::min(chunk, C));
  t.Q = (C + t.K - 1) / t.K;
  t.ptr.resize(t.Q * (F + 1));
  for (int64_t q = 0; q < t.Q; ++q) {
    t.ptr[q * (F + 1)] = (int32_t)t.off.size();
    for (int64_t f = 0; f < F; ++f) {
      for (int64_t c = q * t.K; c < std::min(C, (q + 1) * t.K); ++c)
        for (int64_t ky = 0; ky < kh; ++ky)
          for (int64_t kx = 0; kx < kw; ++kx) {
            const float v = p[((f * C + c) * kh + ky) * kw + kx];
            if (v == 0.f) continue;
            t.off.push_back((int32_t)(((c * Hp + ky - pad + 1) * Wp + kx - pad + 1) * 16));
            t.w.push_back(v);
          }
      t.ptr[q * (F + 1) + f + 1] = (int32_t)t.off.size();
    }
  }
  return t;
}

// the register block (rows R, columns PW) of a conv with an Ho x Wo output (pool: a fused 2x2 pooling)
std::pair<int64_t, int64_t> lanes_block(int64_t Ho, int64_t Wo, bool pool) {
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(g_lanes_pixels, 16));
  // (pooling: blocks of 2 rows and an even number of columns)
  const int64_t PW = pool ? std::max<int64_t>(2, pow2_divisor(Wo, std::max<int64_t>(2, P / 2))) : pow2_divisor(Wo, P);
  const int64_t R = pool ? 2 : pow2_divisor(Ho, std::max<int64_t>(1, P / PW));
  return {R, PW};
}

// input channels per chunk: the chunk's window (the block's input rows and columns) within g_lanes_chunk_bytes
int64_t lanes_chunk(int64_t C, int64_t S, int64_t Ho, int64_t Wo, bool pool) {
  const auto [R, PW] = lanes_block(Ho, Wo, pool);
  const int64_t rows = (R - 1) * S + 3, cols = (PW - 1) * S + 3;
  int64_t K = g_lanes_chunk_bytes / (rows * cols * 64);
  K = K >= 8 ? K / 8 * 8 : std::max<int64_t>(1, K);
  return std::min(K, C);
}

torch::Tensor to_lanes(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32, "lanes_in: expected a float32 (N, C, H, W) input, got ",
              x.sizes(), " ", x.scalar_type());
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), G = (N + 15) / 16, Hp = H + 2, Wp = W + 2;
  auto y = lanes_empty(G, C, Hp, Wp);
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  nck::parallel_for(0, G * C, 16, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t g = p / C, c = p % C;
      float* o = Y + p * Hp * Wp * 16;
      std::fill(o, o + Hp * Wp * 16, 0.f);
      for (int64_t l = 0; l < 16 && g * 16 + l < N; ++l) {
        const float* s = X + ((g * 16 + l) * C + c) * H * W;
        for (int64_t r = 0; r < H; ++r)
          for (int64_t q = 0; q < W; ++q) o[((r + 1) * Wp + q + 1) * 16 + l] = s[r * W + q];
      }
    }
  });
  return y;
}

torch::Tensor from_lanes(torch::Tensor x, int64_t N) {
  check_lanes(x, "lanes_out");
  const int64_t G = x.size(0), C = x.size(1), Hp = x.size(2), Wp = x.size(3), H = Hp - 2, W = Wp - 2;
  TORCH_CHECK(N >= 0 && N <= G * 16, "lanes_out: ", N, " images do not fit ", G, " groups of 16");
  auto y = torch::empty({N, C, H, W}, torch::dtype(torch::kFloat32));
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  nck::parallel_for(0, N * C, 16, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t n = p / C, c = p % C, g = n / 16, l = n % 16;
      const float* s = X + (g * C + c) * Hp * Wp * 16;
      float* o = Y + p * H * W;
      for (int64_t r = 0; r < H; ++r)
        for (int64_t q = 0; q < W; ++q) o[r * W + q] = s[((r + 1) * Wp + q + 1) * 16 + l];
    }
  });
  return y;
}

torch::Tensor lanes_conv(torch::Tensor x, const LanesTaps& t, int64_t F, c10::optional<torch::Tensor> bias,
                         c10::optional<torch::Tensor> residual, int64_t k, int64_t stride, int64_t pad, bool relu,
                         bool pool) {
  check_lanes(x, "lanes_conv");
  const int64_t G = x.size(0), C = x.size(1), H = x.size(2) - 2, W = x.size(3) - 2;
  TORCH_CHECK(t.H == H && t.W == W, "lanes_conv: taps made for ", t.H, "x", t.W, " maps, got ", H, "x", W);
  TORCH_CHECK((k == 3 && pad == 1) || (k == 1 && pad == 0), "lanes_conv: only 3x3 (pad 1) and 1x1 (pad 0) kernels");
  TORCH_CHECK(stride == 1 || stride == 2, "lanes_conv: stride must be 1 or 2, got ", stride);
  const int64_t Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1;
  TORCH_CHECK(!pool || (Ho % 2 == 0 && Wo % 2 == 0 && !(residual.has_value() && residual->defined())),
              "lanes_conv: a fused 2x2 pooling needs an even output map and no residual, got ", Ho, "x", Wo);
  auto y = pool ? lanes_empty(G, F, Ho / 2 + 2, Wo / 2 + 2) : lanes_empty(G, F, Ho + 2, Wo + 2);
  ConvArgs a;
  a.X = x.data_ptr<float>();
  a.Y = y.data_ptr<float>();
  torch::Tensor r, b;
  a.res = nullptr;
  if (residual.has_value() && residual->defined()) {
    r = *residual;
    check_lanes(r, "lanes_conv residual");
    TORCH_CHECK(r.size(0) == G && r.size(1) == F && r.size(2) == Ho + 2 && r.size(3) == Wo + 2,
                "lanes_conv: residual ", r.sizes(), " does not match the output (", G, ", ", F, ", ", Ho + 2, ", ",
                Wo + 2, ", 16)");
    a.res = r.data_ptr<float>();
  }
  a.bias = nullptr;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    a.bias = b.data_ptr<float>();
  }
  a.ptr = t.ptr.data();
  a.off = t.off.data();
  a.w = t.w.data();
  a.C = C;
  a.H = H;
  a.W = W;
  a.F = F;
  a.Ho = Ho;
  a.Wo = Wo;
  a.Q = t.Q;
  a.G = G;
  a.relu = relu;
  a.pool = pool;
  if (pool)
    zero_borders(a.Y, G * F, Ho / 2 + 2, Wo / 2 + 2);
  else
    zero_borders(a.Y, G * F, Ho + 2, Wo + 2);
  const auto [R, PW] = lanes_block(Ho, Wo, pool);
  JobFn fn = stride == 1 ? pick_job<1>((int)R, (int)PW) : pick_job<2>((int)R, (int)PW);
  TORCH_CHECK(fn != nullptr, "lanes_conv: no block for ", R, "x", PW);
  const int64_t nby = Ho / R, nbx = Wo / PW, spatial = G * nby * nbx;
  // filter ranges: enough jobs for every thread (at least 16 filters a range)
  const int64_t nt = nck::num_threads();
  int64_t fs = 1;
  while (spatial * fs < 2 * nt && F / (fs * 2) >= 16) fs *= 2;
  const int64_t fchunk = (F + fs - 1) / fs;
  const int64_t jobs = spatial * fs;
  const int64_t work = (int64_t)t.w.size() * Ho * Wo * 16 * G;
  const int64_t grain = work < g_parallel_threshold ? jobs : 1;
  nck::parallel_for(0, jobs, grain, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j) {
      const int64_t fi = j % fs, s = j / fs;
      const int64_t g = s / (nby * nbx), yb = (s / nbx) % nby, xb = s % nbx;
      fn(a, g, yb * R, xb * PW, fi * fchunk, std::min(F, (fi + 1) * fchunk));
    }
  });
  return y;
}

torch::Tensor lanes_maxpool2(torch::Tensor x) {
  check_lanes(x, "lanes_pool");
  const int64_t G = x.size(0), C = x.size(1), H = x.size(2) - 2, W = x.size(3) - 2;
  TORCH_CHECK(H % 2 == 0 && W % 2 == 0, "lanes_pool: 2x2 pooling of an odd map ", H, "x", W);
  const int64_t Ho = H / 2, Wo = W / 2, Wp = W + 2, Hop = Ho + 2, Wop = Wo + 2;
  auto y = lanes_empty(G, C, Hop, Wop);
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  nck::parallel_for(0, G * C, 16, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const float* s = X + p * (H + 2) * Wp * 16;
      float* o = Y + p * Hop * Wop * 16;
      std::fill(o, o + Wop * 16, 0.f);
      std::fill(o + (Hop - 1) * Wop * 16, o + Hop * Wop * 16, 0.f);
      for (int64_t r = 0; r < Ho; ++r) {
        float* orow = o + (r + 1) * Wop * 16;
        st(orow, bc(0.f));
        st(orow + (Wop - 1) * 16, bc(0.f));
        const float* a0 = s + ((2 * r + 1) * Wp + 1) * 16;
        const float* a1 = a0 + Wp * 16;
        for (int64_t q = 0; q < Wo; ++q) {
          const v16 u = ld(a0 + 2 * q * 16), v = ld(a0 + (2 * q + 1) * 16), w = ld(a1 + 2 * q * 16),
                    z = ld(a1 + (2 * q + 1) * 16);
          // torch's rule: a NaN in the window wins
          v16 m = (v > u) | (v != v) ? v : u;
          m = (w > m) | (w != w) ? w : m;
          m = (z > m) | (z != z) ? z : m;
          st(orow + (q + 1) * 16, m);
        }
      }
    }
  });
  return y;
}

// option-A shortcut of a lanes tensor: subsample by `stride`, then input channel c lands at channel before + c of
// C (the others zero), or, with a channel map, channel src[i] at dst[i]
torch::Tensor lanes_shortcut(torch::Tensor x, int64_t stride, int64_t C, int64_t before,
                             c10::optional<torch::Tensor> src, c10::optional<torch::Tensor> dst) {
  check_lanes(x, "lanes_shortcut");
  const int64_t G = x.size(0), Ci = x.size(1), H = x.size(2) - 2, W = x.size(3) - 2;
  const int64_t Ho = (H + stride - 1) / stride, Wo = (W + stride - 1) / stride, Hop = Ho + 2, Wop = Wo + 2;
  std::vector<int64_t> to(Ci, -1);  // input channel -> output channel
  if (src.has_value() && src->defined()) {
    auto s = src->to(torch::kLong).contiguous(), d = dst->to(torch::kLong).contiguous();
    TORCH_CHECK(s.numel() == d.numel(), "lanes_shortcut: channel map sizes differ");
    for (int64_t i = 0; i < s.numel(); ++i) {
      const int64_t a = s.data_ptr<int64_t>()[i], b = d.data_ptr<int64_t>()[i];
      TORCH_CHECK(a >= 0 && a < Ci && b >= 0 && b < C, "lanes_shortcut: channel map entry ", a, " -> ", b,
                  " out of range");
      to[a] = b;
    }
  } else {
    TORCH_CHECK(before >= 0 && before + Ci <= C, "lanes_shortcut: ", Ci, " channels at ", before, " exceed ", C);
    for (int64_t c = 0; c < Ci; ++c) to[c] = before + c;
  }
  auto y = torch::zeros({G, C, Hop, Wop, 16}, torch::dtype(torch::kFloat32));
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  nck::parallel_for(0, G * Ci, 16, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t g = p / Ci, c = p % Ci;
      if (to[c] < 0) continue;
      const float* s = X + p * (H + 2) * (W + 2) * 16;
      float* o = Y + (g * C + to[c]) * Hop * Wop * 16;
      for (int64_t r = 0; r < Ho; ++r)
        for (int64_t q = 0; q < Wo; ++q)
          st(o + ((r + 1) * Wop + q + 1) * 16, ld(s + ((r * stride + 1) * (W + 2) + q * stride + 1) * 16));
    }
  });
  return y;
}

// global average pooling of a lanes tensor: (G, C, 3, 3, 16), the plane means at the centre
torch::Tensor lanes_gap(torch::Tensor x) {
  check_lanes(x, "lanes_gap");
  const int64_t G = x.size(0), C = x.size(1), H = x.size(2) - 2, W = x.size(3) - 2;
  auto y = torch::zeros({G, C, 3, 3, 16}, torch::dtype(torch::kFloat32));
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const float inv = 1.f / (float)(H * W);
  nck::parallel_for(0, G * C, 16, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const float* s = X + p * (H + 2) * (W + 2) * 16;
      v16 acc = bc(0.f);
      for (int64_t r = 0; r < H; ++r)
        for (int64_t q = 0; q < W; ++q) acc += ld(s + ((r + 1) * (W + 2) + q + 1) * 16);
      st(Y + (p * 9 + 4) * 16, acc * bc(inv));
    }
  });
  return y;
}
