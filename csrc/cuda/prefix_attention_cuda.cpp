// Torch side of the CUDA prefix_attention (forward, backward): argument checks, allocation, dtype dispatch to the
// kernels in prefix_attention_kernels.cu, and registration for the CUDA key of torch.ops.intcoop_C.
// cu_q / cu_k stay on the device and are trusted (validating them would synchronise); max_q / max_k are unused.
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

void check_cuda_inputs(const at::Tensor& q, const PrefixDims& d, bool bwd) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got ", q.device(), " (shape ", q.sizes(), ")");
  check_storage_type(q, "q");
  TORCH_CHECK(d.Dh >= 1 && d.Dh <= 256, "q.shape[3] (Dh, head dim) must be in 1..256, got shape ", q.sizes());
  TORCH_CHECK(d.B <= 65535 && d.H <= 65535, "q must have at most 65535 images and heads, got shape ", q.sizes());
  check_fits_int(d.Tq, "q.shape[1]");
  check_fits_int(d.Tk, "k.shape[1]");
  const size_t smem = prefix_attention_smem_bytes(static_cast<int>(d.P), static_cast<int>(d.Dh), bwd);
  TORCH_CHECK(d.P <= 65535 && smem <= static_cast<size_t>(max_dynamic_smem()), "pk has too many prefix rows for ",
              "the CUDA kernel's shared memory: shape ", d.P, " x ", d.Dh, " needs ", smem, " bytes, the device has ",
              max_dynamic_smem());
}

PrefixAttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
                             const at::Tensor& pv, const at::Tensor& cu_q, const at::Tensor& cu_k,
                             const PrefixDims& d, double scale) {
  PrefixAttnParams p{};
  p.q = rows4(q);
  p.k = rows4(k);
  p.v = rows4(v);
  p.pk = rows4(pk);
  p.pv = rows4(pv);
  p.cu_q = cu_q.data_ptr<int32_t>();
  p.cu_k = cu_k.data_ptr<int32_t>();
  p.B = static_cast<int>(d.B);
  p.Tq = static_cast<int>(d.Tq);
  p.Tk = static_cast<int>(d.Tk);
  p.H = static_cast<int>(d.H);
  p.Dh = static_cast<int>(d.Dh);
  p.P = static_cast<int>(d.P);
  p.S = static_cast<int>(d.S);
  p.scale = static_cast<float>(scale);
  return p;
}

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& pk,
                                                             const at::Tensor& pv, const at::Tensor& cu_q,
                                                             const at::Tensor& cu_k, int64_t /*max_q*/,
                                                             int64_t /*max_k*/, double scale) {
  const PrefixDims d = check_prefix_attention_args(q, k, v, pk, pv, cu_q, cu_k);
  check_cuda_inputs(q, d, false);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::zeros({d.B, d.Tq, d.H, d.Dh}, q.options());
  at::Tensor lse = at::zeros({d.B, d.H, d.Tq}, q.options().dtype(at::kFloat));
  if (d.B == 0 || d.H == 0 || d.S == 0 || d.Tq == 0) return {out, lse};
  const at::Tensor q_ = last_dim_dense(q), k_ = last_dim_dense(k), v_ = last_dim_dense(v);
  const at::Tensor pk_ = last_dim_dense(pk), pv_ = last_dim_dense(pv);
  const at::Tensor cq = cu_q.contiguous(), ck = cu_k.contiguous();
  PrefixAttnParams p = make_params(q_, k_, v_, pk_, pv_, cq, ck, d, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(dispatch_storage_type(q, "q", [&](auto tag) {
                 return launch_prefix_attention_fwd<typename decltype(tag)::type>(p, stream);
               }),
               "prefix_attention_fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
    const at::Tensor& pv, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q,
    const at::Tensor& cu_k, int64_t /*max_q*/, int64_t /*max_k*/, double scale) {
  const PrefixDims d = check_prefix_attention_args(q, k, v, pk, pv, cu_q, cu_k);
  check_prefix_attention_bwd_args(dout, q, out, lse);
  check_cuda_inputs(q, d, true);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::zeros({d.B, d.Tq, d.H, d.Dh}, q.options());
  at::Tensor dk = at::zeros({d.B, d.Tk, d.H, d.Dh}, q.options()), dv = at::zeros_like(dk);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dpk = at::zeros({d.B, d.P, d.H, d.Dh}, f32), dpv = at::zeros_like(dpk);  // float32 accumulators
  if (d.B > 0 && d.H > 0 && d.S > 0 && d.Tq > 0) {
    const at::Tensor q_ = last_dim_dense(q), k_ = last_dim_dense(k), v_ = last_dim_dense(v);
    const at::Tensor pk_ = last_dim_dense(pk), pv_ = last_dim_dense(pv);
    const at::Tensor do_ = last_dim_dense(dout), o_ = last_dim_dense(out), lse_ = lse.contiguous();
    const at::Tensor cq = cu_q.contiguous(), ck = cu_k.contiguous();
    at::Tensor delta = at::empty({d.B, d.H, d.Tq}, f32);
    PrefixAttnParams p = make_params(q_, k_, v_, pk_, pv_, cq, ck, d, scale);
    p.dout = rows4(do_);
    p.o = rows4(o_);
    p.lse_in = lse_.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.dq = dq.data_ptr();
    p.dk = dk.data_ptr();
    p.dv = dv.data_ptr();
    p.dpk = dpk.data_ptr<float>();
    p.dpv = dpv.data_ptr<float>();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    check_launch(dispatch_storage_type(q, "q", [&](auto tag) {
                   return launch_prefix_attention_bwd<typename decltype(tag)::type>(p, stream);
                 }),
                 "prefix_attention_bwd");
  }
  return {dq, dk, dv, dpk.to(pk.scalar_type()), dpv.to(pv.scalar_type())};
}

}  // namespace
}  // namespace cuda
}  // namespace intcoop

TORCH_LIBRARY_IMPL(intcoop_C, CUDA, m) {
  m.impl("prefix_attention_fwd", &intcoop::cuda::prefix_attention_fwd_cuda);
  m.impl("prefix_attention_bwd", &intcoop::cuda::prefix_attention_bwd_cuda);
}
