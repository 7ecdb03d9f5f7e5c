// netcarve native kernels: declarations shared by the kernel and executor sources.
#pragma once
#include <torch/extension.h>

torch::Tensor sparse_conv2d(torch::Tensor x, torch::Tensor tap_ptr, torch::Tensor tap_chan, torch::Tensor tap_pos,
                            torch::Tensor tap_w, torch::Tensor filter_order, c10::optional<torch::Tensor> bias,
                            c10::optional<torch::Tensor> residual, int64_t out_channels, int64_t kh, int64_t kw,
                            int64_t stride, int64_t pad, bool relu);
