// Torch side of the CUDA patch_pool (forward, backward): argument checks, allocation, dtype dispatch to the
// kernels in patch_pool_kernels.cu, and registration for the CUDA key of torch.ops.intcoop_C.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <tuple>

#include "intcoop/op_args.h"
#include "launch.h"

namespace intcoop {
namespace cuda {
namespace {

void check_cuda_inputs(const at::Tensor& z, const PoolDims& d, bool bwd) {
  TORCH_CHECK(z.is_cuda(), "z must be a CUDA tensor, got ", z.device(), " (shape ", z.sizes(), ")");
  check_storage_type(z, "z");
  TORCH_CHECK(d.B <= 65535, "z.shape[0] (B, images) must be at most 65535 for the CUDA kernel, got shape ",
              z.sizes());
  check_fits_int(d.R, "qt.shape[0]");
  check_fits_int(d.L, "z.shape[1]");
  check_fits_int(d.W, "z.shape[2]");
  const size_t smem = patch_pool_smem_bytes(1, static_cast<int>(d.L), static_cast<int>(d.W), bwd);
  TORCH_CHECK(smem <= static_cast<size_t>(max_dynamic_smem()), "z is too large for the CUDA kernel's shared ",
              "memory: L = ", d.L, " tokens of width W = ", d.W, " need ", smem, " bytes per query row, the device ",
              "has ", max_dynamic_smem(), " (shape ", z.sizes(), ")");
}

PatchPoolParams make_params(const at::Tensor& qt, const at::Tensor& z, const PoolDims& d, double scale) {
  PatchPoolParams p{};
  p.qt = qt.data_ptr();
  p.z = z.data_ptr();
  p.R = static_cast<int>(d.R);
  p.B = static_cast<int>(d.B);
  p.L = static_cast<int>(d.L);
  p.W = static_cast<int>(d.W);
  p.scale = static_cast<float>(scale);
  return p;
}

std::tuple<at::Tensor, at::Tensor> patch_pool_fwd_cuda(const at::Tensor& qt, const at::Tensor& z, double scale) {
  const PoolDims d = check_patch_pool_args(qt, z);
  check_cuda_inputs(z, d, false);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor pooled = at::zeros({d.B, d.R, d.W}, z.options());
  at::Tensor lse = at::zeros({d.B, d.R}, z.options().dtype(at::kFloat));
  if (d.B == 0 || d.R == 0 || d.W == 0) return {pooled, lse};
  const at::Tensor qt_ = qt.contiguous(), z_ = z.contiguous();
  PatchPoolParams p = make_params(qt_, z_, d, scale);
  p.pooled = pooled.data_ptr();
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(dispatch_storage_type(z, "z", [&](auto tag) {
                 return launch_patch_pool_fwd<typename decltype(tag)::type>(p, stream);
               }),
               "patch_pool_fwd");
  return {pooled, lse};
}

std::tuple<at::Tensor, at::Tensor> patch_pool_bwd_cuda(const at::Tensor& dpooled, const at::Tensor& qt,
                                                       const at::Tensor& z, const at::Tensor& pooled,
                                                       const at::Tensor& lse, double scale, bool need_dz) {
  const PoolDims d = check_patch_pool_args(qt, z);
  check_patch_pool_bwd_args(dpooled, z, pooled, lse, d);
  check_cuda_inputs(z, d, true);
  const c10::cuda::CUDAGuard guard(z.device());
  const auto f32 = z.options().dtype(at::kFloat);
  at::Tensor dqt = at::zeros({d.R, d.W}, f32);  // float32 accumulator, summed over images
  at::Tensor dz = need_dz ? at::zeros({d.B, d.L, d.W}, z.options()) : at::empty({0}, z.options());
  if (d.B > 0 && d.R > 0 && d.W > 0) {
    const at::Tensor qt_ = qt.contiguous(), z_ = z.contiguous(), dp_ = dpooled.contiguous();
    const at::Tensor pooled_ = pooled.contiguous(), lse_ = lse.contiguous();
    at::Tensor prob, dscore;  // [B, R, L] scratch for the dz kernel
    PatchPoolParams p = make_params(qt_, z_, d, scale);
    p.dpooled = dp_.data_ptr();
    p.pooled_in = pooled_.data_ptr();
    p.lse_in = lse_.data_ptr<float>();
    p.dqt = dqt.data_ptr<float>();
    if (need_dz) {
      prob = at::empty({d.B, d.R, d.L}, f32);
      dscore = at::empty({d.B, d.R, d.L}, f32);
      p.prob = prob.data_ptr<float>();
      p.dscore = dscore.data_ptr<float>();
      p.dz = dz.data_ptr();
    }
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    check_launch(dispatch_storage_type(z, "z", [&](auto tag) {
                   return launch_patch_pool_bwd<typename decltype(tag)::type>(p, stream);
                 }),
                 "patch_pool_bwd");
  }
  return {dqt.to(qt.scalar_type()), dz};
}

}  // namespace
}  // namespace cuda
}  // namespace intcoop

TORCH_LIBRARY_IMPL(intcoop_C, CUDA, m) {
  m.impl("patch_pool_fwd", &intcoop::cuda::patch_pool_fwd_cuda);
  m.impl("patch_pool_bwd", &intcoop::cuda::patch_pool_bwd_cuda);
}
