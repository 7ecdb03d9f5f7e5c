// netcarve whole-model execution plan: a flat list of steps run in one C++ call, no Python per layer.
//
// Values are numbered: value 0 is the input; every step reads values and writes one new value. Steps are
// added from Python (netcarve/runtime/plan.py lowers an fx graph, folds BN, fuses ReLU and residual
// additions into convs and chooses a kernel per conv). Sparse and direct convs run netcarve's kernels; ATen
// convs, pooling and linear layers call ATen (oneDNN / MKL) directly from C++.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <exception>
#include <limits>
#include <string>
#include <vector>

namespace {

// a lanes conv's taps for one input geometry and chunk size (made on first use; safe for concurrent runs)
struct LanesCache {
  std::mutex m;
  int64_t key[3] = {-1, -1, -1};
  std::shared_ptr<const LanesTaps> taps;
  std::shared_ptr<const LanesTaps> get(const torch::Tensor& w, int64_t H, int64_t W, int64_t pad, int64_t stride,
                                       bool pool) {
    const int64_t Ho = (H + 2 * pad - w.size(2)) / stride + 1, Wo = (W + 2 * pad - w.size(3)) / stride + 1;
    const int64_t K = lanes_chunk(w.size(1), stride, Ho, Wo, pool);
    std::lock_guard<std::mutex> g(m);
    if (!taps || key[0] != H || key[1] != W || key[2] != K) {
      taps = std::make_shared<const LanesTaps>(lanes_taps(w, H, W, pad, K));
      key[0] = H;
      key[1] = W;
      key[2] = K;
    }
    return taps;
  }
};

enum Kind { CONV, LINEAR, AFFINE, RELU, CLAMP, ADD, MAXPOOL, AVGPOOL, GAP, FLATTEN, SHORTCUT, CAT, MUL, PAD, RNN, SELECT, MEAN, PYTHON, CONST, UNARY, LAYERNORM, SOFTMAX, PERMUTE, NARROW, RESHAPE, SDPA, MHA, EXPAND, EMBEDDING, LANES_IN, LANES_OUT, LANES_CONV, LANES_POOL, CONVT, COMPARE, PADZERO };

struct Step {
  Kind kind;
  std::string name;
  std::vector<int64_t> in;  // value ids read
  int64_t out = -1;
  std::vector<int64_t> ints;
  std::vector<double> floats;
  std::vector<torch::Tensor> ts;  // weights / taps / maps
  std::vector<MatW> mats;         // linear: 1; rnn: 2 per layer (ih, hh)
  bool sparse = false;
  int64_t conv_kernel = 0;  // conv: 0 ATen, 1 sparse taps, 2 direct (ts[7] = packed weight), 3 generated code,
                            // 4 depthwise
  std::shared_ptr<const GenConv> gen;  // conv_kernel 3: the layer's generated code
  bool relu = false;
  std::shared_ptr<TapOffCache> offs = std::make_shared<TapOffCache>();  // sparse conv: its tap offsets
  // python: the callable (inputs -> tuple of tensors, one per value of `outs`; outs[0] == out)
  std::shared_ptr<py::object> fn;
  std::vector<int64_t> outs;
  std::shared_ptr<LanesCache> lanes;  // lanes conv: its taps for the last input geometry
};

static MatW make_mat(const torch::Tensor& w, c10::optional<torch::Tensor> bias, const std::vector<torch::Tensor>& bsr) {
  MatW m;
  m.w = w.contiguous();
  if (bias.has_value() && bias->defined()) m.bias = bias->contiguous();
  m.out = w.size(0);
  if (bsr.size() == 3) {
    m.ptr = bsr[0].contiguous();
    m.idx = bsr[1].contiguous();
    m.val = bsr[2].contiguous();
#if defined(__AVX512F__)
    m.valt = bsr_tiles_t(m.val);  // (only bsr_cols reads it)
#endif
  }
  return m;
}

}  // namespace

bool g_release_values = true;
bool g_team = true;
thread_local nck::Team* nck::t_team = nullptr;
static std::atomic<int> g_team_busy{0};  // a plan run holds a team (one at a time, see run_steps)
// Team back-off: a team region's closing barrier that waits longer than g_team_stall_ns for the other threads means
// the OS has descheduled one of them (other busy processes on the cores); plans then run without teams (a fork / join
// per loop, which copes with that far better) for g_team_backoff_ns, then try again.
int64_t g_team_stall_ns = 100000;
int64_t g_team_backoff_ns = 200000000;
static std::atomic<int64_t> g_team_off_until{0};
static std::atomic<int64_t> g_team_stalls{0};
static inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

class Plan {
 public:
  explicit Plan(int64_t num_values, int64_t output) : nvals_(num_values), output_(output) {}

  // conv: in = {x} or {x, residual}; ints = {out_channels, kh, kw, stride, pad, groups}
  // ts = {weight, bias|undefined, tap_ptr, tap_chan, tap_pos, tap_w, tap_order, packed|undefined}
  // kernel: 0 ATen conv, 1 sparse taps (needs the taps), 2 direct (needs the packed weight), 4 depthwise (groups =
  // in = out channels)
  void add_conv(const std::string& name, std::vector<int64_t> in, int64_t out, torch::Tensor weight,
                c10::optional<torch::Tensor> bias, std::vector<torch::Tensor> taps,
                c10::optional<torch::Tensor> packed, int64_t stride, int64_t pad, int64_t groups, bool relu,
                int64_t kernel) {
    Step s{CONV, name, std::move(in), out};
    s.ints = {weight.size(0), weight.size(2), weight.size(3), stride, pad, groups};
    s.ts = {weight.contiguous(), bias.has_value() ? bias->contiguous() : torch::Tensor()};
    TORCH_CHECK(kernel >= 0 && kernel <= 4 && kernel != 3, name,
                ": conv kernel must be 0 (ATen), 1 (sparse), 2 (direct) or 4 (depthwise)");
    TORCH_CHECK(kernel != 4 || (weight.size(1) == 1 && groups == weight.size(0)), name,
                ": the depthwise kernel needs groups = out channels and one input channel per group, got groups ",
                groups, " for a weight of shape ", weight.sizes());
    TORCH_CHECK(kernel != 1 || (groups == 1 && taps.size() == 5), name, ": a sparse conv needs groups=1 and its taps");
    TORCH_CHECK(kernel != 2 || (groups == 1 && packed.has_value()), name,
                ": a direct conv needs groups=1 and its packed weight");
    s.ts.resize(8);
    for (size_t i = 0; i < taps.size() && i < 5; ++i) s.ts[2 + i] = taps[i].contiguous();
    if (packed.has_value()) s.ts[7] = packed->contiguous();
    s.relu = relu;
    s.conv_kernel = kernel;
    push(std::move(s));
  }

  // conv through the layer's generated code (netcarve/runtime/codegen.py): the library at `path`, made for this
  // weight (F filters, C * kh * kw im2col rows); the weight itself is only read for its shape
  void add_conv_gen(const std::string& name, std::vector<int64_t> in, int64_t out, torch::Tensor weight,
                    c10::optional<torch::Tensor> bias, const std::string& path, int64_t stride, int64_t pad,
                    bool relu) {
    TORCH_CHECK(weight.dim() == 4, name, ": a generated conv needs the (F, C, kh, kw) weight, got ", weight.dim(),
                " dimensions");
    Step s{CONV, name, std::move(in), out};
    s.ints = {weight.size(0), weight.size(2), weight.size(3), stride, pad, 1};
    s.ts = {torch::Tensor(), bias.has_value() ? bias->contiguous() : torch::Tensor()};
    s.gen = load_gen_conv(path);
    TORCH_CHECK(s.gen->F == weight.size(0) && s.gen->K == weight.size(1) * weight.size(2) * weight.size(3), name,
                ": generated conv ", path, " is for ", s.gen->F, " filters x ", s.gen->K, " rows, the layer has ",
                weight.size(0), " x ", weight.size(1) * weight.size(2) * weight.size(3));
    s.relu = relu;
    s.conv_kernel = 3;
    push(std::move(s));
  }

  // bsr = {indptr, indices, values} (may be empty: dense only)
  void add_linear(const std::string& name, int64_t in, int64_t out, torch::Tensor weight,
                  c10::optional<torch::Tensor> bias, bool relu, std::vector<torch::Tensor> bsr, bool sparse,
                  bool direct, std::vector<torch::Tensor> panels) {
    Step s{LINEAR, name, {in}, out};
    s.mats = {make_mat(weight, bias, bsr)};
    TORCH_CHECK(!sparse || bsr.size() == 3, name, ": a sparse linear needs its BSR tensors");
    TORCH_CHECK(panels.empty() || panels.size() == 2, name, ": panels must be (wp, bp) from pack_panels");
    if (direct && !sparse && panels.size() == 2) {  // packed by the caller (shared between plans)
      s.mats[0].wp = panels[0];
      s.mats[0].bp = panels[1];
      s.mats[0].direct = true;
    } else if (direct && !sparse) {
      pack_direct(s.mats[0]);
    }
    s.sparse = sparse;
    s.mats[0].sparse = sparse;
    s.relu = relu;
    push(std::move(s));
  }
  // dense = {w_ih, b_ih, w_hh, b_hh} per layer and direction (l0, l0_reverse, l1, ...; biases may be undefined);
  // bsr = 6 per layer and direction (ih, hh) or empty; dirs: 2 for a bidirectional module
  void add_rnn(const std::string& name, int64_t in, int64_t out, bool lstm, int64_t hidden, bool batch_first,
               std::vector<c10::optional<torch::Tensor>> dense, std::vector<torch::Tensor> bsr, bool sparse,
               int64_t dirs, bool direct, std::vector<torch::Tensor> panels) {
    Step s{RNN, name, {in}, out};
    const size_t L = dense.size() / 4;
    TORCH_CHECK(dirs == 1 || dirs == 2, name, ": rnn directions must be 1 or 2");
    TORCH_CHECK(L >= 1 && dense.size() == 4 * L && L % dirs == 0, name, ": rnn needs 4 tensors per layer and direction");
    TORCH_CHECK(!sparse || bsr.size() == 6 * L, name, ": a sparse rnn needs BSR tensors for every matrix");
    for (size_t l = 0; l < L; ++l) {
      std::vector<torch::Tensor> bi, bh;
      if (bsr.size() == 6 * L) {
        bi = {bsr[6 * l], bsr[6 * l + 1], bsr[6 * l + 2]};
        bh = {bsr[6 * l + 3], bsr[6 * l + 4], bsr[6 * l + 5]};
      }
      s.mats.push_back(make_mat(*dense[4 * l], dense[4 * l + 1], bi));
      s.mats.push_back(make_mat(*dense[4 * l + 2], dense[4 * l + 3], bh));
    }
    TORCH_CHECK(panels.empty() || panels.size() == 2 * s.mats.size(), name,
                ": panels must be (wp, bp) from pack_panels for every gate matrix");
    for (size_t k = 0; k < s.mats.size(); ++k) {
      auto& m = s.mats[k];
      m.sparse = sparse;
      if (direct && !sparse && !panels.empty()) {  // packed by the caller (shared between plans)
        m.wp = panels[2 * k];
        m.bp = panels[2 * k + 1];
        m.direct = true;
      } else if (direct && !sparse) {
        pack_direct(m);  // the dense gate matmuls on the panel kernel
      }
    }
    s.sparse = sparse;
    s.ints = {lstm, hidden, batch_first, dirs};
    push(std::move(s));
  }
  void add_select(const std::string& name, int64_t in, int64_t out, int64_t dim, int64_t index) {
    Step s{SELECT, name, {in}, out};
    s.ints = {dim, index};
    push(std::move(s));
  }
  void add_mean(const std::string& name, int64_t in, int64_t out, int64_t dim, bool keepdim) {
    Step s{MEAN, name, {in}, out};
    s.ints = {dim, keepdim};
    push(std::move(s));
  }
  // per-channel y = x * scale + shift (an unfused BatchNorm), scale/shift shaped to broadcast
  void add_affine(const std::string& name, int64_t in, int64_t out, torch::Tensor scale, torch::Tensor shift,
                  bool relu) {
    Step s{AFFINE, name, {in}, out};
    s.ts = {scale.contiguous(), shift.contiguous()};
    s.relu = relu;
    push(std::move(s));
  }
  void add_relu(const std::string& name, int64_t in, int64_t out) { push(Step{RELU, name, {in}, out}); }
  void add_clamp(const std::string& name, int64_t in, int64_t out, double lo, double hi) {
    Step s{CLAMP, name, {in}, out};
    s.floats = {lo, hi};
    push(std::move(s));
  }
  void add_add(const std::string& name, int64_t a, int64_t b, int64_t out, bool relu) {
    Step s{ADD, name, {a, b}, out};
    s.relu = relu;
    push(std::move(s));
  }
  void add_mul(const std::string& name, int64_t a, int64_t b, int64_t out) {
    push(Step{MUL, name, {a, b}, out});
  }
  void add_pool(const std::string& name, bool max, int64_t in, int64_t out, std::vector<int64_t> kernel,
                std::vector<int64_t> stride, std::vector<int64_t> pad, bool ceil_mode, bool count_include_pad) {
    Step s{max ? MAXPOOL : AVGPOOL, name, {in}, out};
    s.ints = {kernel[0], kernel[1], stride[0], stride[1], pad[0], pad[1], ceil_mode, count_include_pad};
    push(std::move(s));
  }
  void add_gap(const std::string& name, int64_t in, int64_t out) { push(Step{GAP, name, {in}, out}); }
  void add_flatten(const std::string& name, int64_t in, int64_t out, int64_t start) {
    Step s{FLATTEN, name, {in}, out};
    s.ints = {start};
    push(std::move(s));
  }
  // option-A shortcut: subsample by stride, then zero-pad channels (before, after) or apply a channel map
  void add_shortcut(const std::string& name, int64_t in, int64_t out, int64_t stride, int64_t channels,
                    int64_t before, c10::optional<torch::Tensor> src, c10::optional<torch::Tensor> dst) {
    Step s{SHORTCUT, name, {in}, out};
    s.ints = {stride, channels, before};
    if (src.has_value()) s.ts = {src->to(torch::kLong), dst->to(torch::kLong)};
    push(std::move(s));
  }
  // constant padding of the last two dims: pads = {left, right, top, bottom}
  // ConvTranspose2d by ATen (ints: stride h, w, padding h, w, output_padding h, w, dilation h, w, groups; ts: the
  // weight and, if any, the bias)
  void add_conv_transpose(const std::string& name, int64_t in, int64_t out, torch::Tensor weight,
                          c10::optional<torch::Tensor> bias, std::vector<int64_t> ints) {
    TORCH_CHECK(ints.size() == 9, name, ": conv transpose takes 9 ints");
    Step s{CONVT, name, {in}, out};
    s.ts = {weight.contiguous()};
    if (bias) s.ts.push_back(bias->contiguous());
    s.ints = std::move(ints);
    push(std::move(s));
  }
  void add_pad(const std::string& name, int64_t in, int64_t out, std::vector<int64_t> pads, double value) {
    Step s{PAD, name, {in}, out};
    s.ints = pads;
    s.floats = {value};
    push(std::move(s));
  }
  // A part of the model the plan does not lower natively, run by PyTorch: fn(*inputs) returns one tensor per value
  // of outs (netcarve/runtime/plan.py: a torch.fx sub-graph). Called with the GIL taken, outside team regions.
  void add_python(const std::string& name, std::vector<int64_t> in, std::vector<int64_t> outs, py::object fn) {
    TORCH_CHECK(!outs.empty(), name, ": a python step needs at least one output value");
    Step s{PYTHON, name, std::move(in), outs[0]};
    s.outs = std::move(outs);
    s.fn = std::shared_ptr<py::object>(new py::object(std::move(fn)), [](py::object* o) {
      py::gil_scoped_acquire g;  // (the plan may be destroyed where the GIL is released)
      delete o;
    });
    push(std::move(s));
  }
  // a parameter / buffer read in forward (the value is kept in the step and handed out as is)
  void add_const(const std::string& name, int64_t out, torch::Tensor value) {
    Step s{CONST, name, {}, out};
    s.ts = {value};
    push(std::move(s));
  }
  // element-wise activation, by code: 0 gelu, 1 gelu (tanh approximation), 2 silu, 3 sigmoid, 4 tanh, 5 hardswish,
  // 6 hardsigmoid (netcarve/runtime/plan.py UNARY_FNS)
  void add_unary(const std::string& name, int64_t in, int64_t out, int64_t fn) {
    TORCH_CHECK(fn >= 0 && fn <= 6, name, ": unknown activation code ", fn);
    Step s{UNARY, name, {in}, out};
    s.ints = {fn};
    push(std::move(s));
  }
  void add_layer_norm(const std::string& name, int64_t in, int64_t out, std::vector<int64_t> shape,
                      c10::optional<torch::Tensor> weight, c10::optional<torch::Tensor> bias, double eps) {
    Step s{LAYERNORM, name, {in}, out};
    s.ints = std::move(shape);
    s.ts = {weight.has_value() ? weight->contiguous() : torch::Tensor(),
            bias.has_value() ? bias->contiguous() : torch::Tensor()};
    s.floats = {eps};
    push(std::move(s));
  }
  void add_softmax(const std::string& name, int64_t in, int64_t out, int64_t dim, bool log) {
    Step s{SOFTMAX, name, {in}, out};
    s.ints = {dim, log};
    push(std::move(s));
  }
  // x.permute(dims), made contiguous
  void add_permute(const std::string& name, int64_t in, int64_t out, std::vector<int64_t> dims) {
    Step s{PERMUTE, name, {in}, out};
    s.ints = std::move(dims);
    push(std::move(s));
  }
  void add_narrow(const std::string& name, int64_t in, int64_t out, int64_t dim, int64_t start, int64_t length) {
    Step s{NARROW, name, {in}, out};
    s.ints = {dim, start, length};
    push(std::move(s));
  }
  // x.reshape(shape) (shape[0] = -1: the batch)
  void add_reshape(const std::string& name, int64_t in, int64_t out, std::vector<int64_t> shape) {
    Step s{RESHAPE, name, {in}, out};
    s.ints = std::move(shape);
    push(std::move(s));
  }
  // scaled dot-product attention: in = {q, k, v} or {q, k, v, mask} (ATen's fused CPU kernel)
  void add_sdpa(const std::string& name, std::vector<int64_t> in, int64_t out, bool causal,
                c10::optional<double> scale) {
    TORCH_CHECK(in.size() == 3 || in.size() == 4, name, ": attention reads q, k, v and an optional mask");
    Step s{SDPA, name, std::move(in), out};
    s.ints = {causal, scale.has_value()};
    s.floats = {scale.value_or(0.0)};
    push(std::move(s));
  }
  // multi-head self-attention from a packed (B, T, 3 * heads * hd) qkv projection to the merged heads (B, T, heads * hd)
  // in = {qkv[, key padding mask (B, T)][, attention mask (T, T)]}, each mask bool (true = not attended) or float
  // (added to the scores), which of them are there given by key_padding / attn
  // multi-head attention (attention_qkv): in = {qkv (B, T, 3C)} or, cross-attention, {q (B, Tq, C), kv (B, Tk, 2C)},
  // then the key padding mask and the attention mask if present
  void add_mha(const std::string& name, std::vector<int64_t> in, int64_t out, int64_t heads, bool causal,
               c10::optional<double> scale, bool key_padding, bool attn, bool cross) {
    TORCH_CHECK(heads >= 1, name, ": attention needs at least one head");
    TORCH_CHECK(in.size() == 1 + (size_t)cross + (size_t)key_padding + (size_t)attn, name, ": attention reads ",
                cross ? "q, kv" : "qkv", key_padding ? ", a key padding mask" : "", attn ? ", an attention mask" : "",
                ", got ", in.size(), " inputs");
    Step s{MHA, name, std::move(in), out};
    s.ints = {heads, causal, scale.has_value(), key_padding, attn, cross};
    s.floats = {scale.value_or(0.0)};
    push(std::move(s));
  }
  // rows of `weight` (num_embeddings, dim) picked by integer ids: (..., dim)
  void add_embedding(const std::string& name, int64_t in, int64_t out, torch::Tensor weight) {
    TORCH_CHECK(weight.dim() == 2, name, ": an embedding weight must be 2-d, got ", weight.sizes());
    Step s{EMBEDDING, name, {in}, out};
    s.ts = {weight.contiguous()};
    push(std::move(s));
  }
  // x (1, ...) repeated over the batch of value `like` (a class token expanded to the batch), contiguous
  void add_expand(const std::string& name, int64_t in, int64_t like, int64_t out) { push(Step{EXPAND, name, {in, like}, out}); }
  // x OP scalar -> bool, OP 0 eq, 1 ne, 2 lt, 3 le, 4 gt, 5 ge
  void add_compare(const std::string& name, int64_t in, int64_t out, int64_t op, double scalar) {
    TORCH_CHECK(op >= 0 && op <= 5, name, ": comparison must be 0-5 (eq, ne, lt, le, gt, ge), got ", op);
    Step s{COMPARE, name, {in}, out};
    s.ints = {op};
    s.floats = {scalar};
    push(std::move(s));
  }
  // x (B, T, E) with the rows a (B, T) key padding mask marks zeroed, when in every row of the mask the padding comes
  // after the tokens (what nn.TransformerEncoder's nested-tensor path returns), else x unchanged
  void add_padzero(const std::string& name, int64_t in, int64_t mask, int64_t out) {
    push(Step{PADZERO, name, {in, mask}, out});
  }
  void add_cat(const std::string& name, std::vector<int64_t> in, int64_t out, int64_t dim) {
    Step s{CAT, name, std::move(in), out};
    s.ints = {dim};
    push(std::move(s));
  }

  // the lanes layout (lanes.cpp): in = {x (N, C, H, W)} -> lanes; out: in = {lanes, like} -> (N, C, H, W) with N
  // the batch of value `like` (the segment's NCHW input)
  void add_lanes_in(const std::string& name, int64_t in, int64_t out) { push(Step{LANES_IN, name, {in}, out}); }
  void add_lanes_out(const std::string& name, int64_t in, int64_t like, int64_t out) {
    push(Step{LANES_OUT, name, {in, like}, out});
  }
  // conv on lanes values: in = {x} or {x, residual}; 3x3 pad 1 or 1x1 pad 0, stride 1 or 2, groups 1; pool: a 2x2
  // max pooling at stride 2 of its output fused (no residual)
  void add_lanes_conv(const std::string& name, std::vector<int64_t> in, int64_t out, torch::Tensor weight,
                      c10::optional<torch::Tensor> bias, int64_t stride, int64_t pad, bool relu, bool pool) {
    TORCH_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3) &&
                    ((weight.size(2) == 3 && pad == 1) || (weight.size(2) == 1 && pad == 0)) &&
                    (stride == 1 || stride == 2),
                name, ": a lanes conv needs a 3x3 (pad 1) or 1x1 (pad 0) kernel at stride 1 or 2, got ",
                weight.sizes(), " pad ", pad, " stride ", stride);
    TORCH_CHECK(!pool || in.size() == 1, name, ": a lanes conv with a fused pooling takes no residual");
    Step s{LANES_CONV, name, std::move(in), out};
    s.ints = {weight.size(0), weight.size(2), weight.size(3), stride, pad, 1, pool};
    s.ts = {weight.contiguous().to(torch::kFloat32), bias.has_value() ? bias->contiguous() : torch::Tensor()};
    s.relu = relu;
    s.lanes = std::make_shared<LanesCache>();
    push(std::move(s));
  }
  // 2x2 max pooling at stride 2 on a lanes value
  void add_lanes_pool(const std::string& name, int64_t in, int64_t out) { push(Step{LANES_POOL, name, {in}, out}); }

  // The plan's inputs are its first values: one tensor (value 0) or several (values 0 .. n-1, in the order of the
  // model's forward arguments)
  torch::Tensor run(torch::Tensor x) { return run_inputs({std::move(x)}); }
  torch::Tensor run_inputs(const std::vector<torch::Tensor>& xs) {
    check_ids();
    check_inputs(xs);
    c10::InferenceMode guard;
    std::vector<torch::Tensor> v(nvals_);
    for (size_t i = 0; i < xs.size(); ++i) v[i] = xs[i].contiguous();
    run_steps(v, last_uses(), nullptr);
    return v[output_];
  }

  // per step: the median over `repeats` runs of its time in milliseconds (the whole plan runs each time)
  std::vector<double> profile(torch::Tensor x, int64_t repeats, int64_t warmup) {
    return profile_inputs({std::move(x)}, repeats, warmup);
  }
  std::vector<double> profile_inputs(const std::vector<torch::Tensor>& xs, int64_t repeats, int64_t warmup) {
    check_ids();
    check_inputs(xs);
    c10::InferenceMode guard;
    const size_t n = steps_.size();
    std::vector<std::vector<double>> t(n);
    const std::vector<int64_t> last = last_uses();  // (the same for every repetition)
    std::vector<double> once(n);
    for (int64_t r = 0; r < warmup + repeats; ++r) {
      std::vector<torch::Tensor> v(nvals_);
      for (size_t i = 0; i < xs.size(); ++i) v[i] = xs[i].contiguous();
      run_steps(v, last, &once);
      if (r >= warmup)
        for (size_t i = 0; i < n; ++i) t[i].push_back(once[i]);
    }
    std::vector<double> med(n, 0.0);
    for (size_t i = 0; i < n; ++i) {
      if (t[i].empty()) continue;
      std::sort(t[i].begin(), t[i].end());
      med[i] = t[i][t[i].size() / 2];
    }
    return med;
  }

  // whole-plan latency: median over `repeats` timed runs after `warmup` runs, in milliseconds
  double time(torch::Tensor x, int64_t repeats, int64_t warmup) { return time_inputs({std::move(x)}, repeats, warmup); }
  double time_inputs(const std::vector<torch::Tensor>& xs, int64_t repeats, int64_t warmup) {
    std::vector<double> t;
    for (int64_t r = 0; r < warmup + repeats; ++r) {
      auto a = std::chrono::steady_clock::now();
      run_inputs(xs);
      auto b = std::chrono::steady_clock::now();
      if (r >= warmup) t.push_back(std::chrono::duration<double, std::milli>(b - a).count());
    }
    std::sort(t.begin(), t.end());
    return t.empty() ? 0.0 : t[t.size() / 2];
  }

  int64_t size() const { return steps_.size(); }
  std::vector<std::string> names() const {
    std::vector<std::string> r;
    for (auto& s : steps_) r.push_back(s.name);
    return r;
  }

 private:
  // every value id a step reads or writes, and the output, within [0, num_values) (checked once, before a run)
  bool ids_ok_ = false;
  void push(Step s) {
    steps_.push_back(std::move(s));
    ids_ok_ = false;
  }
  void check_inputs(const std::vector<torch::Tensor>& xs) const {
    TORCH_CHECK(!xs.empty() && (int64_t)xs.size() <= nvals_, "plan: ", xs.size(), " inputs for a plan of ", nvals_,
                " values");
  }
  void check_ids() {
    if (ids_ok_) return;
    auto ok = [&](int64_t id) { return id >= 0 && id < nvals_; };
    TORCH_CHECK(ok(output_), "plan: output value ", output_, " is not among its ", nvals_, " values");
    for (auto& s : steps_) {
      TORCH_CHECK(ok(s.out), "plan step ", s.name, ": output value ", s.out, " is not among the ", nvals_, " values");
      for (int64_t j : s.in) TORCH_CHECK(ok(j), "plan step ", s.name, ": input value ", j, " out of range");
      for (int64_t j : s.outs) TORCH_CHECK(ok(j), "plan step ", s.name, ": output value ", j, " out of range");
    }
    ids_ok_ = true;
  }

  // Per value, the last step that reads it (-1: none; the plan's output: never released). Values are dropped right
  // after their last reader, so the allocator hands the next steps recently written, cache-warm blocks instead of
  // fresh ones (every activation of the run had stayed alive until its end: 1.7 MiB for the compact ResNet-56 at
  // batch 1, more than a core's L2; 200+ MiB for ResNet-56 at batch 64). Measured in one process, alternated (Zen 4
  // VM, 2 threads): sparse ResNet-56 at batch 64 1.29x (pattern) / 1.20x (90% unstructured) faster, the dense and
  // compact ones 1.02-1.03x, batch 1 level. Recomputed per run (a few hundred steps: well under a microsecond).
  std::vector<int64_t> last_uses() const {
    std::vector<int64_t> last(nvals_, -1);
    if (!g_release_values) return last;
    for (size_t i = 0; i < steps_.size(); ++i) {
      last[steps_[i].out] = std::max<int64_t>(last[steps_[i].out], (int64_t)i);
      for (int64_t o : steps_[i].outs) last[o] = std::max<int64_t>(last[o], (int64_t)i);
      for (int64_t j : steps_[i].in) last[j] = (int64_t)i;
    }
    if (output_ >= 0 && output_ < nvals_) last[output_] = -1;
    return last;
  }
  bool last_reader(size_t i, const std::vector<int64_t>& last) const {
    const Step& s = steps_[i];
    if (s.in.empty() || last[s.in[0]] != (int64_t)i) return false;
    for (size_t k = 1; k < s.in.size(); ++k)
      if (s.in[k] == s.in[0]) return false;
    return true;
  }
  void release(size_t i, const std::vector<int64_t>& last, std::vector<torch::Tensor>& v) const {
    if (!g_release_values) return;
    for (int64_t j : steps_[i].in)
      if (last[j] == (int64_t)i) v[j] = torch::Tensor();
    if (last[steps_[i].out] == (int64_t)i) v[steps_[i].out] = torch::Tensor();  // never read
    for (int64_t o : steps_[i].outs)
      if (last[o] == (int64_t)i) v[o] = torch::Tensor();
  }

  // One step: run, drop the values it read last, and (times) record its time in milliseconds.
  void step(size_t i, std::vector<torch::Tensor>& v, const std::vector<int64_t>& last, std::vector<double>* times) {
    if (!times) {
      v[steps_[i].out] = exec(steps_[i], v, last_reader(i, last));
      release(i, last, v);
      return;
    }
    auto a = std::chrono::steady_clock::now();
    v[steps_[i].out] = exec(steps_[i], v, last_reader(i, last));
    release(i, last, v);
    auto b = std::chrono::steady_clock::now();
    (*times)[i] = std::chrono::duration<double, std::milli>(b - a).count();
  }

  // Whether a step can run inside a team region, where ATen's own parallel loops run on the calling thread alone:
  // netcarve's kernels and views always; ATen element-wise ops, pads, concatenations and pools only on tensors
  // ATen would not split anyway (at most its grain of 32768 elements); ATen convs and large matmuls never.
  static bool small(const torch::Tensor& t) { return t.numel() <= 32768; }
  bool team_safe(const Step& s, const std::vector<torch::Tensor>& v) const {
    if (s.kind == PYTHON) return false;
    if (s.kind == CONST) return true;
    const torch::Tensor& x = v[s.in[0]];
    switch (s.kind) {
      case CONV:
        return s.conv_kernel != 0;
      case CONVT:
        return false;
      case LINEAR:
        return s.mats[0].native(x.dim() == 2 ? x : x.reshape({-1, x.size(-1)}));
      case RNN:
        for (auto& m : s.mats)
          if (!m.sparse && !(g_direct_linear && m.direct)) return false;
        return true;
      case MAXPOOL:
      case GAP:
      case SHORTCUT:
        return (g_native_pool && x.dim() == 4) || x.dim() == 5 || small(x);
      case FLATTEN:
      case SELECT:
        return true;
      case ADD:
        if (g_native_transformer && add_native_ok(x, v[s.in[1]])) return true;
        return small(x) && small(v[s.in[1]]);
      case MUL:
        return small(x) && small(v[s.in[1]]);
      case CAT:
        for (int64_t j : s.in)
          if (!small(v[j])) return false;
        return true;
      case RELU:
      case CLAMP:
        return (g_native_clamp && x.scalar_type() == torch::kFloat32) || small(x);
      case UNARY:
        return (native_unary(s, x)) || small(x);
      case LAYERNORM:
        return (g_native_transformer && x.scalar_type() == torch::kFloat32) || small(x);
      case MHA:
      case LANES_IN:
      case LANES_OUT:
      case LANES_CONV:
      case LANES_POOL:
        return true;
      case EXPAND:
        return x.scalar_type() == torch::kFloat32;
      case EMBEDDING:
        return x.numel() * s.ts[0].size(1) <= 32768;
      case AFFINE:
      case PAD:
      case MEAN:
      case AVGPOOL:
      case SOFTMAX:
      case PERMUTE:
      case RESHAPE:
        return small(x);
      case NARROW:
        return true;
      case COMPARE:
      case PADZERO:
        return small(x);
      case SDPA:
        return native_sdpa(s, v);
    }
    return false;
  }
  // (exact GELU over more than ATen's grain stays ATen's: 1.3-1.8x faster than netcarve's on 262k floats on the Intel
  // VM, alternated in one process; netcarve's is ~3x faster on 4k floats, where ATen's per-call overhead dominates)
  static bool native_unary(const Step& s, const torch::Tensor& x) {
    return g_native_transformer && unary_native_ok(s.ints[0]) && x.scalar_type() == torch::kFloat32 &&
           (s.ints[0] != 0 || small(x));
  }
  static bool native_sdpa(const Step& s, const std::vector<torch::Tensor>& v) {
    return g_native_transformer && s.in.size() == 3 && attention_native_ok(v[s.in[0]], v[s.in[1]], v[s.in[2]]);
  }

  // Whether a step may be team-safe, by its kind alone (before its inputs exist): all but ATen convs and dense RNNs
  static bool team_kind(const Step& s) {
    if (s.kind == PYTHON) return false;
    if (s.kind == CONV) return s.conv_kernel != 0;
    if (s.kind == CONVT) return false;
    if (s.kind == RNN) return s.sparse || (g_direct_linear && !s.mats.empty() && s.mats[0].direct);
    return true;
  }

  // Runs every step: runs of team-safe steps inside one OpenMP region of torch's pool as a nck::Team (the calling
  // thread runs the steps, the others their kernels' loops: no fork / join per loop), the others one by one.
  void run_steps(std::vector<torch::Tensor>& v, const std::vector<int64_t>& last, std::vector<double>* times) {
    const size_t n = steps_.size();
    const int64_t nt = at::get_num_threads();
    // One plan run at a time holds a team (plans called at once from several threads: the others fork and join per
    // loop, as libgomp's pool copes with more threads than cores; two spinning teams on 2 cores ran 6-9x slower)
    bool team = g_team && nt > 1 && !at::in_parallel_region() && nck::t_team == nullptr &&
                (g_team_backoff_ns <= 0 || now_ns() >= g_team_off_until.load(std::memory_order_relaxed));
    int expected = 0;
    if (team && !g_team_busy.compare_exchange_strong(expected, 1, std::memory_order_acquire)) team = false;
    struct Release {
      bool held;
      ~Release() {
        if (held) g_team_busy.store(0, std::memory_order_release);
      }
    } release_team{team};
    size_t i = 0;
    while (i < n) {
      // (a region for one step would cost the fork / join it saves: only where the next step can join it)
      if (!team || !team_safe(steps_[i], v) || i + 1 >= n || !team_kind(steps_[i + 1])) {
        step(i++, v, last, times);
        continue;
      }
      nck::Team tm;
      std::exception_ptr eptr;
      int64_t released = 0;
#pragma omp parallel num_threads(nt)
      {
        const int64_t tid = omp_get_thread_num();
        if (tid == 0) {
          tm.nt = omp_get_num_threads();
          nck::t_team = &tm;
          try {
            do step(i++, v, last, times);
            while (i < n && team_safe(steps_[i], v));
          } catch (...) {
            eptr = std::current_exception();
          }
          nck::t_team = nullptr;
          released = now_ns();
          tm.release();
        } else {
          tm.work();
        }
      }
      if (g_team_backoff_ns > 0 && now_ns() - released > g_team_stall_ns) {
        g_team_off_until.store(now_ns() + g_team_backoff_ns, std::memory_order_relaxed);
        g_team_stalls.fetch_add(1, std::memory_order_relaxed);
        team = false;  // (the rest of this run too)
      }
      if (eptr) std::rethrow_exception(eptr);
    }
  }

  torch::Tensor exec_python(Step& s, std::vector<torch::Tensor>& v) {
    py::gil_scoped_acquire g;
    py::tuple args(s.in.size());
    for (size_t k = 0; k < s.in.size(); ++k) args[k] = py::cast(v[s.in[k]]);
    py::object r = (*s.fn)(*args);
    py::tuple res = r.cast<py::tuple>();
    TORCH_CHECK(res.size() == s.outs.size(), s.name, ": the python step returned ", res.size(), " values, expected ",
                s.outs.size());
    for (size_t k = 1; k < s.outs.size(); ++k) v[s.outs[k]] = res[k].cast<torch::Tensor>();
    return res[0].cast<torch::Tensor>();
  }

  // in_last: this step is the last reader of its first input (which it may then overwrite: a native clamp)
  torch::Tensor exec(Step& s, std::vector<torch::Tensor>& v, bool in_last) {
    if (s.kind == PYTHON) return exec_python(s, v);
    if (s.kind == CONST) return s.ts[0];
    const torch::Tensor& x = v[s.in[0]];
    switch (s.kind) {
      case LANES_IN:
        return to_lanes(x);
      case LANES_OUT:
        return from_lanes(x, v[s.in[1]].size(0));
      case LANES_POOL:
        return lanes_maxpool2(x);
      case LANES_CONV: {
        TORCH_CHECK(x.dim() == 5 && x.size(1) == s.ts[0].size(1), s.name, ": the lanes conv expects ",
                    s.ts[0].size(1), " input channels, got ", x.sizes());
        auto taps = s.lanes->get(s.ts[0], x.size(2) - 2, x.size(3) - 2, s.ints[4], s.ints[3], s.ints[6] != 0);
        c10::optional<torch::Tensor> bias;
        if (s.ts[1].defined()) bias = s.ts[1];
        c10::optional<torch::Tensor> res;
        if (s.in.size() > 1) res = v[s.in[1]];
        return lanes_conv(x, *taps, s.ints[0], bias, res, s.ints[1], s.ints[3], s.ints[4], s.relu, s.ints[6] != 0);
      }
      case CONV: {
        const int64_t F = s.ints[0], kh = s.ints[1], kw = s.ints[2], st = s.ints[3], pd = s.ints[4], g = s.ints[5];
        c10::optional<torch::Tensor> bias;
        if (s.ts[1].defined()) bias = s.ts[1];
        c10::optional<torch::Tensor> res;
        if (s.in.size() > 1) res = v[s.in[1]];
        if (s.conv_kernel == 1)
          return sparse_conv2d(x, s.ts[2], s.ts[3], s.ts[4], s.ts[5], s.ts[6], bias, res, F, kh, kw, st, pd, s.relu,
                               s.offs.get());
        if (s.conv_kernel == 3) return gen_conv2d(x, *s.gen, bias, res, kh, kw, st, pd, s.relu);
        if (s.conv_kernel == 2)
          return direct_conv2d(x, s.ts[7], bias, res, F, kh, kw, st, pd, s.relu, s.offs.get());
        if (s.conv_kernel == 4) {
          TORCH_CHECK(x.dim() == 4 && x.size(1) == g, s.name, ": the depthwise conv expects ", g,
                      " input channels, got ", x.sizes());
          return depthwise_conv2d(x, s.ts[0], bias, res, st, pd, s.relu);
        }
        auto y = at::conv2d(x, s.ts[0], bias, {st, st}, {pd, pd}, {1, 1}, g);
        if (res) y.add_(*res);
        if (s.relu) y.relu_();
        return y;
      }
      case LINEAR: {
        if (x.dim() != 2) {  // (..., K): the leading dims as rows
          TORCH_CHECK(x.dim() > 2, s.name, ": a linear layer needs at least 2 input dims, got ", x.sizes());
          auto y = s.mats[0].apply(x.reshape({-1, x.size(-1)}));
          if (s.relu) y.relu_();
          auto sizes = x.sizes().vec();
          sizes.back() = y.size(1);
          return y.view(sizes);
        }
        auto y = s.mats[0].apply(x);
        if (s.relu) y.relu_();
        return y;
      }
      case UNARY:
        if (native_unary(s, x)) return unary_native(x, s.ints[0]);
        switch (s.ints[0]) {
          case 0: return at::gelu(x);
          case 1: return at::gelu(x, "tanh");
          case 2: return at::silu(x);
          case 3: return at::sigmoid(x);
          case 4: return at::tanh(x);
          case 5: return at::hardswish(x);
          default: return at::hardsigmoid(x);
        }
      case LAYERNORM: {
        c10::optional<torch::Tensor> w, b;
        if (s.ts[0].defined()) w = s.ts[0];
        if (s.ts[1].defined()) b = s.ts[1];
        if (g_native_transformer && x.scalar_type() == torch::kFloat32) {
          const int64_t nd = (int64_t)s.ints.size();
          bool ok = x.dim() >= nd;
          for (int64_t d = 0; ok && d < nd; ++d) ok = x.size(x.dim() - nd + d) == s.ints[d];
          TORCH_CHECK(ok, s.name, ": layer norm over ", c10::IntArrayRef(s.ints), " of an input of shape ", x.sizes());
          return layer_norm_native(x, nd, w, b, s.floats[0]);
        }
        return at::layer_norm(x, s.ints, w, b, s.floats[0]);
      }
      case SOFTMAX:
        return s.ints[1] ? at::log_softmax(x, s.ints[0]) : at::softmax(x, s.ints[0]);
      case PERMUTE:
        return x.permute(s.ints).contiguous();
      case NARROW:
        return x.narrow(s.ints[0], s.ints[1], s.ints[2]);
      case RESHAPE:
        return x.reshape(s.ints);
      case SDPA: {
        c10::optional<torch::Tensor> mask;
        if (s.in.size() > 3) mask = v[s.in[3]];
        c10::optional<double> scale;
        if (s.ints[1]) scale = s.floats[0];
        if (native_sdpa(s, v)) return attention_native(x, v[s.in[1]], v[s.in[2]], s.ints[0] != 0, scale);
        return at::scaled_dot_product_attention(x, v[s.in[1]], v[s.in[2]], mask, 0.0, s.ints[0] != 0, scale);
      }
      case EMBEDDING: {
        TORCH_CHECK(!x.is_floating_point() && !x.is_complex(), s.name, ": an embedding takes integer ids, got ",
                    x.scalar_type());
        const int64_t n = s.ts[0].size(0);
        if (x.numel()) {
          const int64_t lo = x.min().item<int64_t>(), hi = x.max().item<int64_t>();
          TORCH_CHECK(lo >= 0 && hi < n, s.name, ": token ids must be in [0, ", n, "), got ids from ", lo, " to ", hi);
        }
        return at::embedding(s.ts[0], x);
      }
      case EXPAND: {
        const int64_t B = v[s.in[1]].size(0);
        TORCH_CHECK(x.dim() >= 1 && x.size(0) == 1, s.name, ": expanding a tensor of shape ", x.sizes(),
                    " over the batch (its first size must be 1)");
        auto sizes = x.sizes().vec();
        sizes[0] = B;
        if (x.scalar_type() != torch::kFloat32) return x.expand(sizes).contiguous();
        auto xc = x.contiguous();
        auto y = torch::empty(sizes, xc.options());
        const int64_t n = xc.numel();
        for (int64_t b = 0; b < B; ++b) std::copy(xc.data_ptr<float>(), xc.data_ptr<float>() + n, y.data_ptr<float>() + b * n);
        return y;
      }
      case MHA: {
        c10::optional<double> scale;
        if (s.ints[2]) scale = s.floats[0];
        const bool cross = s.ints[5] != 0;
        const int64_t parts = cross ? 1 : 3;
        TORCH_CHECK(x.dim() == 3 && x.size(2) % (parts * s.ints[0]) == 0, s.name, ": attention expects a (B, T, ",
                    cross ? "" : "3 x ", s.ints[0], " heads x head_dim) ", cross ? "q" : "qkv", " input, got ",
                    x.sizes());
        c10::optional<torch::Tensor> kv, kpm, atm;
        if (cross) kv = v[s.in[1]];
        if (s.ints[3]) kpm = v[s.in[1 + cross]];
        if (s.ints[4]) atm = v[s.in[1 + cross + s.ints[3]]];
        if (g_native_transformer && x.scalar_type() == torch::kFloat32)
          return attention_qkv(x, s.ints[0], s.ints[1] != 0, scale, kpm, atm, kv);
        const int64_t B = x.size(0), T = x.size(1), H = s.ints[0], hd = x.size(2) / parts / H;
        torch::Tensor q, k, vv;
        if (cross) {
          TORCH_CHECK(kv->dim() == 3 && kv->size(0) == B && kv->size(2) == 2 * H * hd, s.name,
                      ": cross-attention expects a (B, Tk, 2 x heads x head_dim) kv input, got ", kv->sizes());
          q = x.reshape({B, T, H, hd}).transpose(1, 2);
          auto kvh = kv->reshape({B, kv->size(1), 2, H, hd}).permute({2, 0, 3, 1, 4});
          k = kvh[0];
          vv = kvh[1];
        } else {
          auto qkv = x.reshape({B, T, 3, H, hd}).permute({2, 0, 3, 1, 4});
          q = qkv[0];
          k = qkv[1];
          vv = qkv[2];
        }
        const int64_t Tk = k.size(2);
        c10::optional<torch::Tensor> am;
        if (kpm.has_value() || atm.has_value()) {  // one additive mask (causal too)
          auto kb = torch::zeros({B, 1, T, Tk}, torch::kFloat32);
          if (kpm.has_value()) kb = kb + key_padding_bias(*kpm, B, Tk).view({B, 1, 1, Tk});
          if (atm.has_value()) kb = kb + attn_mask_bias(*atm, T, Tk);
          if (s.ints[1] != 0)
            kb = kb + torch::zeros({T, Tk}, kb.options()).masked_fill_(
                          torch::ones({T, Tk}, torch::kBool).triu(1), -std::numeric_limits<float>::infinity());
          am = kb.to(x.scalar_type());
        }
        auto o = at::scaled_dot_product_attention(q, k, vv, am, 0.0, s.ints[1] != 0 && !am.has_value(), scale);
        return o.transpose(1, 2).reshape({B, T, H * hd});
      }
      case COMPARE: {
        const double c = s.floats[0];
        switch (s.ints[0]) {
          case 0: return at::eq(x, c);
          case 1: return at::ne(x, c);
          case 2: return at::lt(x, c);
          case 3: return at::le(x, c);
          case 4: return at::gt(x, c);
          default: return at::ge(x, c);
        }
      }
      case PADZERO: {
        const torch::Tensor& m = v[s.in[1]];
        TORCH_CHECK(m.scalar_type() == torch::kBool && m.dim() == 2 && x.dim() == 3 && m.size(0) == x.size(0) &&
                        m.size(1) == x.size(1), s.name, ": expects a (B, T, E) value and a bool (B, T) key padding ",
                    "mask, got ", x.sizes(), " and ", m.sizes(), " ", m.scalar_type());
        // left-aligned: no token after a padding position, i.e. the mask never goes from true back to false
        const int64_t T = m.size(1);
        if (T > 1 && at::logical_and(m.narrow(1, 0, T - 1), m.narrow(1, 1, T - 1).logical_not()).any().item<bool>())
          return x;
        return x.masked_fill(m.unsqueeze(-1), 0.0);
      }
      case RNN: {
        const bool lstm = s.ints[0] != 0, bf = s.ints[2] != 0;
        const size_t D = (size_t)s.ints[3];
        auto h = bf ? x : x.transpose(0, 1);
        for (size_t l = 0; l + 2 * D <= s.mats.size(); l += 2 * D) {
          auto in = h.contiguous();
          h = rnn_layer(in, s.mats[l], s.mats[l + 1], s.ints[1], lstm, false);
          if (D == 2) h = at::cat({h, rnn_layer(in, s.mats[l + 2], s.mats[l + 3], s.ints[1], lstm, true)}, 2);
        }
        return bf ? h : h.transpose(0, 1).contiguous();
      }
      case SELECT:
        return x.select(s.ints[0], s.ints[1]);
      case MEAN:
        return at::mean(x, {s.ints[0]}, s.ints[1] != 0);
      case AFFINE: {
        auto y = at::addcmul(s.ts[1], x, s.ts[0]);
        if (s.relu) y.relu_();
        return y;
      }
      case RELU:
        return at::relu(x);
      case CLAMP:
        if (g_native_clamp && x.scalar_type() == torch::kFloat32)
          return clamp_native(x, s.floats[0], s.floats[1], in_last && x.is_contiguous() && x.use_count() == 1 &&
                                                              x.storage().use_count() == 1);
        return at::clamp(x, s.floats[0], s.floats[1]);
      case ADD: {
        if (g_native_transformer && add_native_ok(x, v[s.in[1]])) return add_native(x, v[s.in[1]], s.relu);
        auto y = at::add(x, v[s.in[1]]);
        if (s.relu) y.relu_();
        return y;
      }
      case MUL:
        return at::mul(x, v[s.in[1]]);
      case MAXPOOL:
        if (g_native_pool)
          return max_pool2d(x, s.ints[0], s.ints[1], s.ints[2], s.ints[3], s.ints[4], s.ints[5], s.ints[6] != 0);
        return at::max_pool2d(x, {s.ints[0], s.ints[1]}, {s.ints[2], s.ints[3]}, {s.ints[4], s.ints[5]}, {1, 1},
                              s.ints[6] != 0);
      case AVGPOOL:
        return at::avg_pool2d(x, {s.ints[0], s.ints[1]}, {s.ints[2], s.ints[3]}, {s.ints[4], s.ints[5]},
                              s.ints[6] != 0, s.ints[7] != 0);
      case GAP:
        if (x.dim() == 5) return lanes_gap(x);
        if (g_native_pool && x.dim() == 4) return global_avg_pool(x);
        return at::mean(x, {2, 3}, true);
      case FLATTEN:
        return x.flatten(s.ints[0]);
      case SHORTCUT: {
        const int64_t st = s.ints[0], C = s.ints[1], before = s.ints[2];
        if (x.dim() == 5) {
          if (!s.ts.empty()) return lanes_shortcut(x, st, C, before, s.ts[0], s.ts[1]);
          return lanes_shortcut(x, st, C, before, c10::nullopt, c10::nullopt);
        }
        if (g_native_pool && x.dim() == 4 && (!s.ts.empty() || (before >= 0 && before + x.size(1) <= C))) {
          if (!s.ts.empty()) return shortcut_subsample(x, st, C, before, s.ts[0], s.ts[1]);
          return shortcut_subsample(x, st, C, before, c10::nullopt, c10::nullopt);
        }
        auto y = x.slice(2, 0, x.size(2), st).slice(3, 0, x.size(3), st);
        if (!s.ts.empty()) {
          auto out = at::zeros({y.size(0), C, y.size(2), y.size(3)}, y.options());
          return out.index_copy_(1, s.ts[1], y.index_select(1, s.ts[0]));
        }
        return at::constant_pad_nd(y, {0, 0, 0, 0, before, C - y.size(1) - before}, 0.0);
      }
      case PAD:
        return at::constant_pad_nd(x, s.ints, s.floats[0]);
      case CONVT: {
        const auto& q = s.ints;
        c10::optional<torch::Tensor> b;
        if (s.ts.size() > 1) b = s.ts[1];
        return at::conv_transpose2d(x, s.ts[0], b, {q[0], q[1]}, {q[2], q[3]}, {q[4], q[5]}, q[8], {q[6], q[7]});
      }
      case CAT: {
        std::vector<torch::Tensor> xs;
        for (auto i : s.in) xs.push_back(v[i]);
        return at::cat(xs, s.ints[0]);
      }
      case PYTHON:
      case CONST:
        break;
    }
    TORCH_CHECK(false, "unknown step kind");
  }

  int64_t nvals_, output_;
  std::vector<Step> steps_;
};

std::string build_info() {
#if defined(__AVX512F__)
  std::string s = "vector 16 x fp32, AVX-512";
#elif defined(__AVX2__)
  std::string s = "vector 8 x fp32, AVX2";
#else
  std::string s = "vector 8 x fp32, generic";
#endif
  s += ", torch thread pool (" + std::to_string(at::get_num_threads()) + " threads)";
  return s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_conv2d",
        [](torch::Tensor x, torch::Tensor tp, torch::Tensor tc, torch::Tensor tq, torch::Tensor tw, torch::Tensor fo,
           c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> res, int64_t F, int64_t kh, int64_t kw,
           int64_t stride, int64_t pad, bool relu) {
          return sparse_conv2d(x, tp, tc, tq, tw, fo, bias, res, F, kh, kw, stride, pad, relu);
        },
        "direct sparse conv2d over non-zero taps (fp32)");
  m.def("depthwise_conv2d", &depthwise_conv2d,
        "depthwise conv2d (groups = channels), bias / residual / ReLU fused (fp32)");
  m.def("direct_conv2d",
        [](torch::Tensor x, torch::Tensor wp, c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> res,
           int64_t F, int64_t kh, int64_t kw, int64_t stride, int64_t pad, bool relu) {
          return direct_conv2d(x, wp, bias, res, F, kh, kw, stride, pad, relu);
        },
        "dense conv2d, register-blocked direct convolution (fp32)");
  m.def("set_lean_steps", [](bool v) { g_lean_steps = v; },
        "conv outputs allocated without the dispatcher, plan steps' direct convs' band offsets kept in the step's cache "
        "(default on; off: torch::empty and the offsets per call)");
  m.def("set_phase_split", [](bool v) { g_phase_split = v; },
        "stride > 1 band planes of the banded conv paths: phase columns computed once per call, AVX-512 stride-2 rows "
        "split into both phases from one load (default on; off: the earlier copy, divisions per row and one permute "
        "pass per phase)");
  m.def("set_direct_im2col_max", [](int64_t v) { g_direct_im2col_max = v; },
        "largest im2col matrix (floats) direct_conv2d builds for small outputs (default 2^17; 0 = never, "
        "-1 = always where the row layout does not apply)");
  m.def("set_banded", [](bool v) { g_banded = v; },
        "row-layout convs: each thread builds and computes its own output rows (default on; off: shared planes)");
  m.def("set_team", [](bool v) { g_team = v; },
        "plans run consecutive steps of netcarve's kernels inside one OpenMP region, the kernels' loops handed to the "
        "waiting threads through atomics (default on; off: an OpenMP fork and join per loop)");
  m.def("team", []() { return g_team; });
  m.def("set_team_backoff", [](int64_t stall_ns, int64_t backoff_ns) {
        g_team_stall_ns = stall_ns;
        g_team_backoff_ns = backoff_ns;
        g_team_off_until.store(0);
      },
        "team back-off: a team region whose closing barrier waits longer than stall_ns (default 100 us: another "
        "process holds a core) switches teams off for backoff_ns (default 200 ms; <= 0: never)",
        py::arg("stall_ns"), py::arg("backoff_ns"));
  m.def("team_stalls", []() { return g_team_stalls.load(); }, "team regions that triggered the back-off so far");
  m.def("set_native_transformer", [](bool v) { g_native_transformer = v; },
        "plans run attention, LayerNorm, GELU / SiLU / sigmoid / hardswish and same-shape additions with netcarve's "
        "kernels (default) or ATen's");
  m.def("native_transformer", []() { return g_native_transformer; });
  m.def("set_attention_transpose", [](bool v) { g_attention_transpose = v; },
        "attention transposes K per head with register transposes (default) or scalar copies");
  m.def("attention", &attention_native, "softmax(scale q k^T) v, float32 (B, [H,] L, E)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("causal") = false, py::arg("scale") = py::none());
  m.def("attention_qkv", &attention_qkv,
        "multi-head self-attention from a packed (B, T, 3 C) qkv projection, or cross-attention from q (B, Tq, C) and "
        "a packed (B, Tk, 2 C) kv projection",
        py::arg("qkv"), py::arg("heads"), py::arg("causal") = false, py::arg("scale") = py::none(),
        py::arg("key_padding_mask") = py::none(), py::arg("attn_mask") = py::none(), py::arg("kv") = py::none());
  m.def("layer_norm", &layer_norm_native, "LayerNorm over the trailing ndims dims", py::arg("x"), py::arg("ndims"),
        py::arg("weight") = py::none(), py::arg("bias") = py::none(), py::arg("eps") = 1e-5);
  m.def("add", &add_native, "a + b (then ReLU) for float32 tensors of one shape", py::arg("a"), py::arg("b"),
        py::arg("relu") = false);
  m.def("activation", &unary_native, "element-wise activation by plan code (netcarve/runtime/plan.py UNARY_FNS)",
        py::arg("x"), py::arg("fn"));
  m.def("set_native_clamp", [](bool v) { g_native_clamp = v; },
        "plans run clamps (ReLU6, Hardtanh) with netcarve's kernel, in place on a value nothing reads later (default "
        "on; off: ATen's clamp)");
  m.def("clamp_native", &clamp_native, "clamp of a float32 tensor (NaN stays NaN), in place if asked",
        py::arg("x"), py::arg("lo"), py::arg("hi"), py::arg("in_place") = false);
  m.def("set_release_values", [](bool v) { g_release_values = v; },
        "plans drop each value after its last reader (default on; off: every value lives until the run ends)");
  m.def("set_small_narrow", [](bool v) { g_small_narrow = v; },
        "small outputs of at most 4 / 8 positions gather 4- / 8-float im2col rows (default on; off: 16-float rows)");
  m.def("set_small_rowtaps", [](bool v) { g_small_rowtaps = v; },
        "plan steps with small sparse conv outputs (im2col path, one or two vectors) run from taps regrouped by "
        "im2col row, a filter group per thread (default off: per-filter tap lists, gathered rows)");
  m.def("set_batched_small", [](bool v) { g_batched_small = v; },
        "sparse convs whose 4x4 / 2x2 outputs span several vectors (large batches) run as the sparse weight times "
        "L1-sized tiles of the im2col matrix (default on; off: the padded wide grid)");
  m.def("set_batched_fill", [](double v) { g_batched_fill = v; },
        "the batched path takes outputs that fill less than this fraction of the padded wide grid (default 0.6)");
  m.def("batched_fill", []() { return g_batched_fill; });
  m.def("set_multirow", [](bool v) { g_multirow = v; },
        "sparse convs whose output rows are narrower than a vector (8x8 with AVX-512, 4x4 / 2x2) run several rows per "
        "vector from kw shifted copies of the input (default on; off: the wide grid)");
  m.def("set_multirow_min_vectors", [](int64_t v) { g_multirow_min_vectors = v; },
        "the multi-row path takes outputs of at least this many vectors (N * Ho * Wo / VL; default 64)");
  m.def("multirow_min_vectors", []() { return g_multirow_min_vectors; });
  m.def("set_kx_jobs", [](int64_t v) { g_kx_jobs = std::max<int64_t>(1, v); },
        "kx-split and tiny-map paths: at least this many jobs (blocks x filter groups) per thread (default 4)");
  m.def("set_tiny_2x2_kernels", [](bool v) { g_tiny_2x2_kernels = v; },
        "tiny-map path, 2x2 maps: one 4 x 4 matrix per kernel (off: per kernel position)");
  m.def("set_tiny_maps", [](bool v) { g_tiny_maps = v; },
        "3x3 stride-1 sparse convs on 4x4 / 2x2 maps at small batches: the tiny-map path (AVX-512; off: im2col gather)");
  m.def("tiny_max_batch", []() { return g_tiny_max_batch; });
  m.def("set_tiny_max_batch", [](int64_t v) { g_tiny_max_batch = std::min<int64_t>(std::max<int64_t>(0, v), 1 << 20); },
        "tiny-map path: largest batch (default 16)");
  m.def("set_kx_stage", [](bool v) { g_kx_stage = v; },
        "kx-split path: copy each block's input rows (and halo) into a per-thread buffer first where they exceed "
        "kx_stage_bytes, blocks have 4+ rows and the channel planes are a multiple of 4 KiB apart (off: read the input "
        "in place)");
  m.def("set_kx_stage_bytes", [](int64_t v) { g_kx_stage_bytes = std::max<int64_t>(0, v); },
        "kx-split path: stage blocks whose rows (with the halo, all channels) exceed this many bytes (default 32768)");
  m.def("kx_stage_bytes", []() { return g_kx_stage_bytes; });
  m.def("kx_stage_calls", []() { return g_kx_calls.load(); }, "kx-split calls that staged their rows so far");
  m.def("set_kx_split", [](bool v) { g_kx_split = v; },
        "3x3 stride-1 sparse convs with rows of 1, 2, 4 or 8 vectors: the kx-split path (AVX-512; off: banded rows)");
  m.def("set_half_rows", [](bool v) { g_half_rows = v; },
        "AVX-512 builds: sparse and dense direct convs with output rows of 8 (8x8 maps) use the banded row layout "
        "with 8-float vectors (default on; off: the 16-float wide grid, or multi-row at large batches)");
  m.def("set_direct_balanced_split", [](bool v) { g_direct_balanced_split = v; },
        "direct convs split rows or filter blocks over the threads by the register blocks of the busiest thread "
        "(default on; off: the earlier rule, filter blocks for outputs under 4 register blocks per thread)");
  m.def("direct_split", &direct_split,
        "the bands direct_conv2d cuts its N * Ho output rows (vpr row vectors each) into for FB blocks of 8 filters "
        "over nt threads (1: the filter blocks are split over the threads instead)");
  m.def("set_band_copy_rows", [](bool v) { g_band_copy_rows = v; },
        "AVX-512 builds: stride-1 band planes of the banded conv paths written row by row with masked vector loads "
        "and stores, stride-2 rows split into their phases by vector permutes (default on; off: a memset of the "
        "band then a memcpy per row / a scalar loop)");
  m.def("set_sparse_band_min_vectors", [](int64_t v) { g_sparse_band_min_vectors = v; },
        "banded sparse convs split the output rows over the threads when each gets at least this many row vectors, "
        "else the filters (default 8)");
  m.def("sparse_band_min_vectors", []() { return g_sparse_band_min_vectors; });
  m.def("set_bsr_row_tile", [](int64_t v) { g_bsr_row_tile = std::max<int64_t>(0, v); },
        "BSR matmuls of more than 2x this many rows run in row tiles of this size, split over the threads (default 32; "
        "0: all rows transposed at once)");
  m.def("bsr_row_tile", []() { return g_bsr_row_tile; });
  m.def("set_dense_small_linear", [](bool v) { g_dense_small_linear = v; },
        "dense linear and LSTM / GRU gate matmuls of at most 4 batch rows run netcarve's dot-product kernel (default "
        "on; off: ATen's addmm)");
  m.def("set_direct_linear", [](bool v) { g_direct_linear = v; },
        "linears the autotuner put on netcarve's dense panel kernel run on it (default) or on ATen's addmm");
  m.def("set_bsr_rows16", [](bool v) { g_bsr_rows16 = v; },
        "AVX-512 builds: BSR matmuls at batch 1 reduce 16 output rows at a time into one vector (default on; off: per "
        "block row, lane sums and scalar stores)");
  m.def("set_bsr_cols", [](bool v) { g_bsr_cols = v; },
        "AVX-512 builds: plans' BSR matmuls with tiles 16 rows tall keep the tiles transposed too and run with the "
        "output rows in the vector lanes at every batch (default on; off: the batch-1 reduction / batched transposed "
        "paths)");
  m.def("bsr_linear_t", &bsr_linear_t, "bsr_linear with transposed 16-row tiles (values_t = bsr_tiles_t(values))");
  m.def("bsr_tiles_t", &bsr_tiles_t, "(nb, 16, bw) BSR tiles transposed to (nb, bw, 16); undefined otherwise");
  m.def("set_bsr_batched_min", [](int64_t v) { g_bsr_batched_min = std::max<int64_t>(8, v); },
        "AVX-512 builds: BSR matmuls not run by bsr_cols reduce 16 output rows per batch row below this batch and "
        "take the transposed batched path from it on (default 8, the least)");
  m.def("bsr_batched_min", []() { return g_bsr_batched_min; });
  m.def("set_transpose16", [](bool v) { g_transpose16 = v; },
        "AVX-512 builds: the batched BSR path transposes x and y in 16 x 16 register blocks (default on; off: 8 x 8 "
        "blocks)");
  m.def("set_fused_store", [](bool v) { g_fused_store = v; },
        "sparse convs in the row layout (and multi-row) and banded direct convs store each filter's block straight "
        "from the accumulator registers, with bias / residual / ReLU (default on; off: through a buffer, as before)");
  m.def("batched_tile", []() { return std::make_tuple(g_batched_nv, g_batched_block); });
  m.def("set_batched_tile", [](int64_t nv, int64_t block) { g_batched_nv = nv; g_batched_block = block; },
        "the batched path's tile: nv accumulator vectors (2, 4 or 8; 0 = by output size, the default) by block bytes of "
        "im2col rows (default 49152 with AVX-512, 24576 otherwise)");
  m.def("set_row_layout", [](bool v) { g_row_layout = v; },
        "run direct_conv2d and sparse_conv2d in the row layout where the output width is a multiple of the vector "
        "(default on)");
  m.def("max_pool2d", &max_pool2d, "max pooling of NCHW fp32 (dilation 1; torch's semantics)");
  m.def("set_native_pool", [](bool v) { g_native_pool = v; },
        "plans run max pooling, global average pooling and option-A shortcuts with netcarve's kernels (default on; "
        "off: ATen's ops)");
  m.def("set_pool_flat", [](bool v) { g_pool_flat = v; },
        "AVX-512: 2x2 / stride-2 max pooling of even maps 2-32 wide over the whole tensor (default on; off: per plane)");
  m.def("native_pool", []() { return g_native_pool; }, "whether plans pool with netcarve's kernels");
  m.def("global_avg_pool", &global_avg_pool, "(N, C, H, W) -> (N, C, 1, 1) plane means (fp32)");
  m.def("shortcut_subsample", &shortcut_subsample,
        "option-A shortcut: subsample by stride, channels at an offset or by a src / dst map, zeros elsewhere");
  m.def("bsr_linear", &bsr_linear, "y = x W^T + b with W in BSR tiles (fp32)");
  m.def("pack_panels", [](torch::Tensor w, c10::optional<torch::Tensor> bias) {
    MatW m;
    m.w = w.contiguous();
    if (bias.has_value() && bias->defined()) m.bias = bias->contiguous();
    pack_direct(m);
    return std::make_tuple(m.wp, m.bp);
  }, "w^T in column panels and the padded bias for dense_panel", py::arg("weight"), py::arg("bias"));
  m.def("dense_panel", &dense_panel, "y = x W^T + b by the dense panel kernel (W packed by pack_panels)",
        py::arg("x"), py::arg("wp"), py::arg("bp"), py::arg("out_features"));
  m.def("build_info", &build_info);
  m.def("to_lanes", &to_lanes, "(N, C, H, W) float32 -> lanes (ceil(N / 16), C, H + 2, W + 2, 16), zero borders");
  m.def("from_lanes", &from_lanes, "lanes -> (N, C, H, W)", py::arg("x"), py::arg("n"));
  m.def("lanes_conv", [](torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias,
                         c10::optional<torch::Tensor> residual, int64_t stride, int64_t pad, bool relu, bool pool) {
        TORCH_CHECK(x.dim() == 5, "lanes_conv: expected a lanes tensor, got ", x.sizes());
        const int64_t H = x.size(2) - 2, W = x.size(3) - 2, Ho = (H + 2 * pad - weight.size(2)) / stride + 1,
                      Wo = (W + 2 * pad - weight.size(3)) / stride + 1;
        auto t = lanes_taps(weight, H, W, pad, lanes_chunk(weight.size(1), stride, Ho, Wo, pool));
        return lanes_conv(x, t, weight.size(0), bias, residual, weight.size(2), stride, pad, relu, pool);
      }, "conv of a lanes tensor (3x3 pad 1 or 1x1 pad 0, stride 1 or 2; bias, residual, ReLU, 2x2 max pooling fused)",
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("residual"), py::arg("stride"), py::arg("pad"),
      py::arg("relu"), py::arg("pool") = false);
  m.def("lanes_maxpool2", &lanes_maxpool2, "2x2 max pooling at stride 2 of a lanes tensor");
  m.def("lanes_shortcut", &lanes_shortcut, "option-A shortcut of a lanes tensor (subsample, channels placed)",
        py::arg("x"), py::arg("stride"), py::arg("channels"), py::arg("before"), py::arg("src"), py::arg("dst"));
  m.def("lanes_gap", &lanes_gap, "global average pooling of a lanes tensor -> (G, C, 3, 3, 16)");
  m.def("set_lanes_pixels", [](int64_t v) { g_lanes_pixels = std::min<int64_t>(16, std::max<int64_t>(1, v)); },
        "output pixels per register block of the lanes conv (1-16; default 8)");
  m.def("set_lanes_chunk_bytes", [](int64_t v) { g_lanes_chunk_bytes = std::max<int64_t>(64, v); },
        "bytes of a lanes conv chunk's input window (default 32768)");
  m.def("lanes_settings", []() { return std::make_tuple(g_lanes_pixels, g_lanes_chunk_bytes); });
  m.def("set_parallel_threshold", [](int64_t v) { g_parallel_threshold = v; },
        "multiply-adds below which kernels run on the calling thread (default 2^16)");
  m.def("parallel_threshold", []() { return g_parallel_threshold; });
  m.def("set_small_max_vectors", [](int64_t v) { g_small_max_vectors = v; },
        "largest output (in 16-float vectors) that takes the im2col path of sparse_conv2d (default 4; 0 = never)");
  m.def("set_gen_tiles", [](int64_t v) { g_gen_tiles = v; },
        "column tiles of 16 per job of generated convs (0: by size, at most 8)");
  m.def("set_gen_block_outer", [](bool v) { g_gen_block_outer = v; },
        "generated convs: per K chunk, run each block's function over the job's tiles back to back (code reuse) "
        "instead of each tile through every block (data reuse; default)");
  m.def("gen_conv_info", [](const std::string& path) {
        auto g = load_gen_conv(path);
        return std::vector<int64_t>{g->F, g->K, g->nblocks, g->nkc, g->kc};
      }, "(F, K, blocks, chunks, rows per chunk) of a generated conv library; raises if it does not load");
  py::class_<Plan>(m, "Plan")
      .def(py::init<int64_t, int64_t>())
      .def("add_conv", &Plan::add_conv)
      .def("add_conv_gen", &Plan::add_conv_gen)
      .def("add_linear", &Plan::add_linear, py::arg("name"), py::arg("in"), py::arg("out"), py::arg("weight"),
           py::arg("bias"), py::arg("relu"), py::arg("bsr"), py::arg("sparse"), py::arg("direct"),
           py::arg("panels") = std::vector<torch::Tensor>{})
      .def("add_affine", &Plan::add_affine)
      .def("add_relu", &Plan::add_relu)
      .def("add_clamp", &Plan::add_clamp)
      .def("add_add", &Plan::add_add)
      .def("add_mul", &Plan::add_mul)
      .def("add_pool", &Plan::add_pool)
      .def("add_gap", &Plan::add_gap)
      .def("add_flatten", &Plan::add_flatten)
      .def("add_shortcut", &Plan::add_shortcut)
      .def("add_cat", &Plan::add_cat)
      .def("add_python", &Plan::add_python)
      .def("add_const", &Plan::add_const)
      .def("add_unary", &Plan::add_unary)
      .def("add_layer_norm", &Plan::add_layer_norm)
      .def("add_softmax", &Plan::add_softmax)
      .def("add_permute", &Plan::add_permute)
      .def("add_narrow", &Plan::add_narrow)
      .def("add_reshape", &Plan::add_reshape)
      .def("add_sdpa", &Plan::add_sdpa)
      .def("add_mha", &Plan::add_mha)
      .def("add_expand", &Plan::add_expand)
      .def("add_compare", &Plan::add_compare)
      .def("add_padzero", &Plan::add_padzero)
      .def("add_embedding", &Plan::add_embedding)
      .def("add_pad", &Plan::add_pad)
      .def("add_conv_transpose", &Plan::add_conv_transpose)
      .def("add_rnn", &Plan::add_rnn, py::arg("name"), py::arg("in"), py::arg("out"), py::arg("lstm"),
           py::arg("hidden"), py::arg("batch_first"), py::arg("dense"), py::arg("bsr"), py::arg("sparse"),
           py::arg("dirs"), py::arg("direct"), py::arg("panels") = std::vector<torch::Tensor>{})
      .def("add_select", &Plan::add_select)
      .def("add_mean", &Plan::add_mean)
      .def("add_lanes_in", &Plan::add_lanes_in)
      .def("add_lanes_out", &Plan::add_lanes_out)
      .def("add_lanes_conv", &Plan::add_lanes_conv)
      .def("add_lanes_pool", &Plan::add_lanes_pool)
      .def("run", &Plan::run, py::call_guard<py::gil_scoped_release>())
      .def("run", &Plan::run_inputs, py::call_guard<py::gil_scoped_release>())
      .def("profile", &Plan::profile, py::call_guard<py::gil_scoped_release>())
      .def("profile", &Plan::profile_inputs, py::call_guard<py::gil_scoped_release>())
      .def("time", &Plan::time, py::call_guard<py::gil_scoped_release>())
      .def("time", &Plan::time_inputs, py::call_guard<py::gil_scoped_release>())
      .def("size", &Plan::size)
      .def("names", &Plan::names);
}
