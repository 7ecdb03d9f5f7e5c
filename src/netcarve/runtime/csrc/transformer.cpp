// netcarve native transformer ops (fp32): scaled dot-product attention (also straight from a packed qkv projection),
// LayerNorm over the trailing dims, element-wise activations (GELU, GELU-tanh, SiLU, sigmoid, hardswish,
// hardsigmoid) and same-shape additions, vectorised and split over torch's thread pool or a plan's team
// (nck::parallel_for).
//
// Why: in a block-sparse transformer the sparse linears got fast and ATen's attention, LayerNorm and GELU became the
// bulk (transformer_tiny, 90% 4x16, Intel Emerald Rapids VM, 2 threads, batch 64: attention 1.98 ms + head permutes
// 0.69 ms, LayerNorm 0.74 ms, GELU 0.42 ms of 5.8 ms; at batch 1 one GELU over 4,096 floats took ~12 us). ATen's
// attention and LayerNorm also left the plan's team region (a fork / join each).
// Reference twins: F.scaled_dot_product_attention, F.layer_norm, F.gelu / F.silu / torch.sigmoid / F.hardswish /
// F.hardsigmoid (netcarve/runtime/kernels.py); tests compare both.
#include "kernels.h"

#include <cmath>
#include <limits>
#include <type_traits>

using namespace nck;

bool g_native_transformer = true;
bool g_attention_transpose = true;

namespace {

typedef int32_t veci __attribute__((vector_size(VL * 4)));

// min / max that return a when it is NaN (a NaN input stays NaN through the clamps below)
static inline vecf vmin(vecf a, vecf b) { return b < a ? b : a; }
static inline vecf vmaxv(vecf a, vecf b) { return b > a ? b : a; }

// 1 / x: the hardware estimate and one Newton step (relative error ~1e-7 with AVX-512's 14-bit estimate; a vector
// division was the bulk of GELU's time: ~10 cycles' throughput per 512-bit vdivps)
static inline vecf vrcp(vecf x) {
#if defined(__AVX512F__)
  const vecf r = (vecf)_mm512_rcp14_ps((__m512)x);
#elif defined(__AVX__)
  vecf r = (vecf)_mm256_rcp_ps((__m256)x);
  r = r * (bcast(2.f) - x * r);  // (12-bit estimate: two steps)
#else
  const vecf r = bcast(1.f) / x;
  return r;
#endif
  return r * (bcast(2.f) - x * r);
}

// the sum / maximum of a vector's lanes (a shuffle tree, not a chain of VL dependent scalar operations)
static inline float hsum(vecf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s = 0.f;
  for (int64_t l = 0; l < VL; ++l) s += v[l];
  return s;
#endif
}
static inline float hmax(vecf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps((__m512)v);
#else
  float m = v[0];
  for (int64_t l = 1; l < VL; ++l) m = std::max(m, v[l]);
  return m;
#endif
}

// exp(x) (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial, 2^n through the exponent bits; relative
// error ~2e-7). x is clamped to [-87.3, 88.37]: exp(-inf) gives ~1e-38, not 0 (callers zero what must be zero).
static inline vecf vexp(vecf x) {
  x = vmaxv(vmin(x, bcast(88.37f)), bcast(-87.3f));
  const vecf magic = bcast(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer, kept in the low mantissa bits
  const vecf t = x * bcast(1.44269504088896341f) + magic;
  const vecf n = t - magic;
  const veci ni = (veci)t - (veci)magic;
  vecf r = x - n * bcast(0.693359375f);
  r = r - n * bcast(-2.12194440e-4f);
  vecf p = bcast(1.9875691500e-4f);
  p = p * r + bcast(1.3981999507e-3f);
  p = p * r + bcast(8.3334519073e-3f);
  p = p * r + bcast(4.1665795894e-2f);
  p = p * r + bcast(1.6666665459e-1f);
  p = p * r + bcast(5.0000001201e-1f);
  p = p * r * r + r + bcast(1.f);
  const vecf scale = (vecf)((ni + 127) << 23);  // (a roundscale / scalef form measured slower on the Intel VM)
  return p * scale;
}

// erf(x), Abramowitz-Stegun 7.1.26 (absolute error <= 1.5e-7): the formula of ATen's own vectorised float erf, so
// GELU's negative tail (1 + erf cancels) is as accurate as torch's float GELU. (Numerical Recipes' erfc, relatively
// accurate in the tail, took ~1.7x as long: 512-bit operations issue on one port of the Intel VM.)
static inline vecf verf(vecf x) {
  const vecf ax = vmaxv(x, -x);
  const vecf t = vrcp(bcast(1.f) + bcast(0.3275911f) * ax);
  vecf p = bcast(1.061405429f);
  p = p * t + bcast(-1.453152027f);
  p = p * t + bcast(1.421413741f);
  p = p * t + bcast(-0.284496736f);
  p = p * t + bcast(0.254829592f);
  const vecf y = bcast(1.f) - p * t * vexp(-ax * ax);
  return x < bcast(0.f) ? -y : y;
}

template <int FN>
static inline vecf act(vecf x) {
  const vecf one = bcast(1.f);
  switch (FN) {
    case 0:  // gelu: x / 2 * (1 + erf(x / sqrt 2))
      return bcast(0.5f) * x * (one + verf(x * bcast(0.70710678118654752f)));
    case 1: {  // gelu, tanh approximation: x / 2 * (1 + tanh(u)) = x * sigmoid(2u)
      const vecf u = bcast(0.7978845608028654f) * (x + bcast(0.044715f) * x * x * x);
      return x * vrcp(one + vexp(bcast(-2.f) * u));
    }
    case 2:  // silu
      return x * vrcp(one + vexp(-x));
    case 3:  // sigmoid
      return vrcp(one + vexp(-x));
    case 5:  // hardswish: x * relu6(x + 3) / 6
      return x * vmin(vmaxv(x + bcast(3.f), bcast(0.f)), bcast(6.f)) * bcast(1.f / 6.f);
    default:  // 6 hardsigmoid: relu6(x + 3) / 6
      return vmin(vmaxv(x + bcast(3.f), bcast(0.f)), bcast(6.f)) * bcast(1.f / 6.f);
  }
}

// Attention over G = batch x heads problems: O[g][i] = softmax_j(scale * Q[g][i] . K[g][j]) V[g][j], each matrix
// addressed by (batch, head, row) strides (last dim contiguous); causal: j <= i only (torch's is_causal, top-left);
// kbias: an additive (B, Lk) bias per key (a key padding mask: -inf where a key is padding), or null; qbias: an
// additive (Lq, Lk) bias per query and key (an attention mask), or null.
struct AttnArgs {
  const float* q;
  const float* k;
  const float* v;
  float* o;
  int64_t B, H, Lq, Lk, D, Dv;
  int64_t qs[3], ks[3], vs[3], os[3];  // (batch, head, row) strides in floats
  float scale;
  bool causal;
  const float* kbias = nullptr;
  const float* qbias = nullptr;
};

constexpr int64_t QROWS = 8;    // query rows per pass (each key / value vector loaded once for all of them)
constexpr int64_t QBLOCK = 64;  // query rows per task

// o[r][d0 + ..M*VL) = sum over keys j < jn of p[r][j] * v[j][..M*VL) for the QROWS rows (null rows skipped), the
// accumulators in registers (M compile-time); columns at or past Dv are not stored
template <int M>
static inline void attn_values(const float* __restrict p, int64_t Lkp, const float* __restrict v, int64_t Dvp,
                               int64_t jn, float* const* orow, int64_t d0, int64_t Dv) {
  vecf acc[QROWS][M];
  for (int64_t r = 0; r < QROWS; ++r)
    for (int c = 0; c < M; ++c) acc[r][c] = bcast(0.f);
  for (int64_t j = 0; j < jn; ++j) {
    const float* vr = v + j * Dvp;
    vecf vv[M];
    for (int c = 0; c < M; ++c) vv[c] = loadu(vr + c * VL);
    for (int64_t r = 0; r < QROWS; ++r) {
      const vecf pr = bcast(p[r * Lkp + j]);
      for (int c = 0; c < M; ++c) acc[r][c] += pr * vv[c];
    }
  }
  alignas(64) float t[VL];
  for (int64_t r = 0; r < QROWS; ++r) {
    if (!orow[r]) continue;
    for (int c = 0; c < M; ++c) {
      const int64_t d = d0 + c * VL, w = std::min<int64_t>(VL, Dv - d);
      if (w == VL) {
        storeu(orow[r] + d, acc[r][c]);
      } else if (w > 0) {
        storeu(t, acc[r][c]);
        std::copy(t, t + w, orow[r] + d);
      }
    }
  }
}

// Query rows [i0, i1) of problem g. fresh: build the problem's K^T and padded V in this thread's buffers (else they
// hold g's from the thread's previous task: the tasks of one problem are consecutive).
static void attention_task(const AttnArgs& a, int64_t g, int64_t i0, int64_t i1, bool fresh) {
  const int64_t b = g / a.H, h = g % a.H;
  const float* q = a.q + b * a.qs[0] + h * a.qs[1];
  const float* k = a.k + b * a.ks[0] + h * a.ks[1];
  const float* v = a.v + b * a.vs[0] + h * a.vs[1];
  float* o = a.o + b * a.os[0] + h * a.os[1];
  const int64_t Lkp = (a.Lk + VL - 1) / VL * VL, Dvp = (a.Dv + VL - 1) / VL * VL;
  // keys the task can see: all, or (causal) those up to its last row
  const int64_t Lk = a.causal ? std::min<int64_t>(a.Lk, i1) : a.Lk;
  thread_local std::vector<float> kt_buf, v_buf, s_buf;
  if ((int64_t)kt_buf.size() < a.D * Lkp) kt_buf.resize(a.D * Lkp);
  if ((int64_t)v_buf.size() < a.Lk * Dvp) v_buf.resize(a.Lk * Dvp);
  if ((int64_t)s_buf.size() < QROWS * Lkp) s_buf.resize(QROWS * Lkp);
  float* kt = kt_buf.data();  // K transposed: kt[d * Lkp + j], zero past Lk
  float* vp = v_buf.data();   // V with rows padded to whole vectors: vp[j * Dvp + d], zero past Dv
  float* s = s_buf.data();
  if (fresh) {  // every key (a causal problem's later tasks see more of them)
    // (register transposes: scalar ones were a quarter of a ViT head's attention, 65 tokens x 64)
    if (g_attention_transpose) {
      transpose_block(k, a.ks[2], a.Lk, a.D, kt, Lkp);
    } else {
      for (int64_t j = 0; j < a.Lk; ++j) {
        const float* kr = k + j * a.ks[2];
        for (int64_t d = 0; d < a.D; ++d) kt[d * Lkp + j] = kr[d];
      }
    }
    for (int64_t d = 0; d < a.D; ++d) std::fill(kt + d * Lkp + a.Lk, kt + (d + 1) * Lkp, 0.f);
    for (int64_t j = 0; j < a.Lk; ++j) {
      float* r = vp + j * Dvp;
      std::copy(v + j * a.vs[2], v + j * a.vs[2] + a.Dv, r);
      std::fill(r + a.Dv, r + Dvp, 0.f);
    }
  }
  const int64_t nj = (Lk + VL - 1) / VL, nd = Dvp / VL;
  for (int64_t i = i0; i < i1; i += QROWS) {
    const int64_t nr = std::min<int64_t>(QROWS, i1 - i);
    const float* qr[QROWS];
    for (int64_t r = 0; r < QROWS; ++r) qr[r] = q + std::min(i + r, i1 - 1) * a.qs[2];
    // scores, two key vectors x the eight rows at a time
    for (int64_t jv = 0; jv < nj; jv += 2) {
      const bool two = jv + 1 < nj;
      vecf acc0[QROWS], acc1[QROWS];
      for (int64_t r = 0; r < QROWS; ++r) acc0[r] = acc1[r] = bcast(0.f);
      const float* kc = kt + jv * VL;
      for (int64_t d = 0; d < a.D; ++d) {
        const vecf k0 = loadu(kc + d * Lkp);
        const vecf k1 = two ? loadu(kc + d * Lkp + VL) : bcast(0.f);
        for (int64_t r = 0; r < QROWS; ++r) {
          const vecf qd = bcast(qr[r][d]);
          acc0[r] += qd * k0;
          acc1[r] += qd * k1;
        }
      }
      const vecf sc = bcast(a.scale);
      for (int64_t r = 0; r < QROWS; ++r) {
        storeu(s + r * Lkp + jv * VL, acc0[r] * sc);
        if (two) storeu(s + r * Lkp + (jv + 1) * VL, acc1[r] * sc);
      }
    }
    // softmax per row over its visible keys (n of them), the rest zero
    for (int64_t r = 0; r < nr; ++r) {
      float* sr = s + r * Lkp;
      const int64_t n = a.causal ? std::min<int64_t>(Lk, i + r + 1) : Lk;
      if (a.kbias) {
        const float* kb = a.kbias + b * a.Lk;
        for (int64_t j = 0; j < n; ++j) sr[j] += kb[j];
      }
      if (a.qbias) {
        const float* qb = a.qbias + (i + r) * a.Lk;
        for (int64_t j = 0; j < n; ++j) sr[j] += qb[j];
      }
      float m = -std::numeric_limits<float>::infinity();
      int64_t j = 0;
      if (n >= VL) {  // (lane-wise maxima: a scalar max chain was 30% of the kernel)
        vecf vmx = loadu(sr);
        for (j = VL; j + VL <= n; j += VL) vmx = vmaxv(vmx, loadu(sr + j));
        m = hmax(vmx);
      }
      for (; j < n; ++j) m = std::max(m, sr[j]);
      const vecf vm = bcast(m);
      vecf vsum = bcast(0.f);
      j = 0;
      for (; j + VL <= n; j += VL) {
        const vecf e = vexp(loadu(sr + j) - vm);
        storeu(sr + j, e);
        vsum += e;
      }
      float sum = hsum(vsum);
      for (; j < n; ++j) {
        const float e = std::exp(sr[j] - m);
        sr[j] = e;
        sum += e;
      }
      const float inv = 1.f / sum;
      const vecf vinv = bcast(inv);
      for (j = 0; j + VL <= n; j += VL) storeu(sr + j, loadu(sr + j) * vinv);
      for (; j < n; ++j) sr[j] *= inv;
      for (; j < Lk; ++j) sr[j] = 0.f;
    }
    for (int64_t r = nr; r < QROWS; ++r) std::fill(s + r * Lkp, s + r * Lkp + Lk, 0.f);
    // outputs, two value vectors x the eight rows at a time
    const int64_t jn = a.causal ? std::min<int64_t>(Lk, i + nr) : Lk;
    for (int64_t dv = 0; dv < nd; dv += 2) {  // (16 accumulators)
      float* orow[QROWS];
      for (int64_t r = 0; r < QROWS; ++r) orow[r] = r < nr ? o + (i + r) * a.os[2] : nullptr;
      if (nd - dv == 1)
        attn_values<1>(s, Lkp, vp + dv * VL, Dvp, jn, orow, dv * VL, a.Dv);
      else
        attn_values<2>(s, Lkp, vp + dv * VL, Dvp, jn, orow, dv * VL, a.Dv);
    }
  }
}

static void run_attention(const AttnArgs& a) {
  const int64_t G = a.B * a.H, nb = (a.Lq + QBLOCK - 1) / QBLOCK, tasks = G * nb;
  const int64_t work = G * a.Lq * a.Lk * (a.D + a.Dv);
  const int64_t grain = work < g_parallel_threshold ? tasks + 1 : 1;
  nck::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / nb, blk = t % nb;
      attention_task(a, g, blk * QBLOCK, std::min<int64_t>(a.Lq, (blk + 1) * QBLOCK), t == t0 || blk == 0);
    }
  });
}

// (batch, head, row) strides of a 3-d (B, L, E) or 4-d (B, H, L, E) tensor with a contiguous last dim
static void strides3(const torch::Tensor& t, int64_t* s) {
  if (t.dim() == 3) {
    s[0] = t.stride(0);
    s[1] = 0;
    s[2] = t.stride(1);
  } else {
    s[0] = t.stride(0);
    s[1] = t.stride(1);
    s[2] = t.stride(2);
  }
}

}  // namespace

bool attention_native_ok(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  for (const auto* t : {&q, &k, &v})
    if (t->scalar_type() != torch::kFloat32 || (t->dim() != 3 && t->dim() != 4) || t->dim() != q.dim()) return false;
  const int64_t L = q.dim();
  if (k.size(L - 2) != v.size(L - 2) || q.size(L - 1) != k.size(L - 1) || k.size(L - 2) < 1) return false;
  for (int64_t d = 0; d < L - 2; ++d)
    if (k.size(d) != q.size(d) || v.size(d) != q.size(d)) return false;
  return true;
}

torch::Tensor attention_native(torch::Tensor q, torch::Tensor k, torch::Tensor v, bool causal,
                               c10::optional<double> scale) {
  TORCH_CHECK(attention_native_ok(q, k, v), "attention: q, k, v must be float32 (B, [H,] L, E) with equal leading ",
              "dims and key / value lengths, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  if (q.stride(-1) != 1) q = q.contiguous();
  if (k.stride(-1) != 1) k = k.contiguous();
  if (v.stride(-1) != 1) v = v.contiguous();
  const int64_t L = q.dim();
  auto sizes = q.sizes().vec();
  sizes.back() = v.size(L - 1);
  auto out = torch::empty(sizes, q.options());
  AttnArgs a;
  a.q = q.data_ptr<float>();
  a.k = k.data_ptr<float>();
  a.v = v.data_ptr<float>();
  a.o = out.data_ptr<float>();
  a.B = q.size(0);
  a.H = L == 4 ? q.size(1) : 1;
  a.Lq = q.size(L - 2);
  a.Lk = k.size(L - 2);
  a.D = q.size(L - 1);
  a.Dv = v.size(L - 1);
  strides3(q, a.qs);
  strides3(k, a.ks);
  strides3(v, a.vs);
  strides3(out, a.os);
  a.scale = scale.has_value() ? (float)*scale : (float)(1.0 / std::sqrt((double)a.D));
  a.causal = causal;
  if (a.B * a.H * a.Lq > 0) run_attention(a);
  return out;
}

// a 2-d (rows, cols) mask as an additive float bias: bool true -> -inf (not attended), float as it is
static torch::Tensor mask_bias(const torch::Tensor& mask, int64_t rows, int64_t cols, const char* what,
                               const char* dims) {
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == rows && mask.size(1) == cols, "attention: the ", what, " must be (",
              rows, ", ", cols, ") (", dims, "), got ", mask.sizes());
  if (mask.scalar_type() == torch::kBool)
    return torch::zeros({rows, cols}, torch::kFloat32).masked_fill_(mask, -std::numeric_limits<float>::infinity());
  TORCH_CHECK(mask.is_floating_point(), "attention: the ", what, " must be bool or float, got ", mask.scalar_type());
  return mask.to(torch::kFloat32).contiguous();
}

torch::Tensor key_padding_bias(const torch::Tensor& mask, int64_t B, int64_t T) {
  return mask_bias(mask, B, T, "key padding mask", "batch, keys");
}

torch::Tensor attn_mask_bias(const torch::Tensor& mask, int64_t Tq, int64_t Tk) {
  return mask_bias(mask, Tq, Tk, "attention mask", "queries, keys");
}

torch::Tensor attention_qkv(torch::Tensor qkv, int64_t heads, bool causal, c10::optional<double> scale,
                            c10::optional<torch::Tensor> key_padding_mask, c10::optional<torch::Tensor> attn_mask,
                            c10::optional<torch::Tensor> kv_opt) {
  const bool cross = kv_opt.has_value() && kv_opt->defined();
  const int64_t parts = cross ? 1 : 3;  // projections packed in qkv
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 && qkv.dim() == 3, "attention_qkv: ", cross ? "q" : "qkv",
              " must be a float32 (B, T, ", cross ? "" : "3 * ", "heads * head_dim) tensor, got ", qkv.sizes());
  TORCH_CHECK(heads >= 1 && qkv.size(2) % (parts * heads) == 0, "attention_qkv: width ", qkv.size(2), " is not ",
              cross ? "" : "3 x ", heads, " heads x head_dim");
  qkv = qkv.contiguous();
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / parts, hd = C / heads;
  torch::Tensor kv;
  if (cross) {
    kv = kv_opt->contiguous();
    TORCH_CHECK(kv.scalar_type() == torch::kFloat32 && kv.dim() == 3 && kv.size(0) == B && kv.size(2) == 2 * C,
                "attention_qkv: kv must be a float32 (", B, ", Tk, ", 2 * C, ") key | value projection, got ",
                kv.sizes());
  }
  const int64_t Tk = cross ? kv.size(1) : T;
  torch::Tensor kb;
  if (key_padding_mask.has_value() && key_padding_mask->defined()) kb = key_padding_bias(*key_padding_mask, B, Tk);
  torch::Tensor qb;
  if (attn_mask.has_value() && attn_mask->defined()) qb = attn_mask_bias(*attn_mask, T, Tk);
  auto out = torch::empty({B, T, C}, qkv.options());
  AttnArgs a;
  a.q = qkv.data_ptr<float>();
  a.k = cross ? kv.data_ptr<float>() : a.q + C;
  a.v = a.k + C;
  a.o = out.data_ptr<float>();
  a.B = B;
  a.H = heads;
  a.Lq = T;
  a.Lk = Tk;
  a.D = a.Dv = hd;
  a.qs[0] = T * parts * C;
  a.qs[1] = hd;
  a.qs[2] = parts * C;
  const int64_t kvw = cross ? 2 * C : 3 * C;  // floats per key row
  a.ks[0] = a.vs[0] = Tk * kvw;
  a.ks[1] = a.vs[1] = hd;
  a.ks[2] = a.vs[2] = kvw;
  a.os[0] = T * C;
  a.os[1] = hd;
  a.os[2] = C;
  a.scale = scale.has_value() ? (float)*scale : (float)(1.0 / std::sqrt((double)hd));
  a.causal = causal;
  if (kb.defined()) a.kbias = kb.data_ptr<float>();
  if (qb.defined()) a.qbias = qb.data_ptr<float>();
  if (B * T > 0 && hd > 0 && Tk > 0) run_attention(a);
  else if (Tk == 0) out.fill_(std::numeric_limits<float>::quiet_NaN());  // (no key to attend to)
  return out;
}

torch::Tensor layer_norm_native(torch::Tensor x, int64_t ndims, c10::optional<torch::Tensor> weight,
                                c10::optional<torch::Tensor> bias, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "layer_norm: x must be float32");
  TORCH_CHECK(ndims >= 1 && ndims <= x.dim(), "layer_norm: ", ndims, " normalized dims of a ", x.dim(), "-d input");
  x = x.contiguous();
  int64_t N = 1;
  for (int64_t d = x.dim() - ndims; d < x.dim(); ++d) N *= x.size(d);
  const float* wp = nullptr;
  const float* bp = nullptr;
  torch::Tensor w, b;
  if (weight.has_value() && weight->defined()) {
    w = weight->contiguous();
    TORCH_CHECK(w.numel() == N && w.scalar_type() == torch::kFloat32, "layer_norm: weight of ", w.numel(),
                " elements for rows of ", N);
    wp = w.data_ptr<float>();
  }
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == N && b.scalar_type() == torch::kFloat32, "layer_norm: bias of ", b.numel(),
                " elements for rows of ", N);
    bp = b.data_ptr<float>();
  }
  auto out = torch::empty_like(x);
  const int64_t rows = N ? x.numel() / N : 0;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = rows * N < g_parallel_threshold ? rows + 1 : std::max<int64_t>(1, 2048 / std::max<int64_t>(N, 1));
  nck::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * N;
      float* orow = op + r * N;
      // two passes (mean, then the centred sum of squares), in double-free fp32 vectors as ATen's CPU kernel
      vecf vs = bcast(0.f);
      int64_t i = 0;
      for (; i + VL <= N; i += VL) vs += loadu(xr + i);
      float sum = hsum(vs);
      for (; i < N; ++i) sum += xr[i];
      const float mean = sum / (float)N;
      const vecf vm = bcast(mean);
      vecf vq = bcast(0.f);
      for (i = 0; i + VL <= N; i += VL) {
        const vecf c = loadu(xr + i) - vm;
        vq += c * c;
      }
      float sq = hsum(vq);
      for (; i < N; ++i) sq += (xr[i] - mean) * (xr[i] - mean);
      const float rstd = 1.f / std::sqrt(sq / (float)N + (float)eps);
      const vecf vr = bcast(rstd);
      for (i = 0; i + VL <= N; i += VL) {
        vecf y = (loadu(xr + i) - vm) * vr;
        if (wp) y = y * loadu(wp + i);
        if (bp) y = y + loadu(bp + i);
        storeu(orow + i, y);
      }
      for (; i < N; ++i) {
        float y = (xr[i] - mean) * rstd;
        if (wp) y *= wp[i];
        if (bp) y += bp[i];
        orow[i] = y;
      }
    }
  });
  return out;
}

bool unary_native_ok(int64_t fn) { return fn >= 0 && fn <= 6 && fn != 4; }

torch::Tensor unary_native(torch::Tensor x, int64_t fn) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "activation: x must be float32");
  TORCH_CHECK(unary_native_ok(fn), "activation: no native kernel for code ", fn);
  x = x.contiguous();
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = x.numel(), nv = (n + VL - 1) / VL;
  const int64_t grain = n < g_parallel_threshold ? nv + 1 : 512;
  auto run = [&](auto fnc) {
    constexpr int FN = decltype(fnc)::value;
    nck::parallel_for(0, nv, grain, [&](int64_t b, int64_t e) {
      const int64_t i1 = std::min<int64_t>(n, e * VL);
      int64_t i = b * VL;
      // four independent vectors per iteration: each activation is one long chain of dependent operations (its
      // polynomials), so one vector at a time left the FMA units waiting (GELU ~2x slower than ATen's)
      for (; i + 4 * VL <= i1; i += 4 * VL) {
        const vecf y0 = act<FN>(loadu(xp + i)), y1 = act<FN>(loadu(xp + i + VL));
        const vecf y2 = act<FN>(loadu(xp + i + 2 * VL)), y3 = act<FN>(loadu(xp + i + 3 * VL));
        storeu(op + i, y0);
        storeu(op + i + VL, y1);
        storeu(op + i + 2 * VL, y2);
        storeu(op + i + 3 * VL, y3);
      }
      for (; i + VL <= i1; i += VL) storeu(op + i, act<FN>(loadu(xp + i)));
      if (i < i1) {  // the tail through one vector (lanes past the end are zeros, not read back)
        alignas(64) float t[VL] = {};
        std::copy(xp + i, xp + i1, t);
        storeu(t, act<FN>(loadu(t)));
        std::copy(t, t + (i1 - i), op + i);
      }
    });
  };
  switch (fn) {
    case 0: run(std::integral_constant<int, 0>()); break;
    case 1: run(std::integral_constant<int, 1>()); break;
    case 2: run(std::integral_constant<int, 2>()); break;
    case 3: run(std::integral_constant<int, 3>()); break;
    case 5: run(std::integral_constant<int, 5>()); break;
    default: run(std::integral_constant<int, 6>()); break;
  }
  return out;
}

bool add_native_ok(const torch::Tensor& a, const torch::Tensor& b) {
  return a.scalar_type() == torch::kFloat32 && b.scalar_type() == torch::kFloat32 && a.sizes() == b.sizes();
}

torch::Tensor add_native(torch::Tensor a, torch::Tensor b, bool relu) {
  TORCH_CHECK(add_native_ok(a, b), "add: float32 tensors of one shape expected, got ", a.sizes(), " and ", b.sizes());
  a = a.contiguous();
  b = b.contiguous();
  auto out = torch::empty_like(a);
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = a.numel(), nv = (n + VL - 1) / VL;
  const int64_t grain = n < g_parallel_threshold ? nv + 1 : 1024;
  const vecf zero = bcast(0.f);
  nck::parallel_for(0, nv, grain, [&](int64_t vb, int64_t ve) {
    const int64_t i1 = std::min<int64_t>(n, ve * VL);
    int64_t i = vb * VL;
    for (; i + VL <= i1; i += VL) {
      vecf y = loadu(ap + i) + loadu(bp + i);
      if (relu) y = vmaxv(y, zero);  // (NaN stays NaN, as torch.relu)
      storeu(op + i, y);
    }
    for (; i < i1; ++i) {
      const float y = ap[i] + bp[i];
      op[i] = relu && y < 0.f ? 0.f : y;
    }
  });
  return out;
}
