// CPU emulation of the CUDA features that the kernels in csrc/cuda use, for checking their logic without a GPU
// (see ../emulate.py): blocks run one at a time, one std::thread per CUDA thread; std::barrier implements
// __syncthreads and the warp shuffles; __shared__ locals become function statics (shared by the block's threads);
// __half and __nv_bfloat16 are c10::Half and c10::BFloat16. Needs C++20 (std::barrier, std::atomic_ref).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <math.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
using std::max;
using std::min;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef enum cudaError cudaError_t;
typedef void* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid argument"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {  // an H100/H200's opt-in limit
  *v = 227 * 1024;
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int) { return cudaSuccess; }

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }

namespace emu {
struct Block {
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  std::vector<float> shfl, smem;
  Block(int n, size_t smem_bytes) : bar(n), shfl(n), smem(smem_bytes / sizeof(float) + 1, NAN) {
    for (int w = 0; w < n / 32; ++w) warp.emplace_back(new std::barrier<>(32));
  }
};
inline thread_local dim3 tl_thread, tl_block_idx;
inline dim3 g_block_dim;
inline thread_local Block* tl_blk = nullptr;
inline float* dynamic_smem() { return tl_blk->smem.data(); }

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel k, dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  if (block.x % 32 != 0 || block.y != 1 || block.z != 1) return cudaErrorInvalidValue;
  g_block_dim = block;
  const int n = block.x;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block blk(n, smem);
        std::vector<std::thread> ts;
        for (int t = 0; t < n; ++t)
          ts.emplace_back([&, t] {
            tl_blk = &blk;
            tl_block_idx = dim3(x, y, z);
            tl_thread = dim3(t);
            k(args...);
          });
        for (auto& t : ts) t.join();
      }
  return cudaSuccess;
}
}  // namespace emu

#define threadIdx (emu::tl_thread)
#define blockIdx (emu::tl_block_idx)
#define blockDim (emu::g_block_dim)
inline void __syncthreads() { emu::tl_blk->bar.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float x, int o) {
  auto* b = emu::tl_blk;
  const int t = threadIdx.x, w = t / 32, lane = t % 32;
  b->shfl[t] = x;
  b->warp[w]->arrive_and_wait();
  const float y = b->shfl[w * 32 + (lane ^ o)];
  b->warp[w]->arrive_and_wait();
  return y;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
