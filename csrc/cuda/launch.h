// Torch-side helpers of the CUDA launchers (host code, compiled by the C++ compiler): tensor views for the
// kernels' parameter blocks, the dtype dispatch to the kernels' storage types, and the launch-error check.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "intcoop/checks.h"
#include "kernels.h"

namespace intcoop {
namespace cuda {

// A [B, T, H, Dh] tensor whose last dimension has unit stride (see intcoop::last_dim_dense).
inline Rows4 rows4(const at::Tensor& x) { return Rows4{x.data_ptr(), x.stride(0), x.stride(1), x.stride(2)}; }

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<T>{}) with T the kernels' storage type of `x`'s dtype: float, __half or __nv_bfloat16.
template <typename F>
cudaError_t dispatch_storage_type(const at::Tensor& x, const char* name, F&& f) {
  switch (x.scalar_type()) {
    case at::kFloat: return f(Tag<float>{});
    case at::kHalf: return f(Tag<__half>{});
    case at::kBFloat16: return f(Tag<__nv_bfloat16>{});
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16 for the CUDA kernels, got ", x.scalar_type(),
                  " (shape ", x.sizes(), ")");
  }
}

inline void check_storage_type(const at::Tensor& x, const char* name) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, name,
              " must be float32, float16 or bfloat16 for the CUDA kernels, got ", t, " (shape ", x.sizes(), ")");
}

inline void check_fits_int(int64_t n, const char* what) {
  TORCH_CHECK(n <= std::numeric_limits<int>::max(), what, " = ", n, " is too large for the CUDA kernels");
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace intcoop
