// netcarve native kernels: declarations shared by the kernel and executor sources.
#pragma once
#include <torch/extension.h>

// Work (multiply-adds) below which a kernel runs on the calling thread instead of waking torch's thread team.
// Waking a sleeping OpenMP team costs tens of microseconds on small VMs; with OMP_WAIT_POLICY=ACTIVE (threads
// spin, as onnxruntime's do by default) a lower threshold pays off. Set with set_parallel_threshold().
extern int64_t g_parallel_threshold;
// Outputs of at most this many 16-float vectors (N * Ho * Wo) take the im2col path of sparse_conv2d.
extern int64_t g_small_max_vectors;

torch::Tensor sparse_conv2d(torch::Tensor x, torch::Tensor tap_ptr, torch::Tensor tap_chan, torch::Tensor tap_pos,
                            torch::Tensor tap_w, torch::Tensor filter_order, c10::optional<torch::Tensor> bias,
                            c10::optional<torch::Tensor> residual, int64_t out_channels, int64_t kh, int64_t kw,
                            int64_t stride, int64_t pad, bool relu);

// Dense conv as a register-blocked direct convolution (8 filters x 48 pixels per block); wpack is
// (ceil(F/8), C*kh*kw, 8). Outputs under g_direct_im2col_max floats of im2col matrix may use im2col rows.
extern int64_t g_direct_im2col_max;
torch::Tensor direct_conv2d(torch::Tensor x, torch::Tensor wpack, c10::optional<torch::Tensor> bias,
                            c10::optional<torch::Tensor> residual, int64_t out_channels, int64_t kh, int64_t kw,
                            int64_t stride, int64_t pad, bool relu);

torch::Tensor bsr_linear(torch::Tensor x, torch::Tensor indptr, torch::Tensor indices, torch::Tensor values,
                         c10::optional<torch::Tensor> bias, int64_t out_features);

// A matmul y = x W^T (+ bias) that is dense (w) or BSR (ptr / idx / val, sparse = true).
struct MatW {
  torch::Tensor w, ptr, idx, val, bias;
  int64_t out = 0;
  bool sparse = false;
  torch::Tensor apply(const torch::Tensor& x) const;
};

// One unidirectional LSTM (lstm = true; gates i, f, g, o) or GRU (r, z, n) layer over x (N, T, I).
torch::Tensor rnn_layer(const torch::Tensor& x, const MatW& ih, const MatW& hh, int64_t hidden, bool lstm);
