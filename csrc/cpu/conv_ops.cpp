// CPU kernels of the two gradients of a plain 2-D convolution (groups 1, dilation 1), fast where the input has
// one channel: the MNIST critics' and classifiers' first layer, where ATen's oneDNN backward runs at a few
// GFLOP/s (docs/performance.md, "The critic's first convolution"; at 3 channels ATen's is as fast or faster, and
// the cpu backend only takes these for 1 channel: dgm_kernels/backends/thin_conv.py).
//
// Both are one batched matrix product (at::bmm: MKL or oneDNN GEMMs on all threads) plus a pass that
// moves values between an image and its columns (im2col / col2im), parallel over the batch. Per image b, with
// L = Ho * Wo output positions and the columns cols_b [C*KH*KW, L] (the input patch of every position):
//   weight grad: gW [O, C*KH*KW] = sum_b gY_b [O, L] @ cols_b^T
//   input grad:  cols_b = W^T [C*KH*KW, O] @ gY_b [O, L], then col2im adds the columns into gX_b.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/zeros.h>

#include "../op_checks.h"

namespace dgm_kernels {

namespace {

using checks::ConvGeometry;

// The valid range [first, last) of output columns j whose input column j * s + k - p lies in [0, n).
std::pair<int64_t, int64_t> valid_range(int64_t k, int64_t s, int64_t p, int64_t n, int64_t out) {
  int64_t first = 0;
  while (first < out && first * s + k - p < 0) ++first;
  int64_t last = out;
  while (last > first && (last - 1) * s + k - p >= n) --last;
  return {first, last};
}

}  // namespace

at::Tensor conv2d_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& input, c10::IntArrayRef kernel_size,
                                  c10::IntArrayRef stride, c10::IntArrayRef padding) {
  const ConvGeometry g = checks::check_conv2d_weight_grad_args(checks::cpu_op("conv2d_weight_grad"), grad_out,
                                                                 input, kernel_size, stride, padding);
  const at::Tensor x = input.contiguous();
  // cols [B, C*KH*KW, L]: row (c, kh, kw) of image b holds x[b, c, i*sh + kh - ph, j*sw + kw - pw] over (i, j)
  at::Tensor cols = at::empty({g.B, g.ckk(), g.L()}, x.options());
  if (cols.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dgm_kernels::conv2d_weight_grad", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* cp = cols.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, g.B * g.C, 1, [&](int64_t first, int64_t last) {
        for (int64_t bc = first; bc < last; ++bc) {
          const scalar_t* plane = xp + bc * g.H * g.W;
          for (int64_t kh = 0; kh < g.KH; ++kh) {
            for (int64_t kw = 0; kw < g.KW; ++kw) {
              scalar_t* row = cp + (bc * g.KH * g.KW + kh * g.KW + kw) * g.L();
              const auto [j0, j1] = valid_range(kw, g.sw, g.pw, g.W, g.Wo);
              for (int64_t i = 0; i < g.Ho; ++i) {
                scalar_t* out = row + i * g.Wo;
                const int64_t y = i * g.sh + kh - g.ph;
                if (y < 0 || y >= g.H) {
                  for (int64_t j = 0; j < g.Wo; ++j) out[j] = scalar_t(0);
                  continue;
                }
                const scalar_t* in = plane + y * g.W + kw - g.pw;
                for (int64_t j = 0; j < j0; ++j) out[j] = scalar_t(0);
                for (int64_t j = j0; j < j1; ++j) out[j] = in[j * g.sw];
                for (int64_t j = j1; j < g.Wo; ++j) out[j] = scalar_t(0);
              }
            }
          }
        }
      });
    });
  }
  // sum_b gY_b [O, L] @ cols_b^T [L, CKK]
  const at::Tensor gy = grad_out.contiguous().view({g.B, g.O, g.L()});
  return at::bmm(gy, cols.transpose(1, 2)).sum(0).view({g.O, g.C, g.KH, g.KW});
}

at::Tensor conv2d_input_grad_cpu(const at::Tensor& grad_out, const at::Tensor& weight, c10::IntArrayRef stride,
                                 c10::IntArrayRef padding, c10::IntArrayRef input_size) {
  const ConvGeometry g = checks::check_conv2d_input_grad_args(checks::cpu_op("conv2d_input_grad"), grad_out,
                                                                weight, stride, padding, input_size);
  at::Tensor grad_in = at::zeros({g.B, g.C, g.H, g.W}, grad_out.options());
  if (grad_in.numel() == 0 || g.O == 0) return grad_in;
  // cols_b [CKK, L] = W^T [CKK, O] @ gY_b [O, L]; col2im adds them into gX_b, one (image, channel) per task
  const at::Tensor gy = grad_out.contiguous().view({g.B, g.O, g.L()});
  const at::Tensor wt = weight.reshape({g.O, g.ckk()}).t().contiguous();
  const at::Tensor cols = at::bmm(wt.unsqueeze(0).expand({g.B, g.ckk(), g.O}), gy);
  AT_DISPATCH_FLOATING_TYPES(grad_in.scalar_type(), "dgm_kernels::conv2d_input_grad", [&] {
    const scalar_t* cp = cols.const_data_ptr<scalar_t>();
    scalar_t* gp = grad_in.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.B * g.C, 1, [&](int64_t first, int64_t last) {
      for (int64_t bc = first; bc < last; ++bc) {
        scalar_t* plane = gp + bc * g.H * g.W;
        for (int64_t kh = 0; kh < g.KH; ++kh) {
          for (int64_t kw = 0; kw < g.KW; ++kw) {
            const scalar_t* row = cp + (bc * g.KH * g.KW + kh * g.KW + kw) * g.L();
            const auto [j0, j1] = valid_range(kw, g.sw, g.pw, g.W, g.Wo);
            for (int64_t i = 0; i < g.Ho; ++i) {
              const int64_t y = i * g.sh + kh - g.ph;
              if (y < 0 || y >= g.H) continue;
              scalar_t* out = plane + y * g.W + kw - g.pw;
              const scalar_t* in = row + i * g.Wo;
              for (int64_t j = j0; j < j1; ++j) out[j * g.sw] += in[j];
            }
          }
        }
      }
    });
  });
  return grad_in;
}

}  // namespace dgm_kernels
