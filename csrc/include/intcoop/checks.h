// Argument checks for the compiled ops: each raises a Python RuntimeError (TORCH_CHECK) that names the argument
// and shows its shape, so a wrong call is explained at the boundary rather than inside a kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define INTCOOP_CHECK_DIM(x, n)                                                                         \
  TORCH_CHECK((x).dim() == (n), #x " must have " #n " dimensions, got shape ", (x).sizes())

#define INTCOOP_CHECK_SIZE(x, i, n, what)                                                               \
  TORCH_CHECK((x).size(i) == (n), #x ".shape[" #i "] (" what ") must be ", (n), ", got shape ", (x).sizes())

#define INTCOOP_CHECK_DTYPE(x, dt)                                                                      \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type(),     \
              " (shape ", (x).sizes(), ")")

#define INTCOOP_CHECK_SAME_DTYPE(x, y)                                                                  \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " must have the dtype of " #y " (",            \
              (y).scalar_type(), "), got ", (x).scalar_type(), " (shape ", (x).sizes(), ")")

#define INTCOOP_CHECK_DEVICE(x, dev)                                                                    \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device(), " (shape ",       \
              (x).sizes(), ")")

#define INTCOOP_CHECK_SAME_DEVICE(x, y)                                                                 \
  TORCH_CHECK((x).device() == (y).device(), #x " must be on the device of " #y " (", (y).device(),      \
              "), got ", (x).device(), " (shape ", (x).sizes(), ")")

#define INTCOOP_CHECK_CONTIGUOUS(x)                                                                     \
  TORCH_CHECK((x).is_contiguous(), #x " must be contiguous, got shape ", (x).sizes(), " and strides ",   \
              (x).strides())

namespace intcoop {

// x itself when its last dimension is dense (stride 1), else a contiguous copy: the kernels take any strides
// for the leading dimensions (q/k/v are views of a fused QKV) but need unit stride along the head dimension.
inline at::Tensor last_dim_dense(const at::Tensor& x) {
  return (x.dim() == 0 || x.stride(-1) == 1 || x.size(-1) <= 1) ? x : x.contiguous();
}

}  // namespace intcoop
