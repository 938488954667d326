// The two gradients of a plain convolution on CUDA tensors (schemas: csrc/ops.cpp). On a GPU, cuDNN's backward
// is the fast path (the CPU kernels in csrc/cpu/conv_ops.cpp exist because oneDNN's is slow for 1-channel
// inputs), so here the ops are their spec, aten::convolution_backward, behind the same argument checks: callers
// of torch.ops.dgm_kernels.conv2d_*_grad get the same op on both devices. The cpu backend does not route CUDA
// tensors here (dgm_kernels/backends/thin_conv.py); the cuda backend uses ATen's convolutions directly.
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/zeros.h>

#include "../dgm_kernels.h"
#include "../op_checks.h"

namespace dgm_kernels {

at::Tensor conv2d_weight_grad_cuda(const at::Tensor& grad_out, const at::Tensor& input, c10::IntArrayRef kernel_size,
                                   c10::IntArrayRef stride, c10::IntArrayRef padding) {
  const checks::ConvGeometry g = checks::check_conv2d_weight_grad_args(
      checks::cuda_op("conv2d_weight_grad"), grad_out, input, kernel_size, stride, padding);
  // only the weight's shape is read: a broadcast zero stands in for it
  const at::Tensor weight = at::zeros({}, input.options()).expand({g.O, g.C, g.KH, g.KW});
  return std::get<1>(at::convolution_backward(grad_out, input, weight, std::nullopt, stride, padding, {1, 1}, false,
                                              {0, 0}, 1, {false, true, false}));
}

at::Tensor conv2d_input_grad_cuda(const at::Tensor& grad_out, const at::Tensor& weight, c10::IntArrayRef stride,
                                  c10::IntArrayRef padding, c10::IntArrayRef input_size) {
  const checks::ConvGeometry g = checks::check_conv2d_input_grad_args(
      checks::cuda_op("conv2d_input_grad"), grad_out, weight, stride, padding, input_size);
  // only the input's shape is read: a broadcast zero stands in for it
  const at::Tensor input = at::zeros({}, grad_out.options()).expand({g.B, g.C, g.H, g.W});
  return std::get<0>(at::convolution_backward(grad_out, input, weight, std::nullopt, stride, padding, {1, 1}, false,
                                              {0, 0}, 1, {true, false, false}));
}

}  // namespace dgm_kernels
