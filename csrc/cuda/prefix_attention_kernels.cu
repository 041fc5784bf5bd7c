// CUDA kernels of prefix_attention (forward, backward) for float32, float16 and bfloat16, accumulating in float32.
// Semantics: intcoop/ops/prefix_attention.py. A block takes one (image, head) and a group of kSegs consecutive
// segments, stages the image's prefix K/V for that head in shared memory, and gives each warp one query row at
// a time (forward, backward pass 1) or one suffix key row (backward pass 2); lanes split the head dimension
// (lane holds d = lane + 32 t), dot products are warp reductions, the forward uses an online softmax.
// Prefix gradients are summed per block in shared memory, then added with float32 atomics to [B, P, H, Dh].
#include "common.cuh"

namespace intcoop {
namespace cuda {
namespace {

constexpr int kWarps = 4;  // warps per block
constexpr int kSegs = 8;   // segments per block

template <typename T>
__device__ __forceinline__ const T* row_ptr(const Rows4& x, int b, int t, int h) {
  return static_cast<const T*>(x.p) + b * x.sb + t * x.st + h * x.sh;
}

// Largest s in [lo, hi] with cu[s] <= x (cu non-decreasing and cu[lo] <= x): the segment that holds row x.
__device__ __forceinline__ int find_segment(const int32_t* cu, int lo, int hi, int x) {
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (cu[mid] <= x) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// A head-dim row spread over the warp: lane holds d = lane + 32 t, zero past Dh.
template <int NT, typename T>
__device__ __forceinline__ void load_row(float (&x)[NT], const T* row, int Dh, int lane, float mul = 1.f) {
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int d = lane + 32 * t;
    x[t] = d < Dh ? to_f(row[d]) * mul : 0.f;
  }
}

template <int NT>
__device__ __forceinline__ void load_srow(float (&x)[NT], const float* row, int Dh, int lane) {
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int d = lane + 32 * t;
    x[t] = d < Dh ? row[d] : 0.f;
  }
}

template <int NT, typename T>
__device__ __forceinline__ void store_row(T* row, const float (&x)[NT], int Dh, int lane, float mul = 1.f) {
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int d = lane + 32 * t;
    if (d < Dh) row[d] = from_f<T>(x[t] * mul);
  }
}

template <int NT>
__device__ __forceinline__ float dot_row(const float (&a)[NT], const float (&b)[NT]) {
  float s = 0.f;
#pragma unroll
  for (int t = 0; t < NT; ++t) s += a[t] * b[t];
  return warp_sum(s);
}

// Key/value j of the row's visible list: the P prefix rows (shared memory) first, then suffix rows k0 + j - P.
template <int NT, typename T>
__device__ __forceinline__ void load_kv(float (&kr)[NT], float (&vr)[NT], const PrefixAttnParams& p,
                                        const float* sk, const float* sv, int b, int h, int k0, int j, int lane) {
  if (j < p.P) {
    load_srow<NT>(kr, sk + j * p.Dh, p.Dh, lane);
    load_srow<NT>(vr, sv + j * p.Dh, p.Dh, lane);
  } else {
    load_row<NT>(kr, row_ptr<T>(p.k, b, k0 + j - p.P, h), p.Dh, lane);
    load_row<NT>(vr, row_ptr<T>(p.v, b, k0 + j - p.P, h), p.Dh, lane);
  }
}

// Stages pk, pv [b, :, h, :] in shared memory as float [P, Dh].
template <typename T>
__device__ __forceinline__ void stage_prefix(const PrefixAttnParams& p, float* sk, float* sv, int b, int h) {
  for (int i = threadIdx.x; i < p.P * p.Dh; i += blockDim.x) {
    const int j = i / p.Dh, d = i - j * p.Dh;
    sk[i] = to_f(row_ptr<T>(p.pk, b, j, h)[d]);
    sv[i] = to_f(row_ptr<T>(p.pv, b, j, h)[d]);
  }
}

// grid (ceil(S / kSegs), H, B), block kWarps * 32, shared 2 * P * Dh floats. Writes out and lse.
template <typename T, int NT>
__global__ void __launch_bounds__(kWarps * 32) prefix_fwd_kernel(const PrefixAttnParams p) {
  extern __shared__ float smem[];
  float *sk = smem, *sv = smem + p.P * p.Dh;
  const int b = blockIdx.z, h = blockIdx.y, s0 = blockIdx.x * kSegs, s1 = min(p.S, s0 + kSegs);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  stage_prefix<T>(p, sk, sv, b, h);
  __syncthreads();
  const int r_end = p.cu_q[s1];
  for (int r = p.cu_q[s0] + warp; r < r_end; r += kWarps) {
    const int s = find_segment(p.cu_q, s0, s1 - 1, r);
    const int q0 = p.cu_q[s], lq = p.cu_q[s + 1] - q0, k0 = p.cu_k[s], lk = p.cu_k[s + 1] - k0;
    const int n = p.P + (r - q0) + lk - lq + 1;  // visible keys: prefix + causal part of the segment
    float qr[NT], kr[NT], vr[NT], o[NT];
    load_row<NT>(qr, row_ptr<T>(p.q, b, r, h), p.Dh, lane, p.scale);
#pragma unroll
    for (int t = 0; t < NT; ++t) o[t] = 0.f;
    float m = -INFINITY, l = 0.f;
    for (int j = 0; j < n; ++j) {
      load_kv<NT, T>(kr, vr, p, sk, sv, b, h, k0, j, lane);
      const float sc = dot_row<NT>(qr, kr);
      const float m_new = fmaxf(m, sc), c = expf(m - m_new), e = expf(sc - m_new);
      l = l * c + e;
#pragma unroll
      for (int t = 0; t < NT; ++t) o[t] = o[t] * c + e * vr[t];
      m = m_new;
    }
    store_row<NT>(static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * p.Tq + r) * p.H + h) * p.Dh, o, p.Dh, lane,
                  1.f / l);
    if (lane == 0) p.lse[(static_cast<int64_t>(b) * p.H + h) * p.Tq + r] = m + logf(l);
  }
}

// grid (ceil(S / kSegs), H, B), block kWarps * 32, shared 4 * P * Dh floats. Pass 1 (warp per query row):
// delta = dout . out, dq, and the block's prefix gradients; pass 2 (warp per suffix key row): dk, dv.
template <typename T, int NT>
__global__ void __launch_bounds__(kWarps * 32) prefix_bwd_kernel(const PrefixAttnParams p) {
  extern __shared__ float smem[];
  const int PD = p.P * p.Dh;
  float *sk = smem, *sv = smem + PD, *sdk = smem + 2 * PD, *sdv = smem + 3 * PD;
  const int b = blockIdx.z, h = blockIdx.y, s0 = blockIdx.x * kSegs, s1 = min(p.S, s0 + kSegs);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t bh = static_cast<int64_t>(b) * p.H + h;
  stage_prefix<T>(p, sk, sv, b, h);
  for (int i = threadIdx.x; i < 2 * PD; i += blockDim.x) sdk[i] = 0.f;  // sdk and sdv are adjacent
  __syncthreads();

  float qr[NT], dor[NT], kr[NT], vr[NT], acc[NT], acc2[NT];
  const int r_end = p.cu_q[s1];
  for (int r = p.cu_q[s0] + warp; r < r_end; r += kWarps) {
    const int s = find_segment(p.cu_q, s0, s1 - 1, r);
    const int q0 = p.cu_q[s], lq = p.cu_q[s + 1] - q0, k0 = p.cu_k[s], lk = p.cu_k[s + 1] - k0;
    const int n = p.P + (r - q0) + lk - lq + 1;
    load_row<NT>(qr, row_ptr<T>(p.q, b, r, h), p.Dh, lane);
    load_row<NT>(dor, row_ptr<T>(p.dout, b, r, h), p.Dh, lane);
    load_row<NT>(acc, row_ptr<T>(p.o, b, r, h), p.Dh, lane);
    const float delta = dot_row<NT>(dor, acc), lse = p.lse_in[bh * p.Tq + r];
    if (lane == 0) p.delta[bh * p.Tq + r] = delta;
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] = 0.f;  // dq
    for (int j = 0; j < n; ++j) {
      load_kv<NT, T>(kr, vr, p, sk, sv, b, h, k0, j, lane);
      const float pr = expf(dot_row<NT>(qr, kr) * p.scale - lse);
      const float ds = pr * (dot_row<NT>(dor, vr) - delta) * p.scale;
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[t] += ds * kr[t];
      if (j < p.P) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const int d = lane + 32 * t;
          if (d < p.Dh) {
            atomicAdd(sdk + j * p.Dh + d, ds * qr[t]);
            atomicAdd(sdv + j * p.Dh + d, pr * dor[t]);
          }
        }
      }
    }
    store_row<NT>(static_cast<T*>(p.dq) + ((static_cast<int64_t>(b) * p.Tq + r) * p.H + h) * p.Dh, acc, p.Dh,
                  lane);
  }
  __syncthreads();  // delta of every row of the block is written

  const int k_end = p.cu_k[s1];
  for (int kr_i = p.cu_k[s0] + warp; kr_i < k_end; kr_i += kWarps) {
    const int s = find_segment(p.cu_k, s0, s1 - 1, kr_i);
    const int q0 = p.cu_q[s], lq = p.cu_q[s + 1] - q0, k0 = p.cu_k[s], lk = p.cu_k[s + 1] - k0;
    const int jj = kr_i - k0;
    load_row<NT>(kr, row_ptr<T>(p.k, b, kr_i, h), p.Dh, lane);
    load_row<NT>(vr, row_ptr<T>(p.v, b, kr_i, h), p.Dh, lane);
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] = acc2[t] = 0.f;  // dk, dv
    for (int i = max(0, jj - (lk - lq)); i < lq; ++i) {  // queries that see key jj
      const int r = q0 + i;
      load_row<NT>(qr, row_ptr<T>(p.q, b, r, h), p.Dh, lane);
      load_row<NT>(dor, row_ptr<T>(p.dout, b, r, h), p.Dh, lane);
      const float pr = expf(dot_row<NT>(qr, kr) * p.scale - p.lse_in[bh * p.Tq + r]);
      const float ds = pr * (dot_row<NT>(dor, vr) - p.delta[bh * p.Tq + r]) * p.scale;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        acc[t] += ds * qr[t];
        acc2[t] += pr * dor[t];
      }
    }
    const int64_t row = ((static_cast<int64_t>(b) * p.Tk + kr_i) * p.H + h) * p.Dh;
    store_row<NT>(static_cast<T*>(p.dk) + row, acc, p.Dh, lane);
    store_row<NT>(static_cast<T*>(p.dv) + row, acc2, p.Dh, lane);
  }
  __syncthreads();  // the block's prefix gradients are complete

  for (int i = threadIdx.x; i < PD; i += blockDim.x) {
    const int j = i / p.Dh, d = i - j * p.Dh;
    const int64_t g = ((static_cast<int64_t>(b) * p.P + j) * p.H + h) * p.Dh + d;
    atomicAdd(p.dpk + g, sdk[i]);
    atomicAdd(p.dpv + g, sdv[i]);
  }
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, const PrefixAttnParams& p, bool bwd, cudaStream_t stream) {
  const size_t smem = prefix_attention_smem_bytes(p.P, p.Dh, bwd);
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.S + kSegs - 1) / kSegs, p.H, p.B);
  kernel<<<grid, kWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

// Head dims up to 256: NT = ceil(Dh / 32) rounded up to 1, 2, 4 or 8 registers per lane.
template <typename T>
cudaError_t launch_prefix_attention_fwd(const PrefixAttnParams& p, cudaStream_t stream) {
  if (p.Dh <= 32) return launch(prefix_fwd_kernel<T, 1>, p, false, stream);
  if (p.Dh <= 64) return launch(prefix_fwd_kernel<T, 2>, p, false, stream);
  if (p.Dh <= 128) return launch(prefix_fwd_kernel<T, 4>, p, false, stream);
  if (p.Dh <= 256) return launch(prefix_fwd_kernel<T, 8>, p, false, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_prefix_attention_bwd(const PrefixAttnParams& p, cudaStream_t stream) {
  if (p.Dh <= 32) return launch(prefix_bwd_kernel<T, 1>, p, true, stream);
  if (p.Dh <= 64) return launch(prefix_bwd_kernel<T, 2>, p, true, stream);
  if (p.Dh <= 128) return launch(prefix_bwd_kernel<T, 4>, p, true, stream);
  if (p.Dh <= 256) return launch(prefix_bwd_kernel<T, 8>, p, true, stream);
  return cudaErrorInvalidValue;
}

#define INTCOOP_INSTANTIATE(T)                                                                   \
  template cudaError_t launch_prefix_attention_fwd<T>(const PrefixAttnParams&, cudaStream_t);    \
  template cudaError_t launch_prefix_attention_bwd<T>(const PrefixAttnParams&, cudaStream_t);
INTCOOP_INSTANTIATE(float)
INTCOOP_INSTANTIATE(__half)
INTCOOP_INSTANTIATE(__nv_bfloat16)
#undef INTCOOP_INSTANTIATE

}  // namespace cuda
}  // namespace intcoop
