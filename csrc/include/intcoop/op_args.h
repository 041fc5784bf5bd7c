// Shape, dtype and device checks shared by the CPU and CUDA implementations of the ops (one place per op), and
// the dimensions they read. Shapes follow intcoop/ops/prefix_attention.py and intcoop/ops/patch_pool.py.
#pragma once

#include <ATen/core/Tensor.h>

#include "intcoop/checks.h"

namespace intcoop {

// prefix_attention: q [B, Tq, H, Dh]; k, v [B, Tk, H, Dh]; pk, pv [B, P, H, Dh]; cu_q, cu_k [S+1] int32.
struct PrefixDims {
  int64_t B, Tq, Tk, H, Dh, P, S;
};

inline PrefixDims check_prefix_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& cu_q,
                                              const at::Tensor& cu_k) {
  INTCOOP_CHECK_DIM(q, 4);
  INTCOOP_CHECK_DIM(k, 4);
  INTCOOP_CHECK_DIM(v, 4);
  INTCOOP_CHECK_DIM(pk, 4);
  INTCOOP_CHECK_DIM(pv, 4);
  INTCOOP_CHECK_DIM(cu_q, 1);
  INTCOOP_CHECK_DIM(cu_k, 1);
  PrefixDims d{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3), pk.size(1), cu_q.size(0) - 1};
  INTCOOP_CHECK_SIZE(k, 0, d.B, "B, images");
  INTCOOP_CHECK_SIZE(k, 2, d.H, "H, heads");
  INTCOOP_CHECK_SIZE(k, 3, d.Dh, "Dh, head dim");
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got shape ", v.sizes());
  INTCOOP_CHECK_SIZE(pk, 0, d.B, "B, images");
  INTCOOP_CHECK_SIZE(pk, 2, d.H, "H, heads");
  INTCOOP_CHECK_SIZE(pk, 3, d.Dh, "Dh, head dim");
  TORCH_CHECK(pv.sizes() == pk.sizes(), "pv must have the shape of pk ", pk.sizes(), ", got shape ", pv.sizes());
  TORCH_CHECK(d.P >= 1, "pk must hold at least one prefix token (SOS), got shape ", pk.sizes());
  TORCH_CHECK(cu_q.size(0) >= 1, "cu_q must have S+1 >= 1 entries, got shape ", cu_q.sizes());
  INTCOOP_CHECK_SIZE(cu_k, 0, cu_q.size(0), "S+1, segments of cu_q plus one");
  INTCOOP_CHECK_SAME_DTYPE(k, q);
  INTCOOP_CHECK_SAME_DTYPE(v, q);
  INTCOOP_CHECK_SAME_DTYPE(pk, q);
  INTCOOP_CHECK_SAME_DTYPE(pv, q);
  INTCOOP_CHECK_DTYPE(cu_q, at::kInt);
  INTCOOP_CHECK_DTYPE(cu_k, at::kInt);
  INTCOOP_CHECK_SAME_DEVICE(k, q);
  INTCOOP_CHECK_SAME_DEVICE(v, q);
  INTCOOP_CHECK_SAME_DEVICE(pk, q);
  INTCOOP_CHECK_SAME_DEVICE(pv, q);
  INTCOOP_CHECK_SAME_DEVICE(cu_q, q);
  INTCOOP_CHECK_SAME_DEVICE(cu_k, q);
  return d;
}

// The extra tensors of prefix_attention_bwd: dout, out [B, Tq, H, Dh] like q; lse [B, H, Tq] float32 (float64
// for float64 inputs).
inline void check_prefix_attention_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out,
                                            const at::Tensor& lse) {
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout must have the shape of q ", q.sizes(), ", got shape ", dout.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have the shape of q ", q.sizes(), ", got shape ", out.sizes());
  INTCOOP_CHECK_DIM(lse, 3);
  TORCH_CHECK(lse.size(0) == q.size(0) && lse.size(1) == q.size(2) && lse.size(2) == q.size(1),
              "lse must have shape [B, H, Tq] = [", q.size(0), ", ", q.size(2), ", ", q.size(1), "], got shape ",
              lse.sizes());
  INTCOOP_CHECK_SAME_DTYPE(dout, q);
  INTCOOP_CHECK_SAME_DTYPE(out, q);
  INTCOOP_CHECK_DTYPE(lse, q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  INTCOOP_CHECK_SAME_DEVICE(dout, q);
  INTCOOP_CHECK_SAME_DEVICE(out, q);
  INTCOOP_CHECK_SAME_DEVICE(lse, q);
}

// patch_pool: qt [R, W]; z [B, L, W].
struct PoolDims {
  int64_t R, B, L, W;
};

inline PoolDims check_patch_pool_args(const at::Tensor& qt, const at::Tensor& z) {
  INTCOOP_CHECK_DIM(qt, 2);
  INTCOOP_CHECK_DIM(z, 3);
  PoolDims d{qt.size(0), z.size(0), z.size(1), z.size(2)};
  INTCOOP_CHECK_SIZE(qt, 1, d.W, "W, patch width of z");
  INTCOOP_CHECK_SAME_DTYPE(qt, z);
  INTCOOP_CHECK_SAME_DEVICE(qt, z);
  TORCH_CHECK(d.L >= 1, "z must hold at least one patch token, got shape ", z.sizes());
  return d;
}

// The extra tensors of patch_pool_bwd: dpooled, pooled [B, R, W]; lse [B, R] float32.
inline void check_patch_pool_bwd_args(const at::Tensor& dpooled, const at::Tensor& z, const at::Tensor& pooled,
                                      const at::Tensor& lse, const PoolDims& d) {
  INTCOOP_CHECK_DIM(dpooled, 3);
  INTCOOP_CHECK_DIM(pooled, 3);
  INTCOOP_CHECK_DIM(lse, 2);
  TORCH_CHECK(dpooled.size(0) == d.B && dpooled.size(1) == d.R && dpooled.size(2) == d.W,
              "dpooled must have shape [B, R, W] = [", d.B, ", ", d.R, ", ", d.W, "], got shape ", dpooled.sizes());
  TORCH_CHECK(pooled.sizes() == dpooled.sizes(), "pooled must have the shape of dpooled ", dpooled.sizes(),
              ", got shape ", pooled.sizes());
  TORCH_CHECK(lse.size(0) == d.B && lse.size(1) == d.R, "lse must have shape [B, R] = [", d.B, ", ", d.R,
              "], got shape ", lse.sizes());
  INTCOOP_CHECK_SAME_DTYPE(dpooled, z);
  INTCOOP_CHECK_SAME_DTYPE(pooled, z);
  INTCOOP_CHECK_DTYPE(lse, z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  INTCOOP_CHECK_SAME_DEVICE(dpooled, z);
  INTCOOP_CHECK_SAME_DEVICE(pooled, z);
  INTCOOP_CHECK_SAME_DEVICE(lse, z);
}

}  // namespace intcoop
