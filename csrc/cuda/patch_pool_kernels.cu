// CUDA kernels of patch_pool (forward, backward) for float32, float16 and bfloat16, accumulating in float32.
// Semantics: intcoop/ops/patch_pool.py. A block takes one image and a group of RG query rows (RG in 1, 2, 4, 8,
// chosen so the shared memory fits): it holds the group's rows of qt (and dpooled) and their L scores in shared
// memory, computes the scores with one warp per patch token (lanes split W), an exact softmax per row from
// the stored scores, then the W-wide outputs with threads striding over W (z read coalesced).
// Backward: the same block also sums dqt over its image with float32 atomics; dz [B, L, W] sums over all R rows,
// so a second kernel computes it per (image, tile of kLT tokens) from the probabilities saved by the first.
#include "common.cuh"

namespace intcoop {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kLT = 16;  // patch tokens per block in the dz kernel
constexpr int kRC = 32;  // query rows staged at a time in the dz kernel

// Copies rows r0 .. r0 + nr of a [*, W] matrix (T) into float smem [RG, W], zero past nr.
template <typename T, int RG>
__device__ __forceinline__ void stage_rows(float* dst, const T* src, int nr, int W) {
  for (int i = threadIdx.x; i < RG * W; i += blockDim.x) {
    const int rr = i / W;
    dst[i] = rr < nr ? to_f(src[i]) : 0.f;
  }
}

// grid (ceil(R / RG), B), block kThreads, shared RG * (W + L) floats. Writes pooled and lse.
// acc[rr] = sum_l weights[rr * L + l] * z[l * W + w]: column w of z weighted by each staged row of a group.
template <int RG, typename T>
__device__ __forceinline__ void weighted_column(const float* weights, const T* z, int L, int W, int w,
                                                float (&acc)[RG]) {
#pragma unroll
  for (int rr = 0; rr < RG; ++rr) acc[rr] = 0.f;
  for (int l = 0; l < L; ++l) {
    const float zv = to_f(z[static_cast<int64_t>(l) * W + w]);
#pragma unroll
    for (int rr = 0; rr < RG; ++rr) acc[rr] += weights[rr * L + l] * zv;
  }
}

template <typename T, int RG>
__global__ void __launch_bounds__(kThreads) pool_fwd_kernel(const PatchPoolParams p) {
  extern __shared__ float smem[];
  float *sq = smem, *ss = smem + RG * p.W;  // [RG, W] queries, [RG, L] scores then probabilities
  const int b = blockIdx.y, r0 = blockIdx.x * RG, nr = min(RG, p.R - r0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* z = static_cast<const T*>(p.z) + static_cast<int64_t>(b) * p.L * p.W;
  stage_rows<T, RG>(sq, static_cast<const T*>(p.qt) + static_cast<int64_t>(r0) * p.W, nr, p.W);
  __syncthreads();
  for (int l = warp; l < p.L; l += kWarps) {
    float acc[RG];
#pragma unroll
    for (int rr = 0; rr < RG; ++rr) acc[rr] = 0.f;
    for (int w = lane; w < p.W; w += 32) {
      const float zv = to_f(z[static_cast<int64_t>(l) * p.W + w]);
#pragma unroll
      for (int rr = 0; rr < RG; ++rr) acc[rr] += sq[rr * p.W + w] * zv;
    }
#pragma unroll
    for (int rr = 0; rr < RG; ++rr) {
      const float sc = warp_sum(acc[rr]) * p.scale;
      if (lane == 0) ss[rr * p.L + l] = sc;
    }
  }
  __syncthreads();
  for (int rr = warp; rr < nr; rr += kWarps) {  // exact softmax of each row, in place
    float* row = ss + rr * p.L;
    float m = -INFINITY, sum = 0.f;
    for (int l = lane; l < p.L; l += 32) m = fmaxf(m, row[l]);
    m = warp_max(m);
    for (int l = lane; l < p.L; l += 32) sum += expf(row[l] - m);
    const float lse = m + logf(warp_sum(sum));
    for (int l = lane; l < p.L; l += 32) row[l] = expf(row[l] - lse);
    if (lane == 0) p.lse[static_cast<int64_t>(b) * p.R + r0 + rr] = lse;
  }
  __syncthreads();
  T* out = static_cast<T*>(p.pooled) + (static_cast<int64_t>(b) * p.R + r0) * p.W;
  for (int w = threadIdx.x; w < p.W; w += blockDim.x) {
    float acc[RG];
    weighted_column<RG>(ss, z, p.L, p.W, w, acc);
#pragma unroll
    for (int rr = 0; rr < RG; ++rr)
      if (rr < nr) out[static_cast<int64_t>(rr) * p.W + w] = from_f<T>(acc[rr]);
  }
}

// grid (ceil(R / RG), B), block kThreads, shared RG * (2 W + L + 1) floats. Per row r of the group:
// delta = dpooled . pooled, probabilities pr and score gradients ds = pr (dpooled . z_l - delta) scale for every
// token l (saved to prob / dscore when dz is wanted), and dqt[r] += sum_l ds_l z_l (float32 atomics).
template <typename T, int RG>
__global__ void __launch_bounds__(kThreads) pool_bwd_kernel(const PatchPoolParams p) {
  extern __shared__ float smem[];
  float *sq = smem, *sdp = sq + RG * p.W, *sds = sdp + RG * p.W, *sdelta = sds + RG * p.L;
  const int b = blockIdx.y, r0 = blockIdx.x * RG, nr = min(RG, p.R - r0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t brow = static_cast<int64_t>(b) * p.R + r0;  // first (image, row) of the group
  const T* z = static_cast<const T*>(p.z) + static_cast<int64_t>(b) * p.L * p.W;
  stage_rows<T, RG>(sq, static_cast<const T*>(p.qt) + static_cast<int64_t>(r0) * p.W, nr, p.W);
  stage_rows<T, RG>(sdp, static_cast<const T*>(p.dpooled) + brow * p.W, nr, p.W);
  __syncthreads();
  for (int rr = warp; rr < RG; rr += kWarps) {
    float acc = 0.f;
    if (rr < nr) {
      const T* pooled = static_cast<const T*>(p.pooled_in) + (brow + rr) * p.W;
      for (int w = lane; w < p.W; w += 32) acc += sdp[rr * p.W + w] * to_f(pooled[w]);
    }
    acc = warp_sum(acc);
    if (lane == 0) sdelta[rr] = acc;
  }
  __syncthreads();
  for (int l = warp; l < p.L; l += kWarps) {
    float as[RG], ad[RG];
#pragma unroll
    for (int rr = 0; rr < RG; ++rr) as[rr] = ad[rr] = 0.f;
    for (int w = lane; w < p.W; w += 32) {
      const float zv = to_f(z[static_cast<int64_t>(l) * p.W + w]);
#pragma unroll
      for (int rr = 0; rr < RG; ++rr) {
        as[rr] += sq[rr * p.W + w] * zv;
        ad[rr] += sdp[rr * p.W + w] * zv;
      }
    }
#pragma unroll
    for (int rr = 0; rr < RG; ++rr) {
      const float sc = warp_sum(as[rr]) * p.scale, dprob = warp_sum(ad[rr]);
      if (lane == 0) {
        const float pr = rr < nr ? expf(sc - p.lse_in[brow + rr]) : 0.f;
        const float ds = pr * (dprob - sdelta[rr]) * p.scale;
        sds[rr * p.L + l] = ds;
        if (p.prob != nullptr && rr < nr) {
          p.prob[(brow + rr) * p.L + l] = pr;
          p.dscore[(brow + rr) * p.L + l] = ds;
        }
      }
    }
  }
  __syncthreads();
  for (int w = threadIdx.x; w < p.W; w += blockDim.x) {
    float acc[RG];
    weighted_column<RG>(sds, z, p.L, p.W, w, acc);
#pragma unroll
    for (int rr = 0; rr < RG; ++rr)
      if (rr < nr) atomicAdd(p.dqt + static_cast<int64_t>(r0 + rr) * p.W + w, acc[rr]);
  }
}

// grid (ceil(L / kLT), B), block kThreads, shared 2 * kRC * kLT floats.
// dz[b, l, w] = sum_r prob[b, r, l] dpooled[b, r, w] + dscore[b, r, l] qt[r, w].
template <typename T>
__global__ void __launch_bounds__(kThreads) pool_dz_kernel(const PatchPoolParams p) {
  __shared__ float sp[kRC * kLT], sds[kRC * kLT];
  const int b = blockIdx.y, l0 = blockIdx.x * kLT, nl = min(kLT, p.L - l0);
  const T* dpooled = static_cast<const T*>(p.dpooled) + static_cast<int64_t>(b) * p.R * p.W;
  const T* qt = static_cast<const T*>(p.qt);
  T* dz = static_cast<T*>(p.dz) + (static_cast<int64_t>(b) * p.L + l0) * p.W;
  for (int w0 = 0; w0 < p.W; w0 += blockDim.x) {
    const int w = w0 + threadIdx.x;
    float acc[kLT];
#pragma unroll
    for (int li = 0; li < kLT; ++li) acc[li] = 0.f;
    for (int rc = 0; rc < p.R; rc += kRC) {
      const int nrc = min(kRC, p.R - rc);
      __syncthreads();  // the previous chunk is consumed
      for (int i = threadIdx.x; i < kRC * kLT; i += blockDim.x) {
        const int rr = i / kLT, li = i - rr * kLT;
        const bool ok = rr < nrc && li < nl;
        const int64_t g = (static_cast<int64_t>(b) * p.R + rc + rr) * p.L + l0 + li;
        sp[i] = ok ? p.prob[g] : 0.f;
        sds[i] = ok ? p.dscore[g] : 0.f;
      }
      __syncthreads();
      if (w < p.W) {
        for (int rr = 0; rr < nrc; ++rr) {
          const float dv = to_f(dpooled[static_cast<int64_t>(rc + rr) * p.W + w]);
          const float qv = to_f(qt[static_cast<int64_t>(rc + rr) * p.W + w]);
#pragma unroll
          for (int li = 0; li < kLT; ++li) acc[li] += sp[rr * kLT + li] * dv + sds[rr * kLT + li] * qv;
        }
      }
    }
    if (w < p.W) {
#pragma unroll
      for (int li = 0; li < kLT; ++li)
        if (li < nl) dz[static_cast<int64_t>(li) * p.W + w] = from_f<T>(acc[li]);
    }
  }
}

// Query rows per block: the largest RG in 8, 4, 2, 1 (not above R rounded up) whose shared memory fits in the
// default 48 KiB, else 1 with the opt-in limit; 0 when even that does not fit.
int rows_per_block(const PatchPoolParams& p, bool bwd) {
  int rg = 8;
  while (rg > 1 && rg / 2 >= p.R) rg /= 2;
  while (rg > 1 && patch_pool_smem_bytes(rg, p.L, p.W, bwd) > static_cast<size_t>(kDefaultSmem)) rg /= 2;
  return patch_pool_smem_bytes(rg, p.L, p.W, bwd) <= static_cast<size_t>(max_dynamic_smem()) ? rg : 0;
}

template <typename Kernel>
cudaError_t launch_rows(Kernel kernel, const PatchPoolParams& p, int rg, bool bwd, cudaStream_t stream) {
  const size_t smem = patch_pool_smem_bytes(rg, p.L, p.W, bwd);
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3((p.R + rg - 1) / rg, p.B), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_patch_pool_fwd(const PatchPoolParams& p, cudaStream_t stream) {
  switch (rows_per_block(p, false)) {
    case 8: return launch_rows(pool_fwd_kernel<T, 8>, p, 8, false, stream);
    case 4: return launch_rows(pool_fwd_kernel<T, 4>, p, 4, false, stream);
    case 2: return launch_rows(pool_fwd_kernel<T, 2>, p, 2, false, stream);
    case 1: return launch_rows(pool_fwd_kernel<T, 1>, p, 1, false, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_patch_pool_bwd(const PatchPoolParams& p, cudaStream_t stream) {
  cudaError_t err;
  switch (rows_per_block(p, true)) {
    case 8: err = launch_rows(pool_bwd_kernel<T, 8>, p, 8, true, stream); break;
    case 4: err = launch_rows(pool_bwd_kernel<T, 4>, p, 4, true, stream); break;
    case 2: err = launch_rows(pool_bwd_kernel<T, 2>, p, 2, true, stream); break;
    case 1: err = launch_rows(pool_bwd_kernel<T, 1>, p, 1, true, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess || p.dz == nullptr) return err;
  pool_dz_kernel<T><<<dim3((p.L + kLT - 1) / kLT, p.B), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#define INTCOOP_INSTANTIATE(T)                                                              \
  template cudaError_t launch_patch_pool_fwd<T>(const PatchPoolParams&, cudaStream_t);      \
  template cudaError_t launch_patch_pool_bwd<T>(const PatchPoolParams&, cudaStream_t);
INTCOOP_INSTANTIATE(float)
INTCOOP_INSTANTIATE(__half)
INTCOOP_INSTANTIATE(__nv_bfloat16)
#undef INTCOOP_INSTANTIATE

}  // namespace cuda
}  // namespace intcoop
