// The CUDA kernels' host interface: parameter blocks and launchers, free of torch headers so that nvcc compiles
// the .cu files quickly. The torch side (checks, allocation, dtype dispatch, registration) is in *_cuda.cpp.
// Each launcher is instantiated for T = float, __half, __nv_bfloat16 and returns the launch's cudaError_t.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace intcoop {
namespace cuda {

// A [B, T, H, Dh] tensor with unit stride along Dh; strides in elements.
struct Rows4 {
  const void* p;
  int64_t sb, st, sh;
};

// prefix_attention: see intcoop/ops/prefix_attention.py for the shapes.
struct PrefixAttnParams {
  Rows4 q, k, v, pk, pv;
  const int32_t* cu_q;  // [S+1], on the device
  const int32_t* cu_k;  // [S+1]
  int B, Tq, Tk, H, Dh, P, S;
  float scale;
  // forward outputs
  void* out;   // [B, Tq, H, Dh] contiguous, T
  float* lse;  // [B, H, Tq] contiguous
  // backward inputs and outputs
  Rows4 dout, o;         // dout and the forward's out
  const float* lse_in;   // [B, H, Tq]
  float* delta;          // [B, H, Tq] scratch: rowwise dout . out
  void* dq;              // [B, Tq, H, Dh] contiguous, T
  void* dk;              // [B, Tk, H, Dh] contiguous, T
  void* dv;              // [B, Tk, H, Dh] contiguous, T
  float* dpk;            // [B, P, H, Dh] float32 accumulators, zero on entry
  float* dpv;            // [B, P, H, Dh] float32 accumulators, zero on entry
};

template <typename T>
cudaError_t launch_prefix_attention_fwd(const PrefixAttnParams& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_prefix_attention_bwd(const PrefixAttnParams& p, cudaStream_t stream);

// patch_pool: qt [R, W], z [B, L, W], pooled [B, R, W], lse [B, R]; all contiguous.
struct PatchPoolParams {
  const void* qt;
  const void* z;
  int R, B, L, W;
  float scale;
  // forward outputs
  void* pooled;  // T
  float* lse;
  // backward
  const void* dpooled;   // [B, R, W], T
  const void* pooled_in; // [B, R, W], T
  const float* lse_in;   // [B, R]
  float* dqt;            // [R, W] float32 accumulator, zero on entry
  float* prob;           // [B, R, L] scratch (only when dz is wanted)
  float* dscore;         // [B, R, L] scratch (only when dz is wanted)
  void* dz;              // [B, L, W], T, or nullptr when not wanted
};

template <typename T>
cudaError_t launch_patch_pool_fwd(const PatchPoolParams& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_patch_pool_bwd(const PatchPoolParams& p, cudaStream_t stream);

// Dynamic shared memory (bytes) of the kernels, so that the launchers and the torch-side checks agree.
inline size_t prefix_attention_smem_bytes(int P, int Dh, bool bwd) {
  return sizeof(float) * static_cast<size_t>(bwd ? 4 : 2) * P * Dh;  // prefix K, V (and their gradients)
}
inline size_t patch_pool_smem_bytes(int rows, int L, int W, bool bwd) {  // rows = query rows per block
  const size_t per_row = bwd ? 2 * static_cast<size_t>(W) + L + 1 : static_cast<size_t>(W) + L;
  return sizeof(float) * rows * per_row;
}

// The opt-in limit of dynamic shared memory per block on the current device (at least the default 48 KiB).
inline int max_dynamic_smem() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return 48 * 1024;
  return bytes > 48 * 1024 ? bytes : 48 * 1024;
}

}  // namespace cuda
}  // namespace intcoop
