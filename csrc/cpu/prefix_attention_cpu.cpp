// C++/OpenMP CPU kernels of prefix_attention (forward and backward) for float32 and float64, registered for
// the CPU key of torch.ops.intcoop_C. Semantics: intcoop/ops/prefix_attention.py. Accumulation is in the input
// dtype (float for float32, double for float64). Forward tasks are (image, head, segment); backward tasks are
// (image, head, chunk of segments), each summing its prefix gradients privately, reduced in a fixed order after.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "intcoop/op_args.h"

namespace intcoop {
namespace {

// A [B, T, H, Dh] tensor with unit stride along Dh and any strides for the other dimensions.
template <typename T>
struct Rows {
  const T* p;
  int64_t sb, st, sh;
  explicit Rows(const at::Tensor& x) : p(x.data_ptr<T>()), sb(x.stride(0)), st(x.stride(1)), sh(x.stride(2)) {}
  const T* operator()(int64_t b, int64_t t, int64_t h) const { return p + b * sb + t * st + h * sh; }
};

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename T>
inline void axpy(T a, const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Segment offsets read once on the host, validated against the packed tensors and the max_q / max_k arguments.
struct Segments {
  std::vector<int32_t> q, k;
  int64_t max_lk = 0;
};

Segments read_segments(const at::Tensor& cu_q, const at::Tensor& cu_k, const PrefixDims& d, int64_t max_q,
                       int64_t max_k) {
  Segments seg;
  const at::Tensor cq = cu_q.contiguous(), ck = cu_k.contiguous();
  seg.q.assign(cq.data_ptr<int32_t>(), cq.data_ptr<int32_t>() + d.S + 1);
  seg.k.assign(ck.data_ptr<int32_t>(), ck.data_ptr<int32_t>() + d.S + 1);
  TORCH_CHECK(seg.q[0] == 0, "cu_q must start at 0, got ", seg.q[0]);
  TORCH_CHECK(seg.k[0] == 0, "cu_k must start at 0, got ", seg.k[0]);
  int64_t max_lq = 0;
  for (int64_t s = 0; s < d.S; ++s) {
    const int64_t lq = seg.q[s + 1] - seg.q[s], lk = seg.k[s + 1] - seg.k[s];
    TORCH_CHECK(lq >= 0, "cu_q must be non-decreasing, got cu_q[", s, "] = ", seg.q[s], " > cu_q[", s + 1,
                "] = ", seg.q[s + 1]);
    TORCH_CHECK(lk >= lq, "cu_k must give every segment at least as many keys as cu_q gives queries, segment ",
                s, " has ", lq, " queries and ", lk, " keys");
    max_lq = std::max(max_lq, lq);
    seg.max_lk = std::max(seg.max_lk, lk);
  }
  TORCH_CHECK(seg.q[d.S] == d.Tq, "cu_q must end at q.shape[1] = ", d.Tq, ", got ", seg.q[d.S]);
  TORCH_CHECK(seg.k[d.S] == d.Tk, "cu_k must end at k.shape[1] = ", d.Tk, ", got ", seg.k[d.S]);
  TORCH_CHECK(max_q >= max_lq, "max_q must be at least the longest query segment (", max_lq, "), got ", max_q);
  TORCH_CHECK(max_k >= seg.max_lk, "max_k must be at least the longest key segment (", seg.max_lk, "), got ",
              max_k);
  return seg;
}

int threads_for(int64_t tasks) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tasks, at::get_num_threads())));
}

// out [B, Tq, H, Dh] and lse [B, H, Tq], both contiguous. One task per (image, head, segment); a query row sees
// the P prefix keys and the first i + lk - lq + 1 keys of its segment.
template <typename T>
void fwd_loop(const Rows<T>& Q, const Rows<T>& K, const Rows<T>& V, const Rows<T>& PK, const Rows<T>& PV,
              const Segments& seg, const PrefixDims& d, T scale, T* out, T* lse) {
  const int64_t H = d.H, S = d.S, P = d.P, Dh = d.Dh, tasks = d.B * d.H * d.S;
#pragma omp parallel num_threads(threads_for(tasks))
  {
    std::vector<T> w(P + seg.max_lk);
#pragma omp for schedule(dynamic, 8)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / (H * S), h = (task / S) % H, s = task % S;
      const int64_t q0 = seg.q[s], lq = seg.q[s + 1] - q0, k0 = seg.k[s], lk = seg.k[s + 1] - k0;
      for (int64_t i = 0; i < lq; ++i) {
        const int64_t t = q0 + i, nsuf = i + lk - lq + 1;
        const T* qi = Q(b, t, h);
        T m = -std::numeric_limits<T>::infinity();
        for (int64_t j = 0; j < P; ++j) m = std::max(m, w[j] = scale * dot(qi, PK(b, j, h), Dh));
        for (int64_t j = 0; j < nsuf; ++j) m = std::max(m, w[P + j] = scale * dot(qi, K(b, k0 + j, h), Dh));
        T sum = 0;
        for (int64_t j = 0; j < P + nsuf; ++j) sum += (w[j] = std::exp(w[j] - m));
        T* o = out + ((b * d.Tq + t) * H + h) * Dh;
        std::fill(o, o + Dh, T(0));
        const T inv = T(1) / sum;
        for (int64_t j = 0; j < P; ++j) axpy(w[j] * inv, PV(b, j, h), o, Dh);
        for (int64_t j = 0; j < nsuf; ++j) axpy(w[P + j] * inv, V(b, k0 + j, h), o, Dh);
        lse[(b * H + h) * d.Tq + t] = m + std::log(sum);
      }
    }
  }
}

// dq, dk, dv zero-initialised, contiguous like q, k, v; gpk, gpv [B, H, C, P, Dh] zeros: the prefix gradients of
// each (image, head, chunk of segments) task, summed over chunks by the caller.
template <typename T>
void bwd_loop(const Rows<T>& Q, const Rows<T>& K, const Rows<T>& V, const Rows<T>& PK, const Rows<T>& PV,
              const Rows<T>& DO, const Rows<T>& O, const T* lse, const Segments& seg, const PrefixDims& d, T scale,
              int64_t C, T* dq, T* dk, T* dv, T* gpk, T* gpv) {
  const int64_t H = d.H, S = d.S, P = d.P, Dh = d.Dh, tasks = d.B * d.H * C;
#pragma omp parallel for num_threads(threads_for(tasks)) schedule(dynamic, 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / (H * C), h = (task / C) % H, c = task % C;
    T* tpk = gpk + task * P * Dh;
    T* tpv = gpv + task * P * Dh;
    for (int64_t s = c * S / C; s < (c + 1) * S / C; ++s) {
      const int64_t q0 = seg.q[s], lq = seg.q[s + 1] - q0, k0 = seg.k[s], lk = seg.k[s + 1] - k0;
      for (int64_t i = 0; i < lq; ++i) {
        const int64_t t = q0 + i, nsuf = i + lk - lq + 1;
        const T *qi = Q(b, t, h), *doi = DO(b, t, h);
        const T li = lse[(b * H + h) * d.Tq + t], delta = dot(doi, O(b, t, h), Dh);
        T* dqi = dq + ((b * d.Tq + t) * H + h) * Dh;
        for (int64_t j = 0; j < P; ++j) {
          const T *kj = PK(b, j, h), *vj = PV(b, j, h);
          const T p = std::exp(scale * dot(qi, kj, Dh) - li);
          const T ds = p * (dot(doi, vj, Dh) - delta) * scale;
          axpy(ds, kj, dqi, Dh);
          axpy(ds, qi, tpk + j * Dh, Dh);
          axpy(p, doi, tpv + j * Dh, Dh);
        }
        for (int64_t j = 0; j < nsuf; ++j) {
          const T *kj = K(b, k0 + j, h), *vj = V(b, k0 + j, h);
          const T p = std::exp(scale * dot(qi, kj, Dh) - li);
          const T ds = p * (dot(doi, vj, Dh) - delta) * scale;
          const int64_t row = ((b * d.Tk + k0 + j) * H + h) * Dh;
          axpy(ds, kj, dqi, Dh);
          axpy(ds, qi, dk + row, Dh);
          axpy(p, doi, dv + row, Dh);
        }
      }
    }
  }
}

// dst [B, P, H, Dh] = sum over c of part [B, H, C, P, Dh].
template <typename T>
void sum_chunks(const T* part, const PrefixDims& d, int64_t C, T* dst) {
  const int64_t P = d.P, H = d.H, Dh = d.Dh, rows = d.B * P * H;
#pragma omp parallel for num_threads(threads_for(rows / 64 + 1))
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / (P * H), j = (r / H) % P, h = r % H;
    T* o = dst + r * Dh;
    for (int64_t c = 0; c < C; ++c) axpy(T(1), part + (((b * H + h) * C + c) * P + j) * Dh, o, Dh);
  }
}

void check_cpu_inputs(const at::Tensor& q) {
  INTCOOP_CHECK_DEVICE(q, at::Device(at::kCPU));
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "q must be float32 or float64 for the CPU kernel, got ", q.scalar_type(), " (shape ", q.sizes(), ")");
}

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& pk,
                                                            const at::Tensor& pv, const at::Tensor& cu_q,
                                                            const at::Tensor& cu_k, int64_t max_q, int64_t max_k,
                                                            double scale) {
  const PrefixDims d = check_prefix_attention_args(q, k, v, pk, pv, cu_q, cu_k);
  check_cpu_inputs(q);
  const Segments seg = read_segments(cu_q, cu_k, d, max_q, max_k);
  at::Tensor out = at::empty({d.B, d.Tq, d.H, d.Dh}, q.options());
  at::Tensor lse = at::empty({d.B, d.H, d.Tq}, q.options());
  const at::Tensor q_ = last_dim_dense(q), k_ = last_dim_dense(k), v_ = last_dim_dense(v);
  const at::Tensor pk_ = last_dim_dense(pk), pv_ = last_dim_dense(pv);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "prefix_attention_fwd_cpu", [&] {
    fwd_loop<scalar_t>(Rows<scalar_t>(q_), Rows<scalar_t>(k_), Rows<scalar_t>(v_), Rows<scalar_t>(pk_),
                       Rows<scalar_t>(pv_), seg, d, static_cast<scalar_t>(scale), out.data_ptr<scalar_t>(),
                       lse.data_ptr<scalar_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
    const at::Tensor& pv, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q,
    const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double scale) {
  const PrefixDims d = check_prefix_attention_args(q, k, v, pk, pv, cu_q, cu_k);
  check_prefix_attention_bwd_args(dout, q, out, lse);
  check_cpu_inputs(q);
  const Segments seg = read_segments(cu_q, cu_k, d, max_q, max_k);
  // Enough (image, head, chunk) tasks to share out, independent of the thread count (so results are too).
  const int64_t BH = std::max<int64_t>(1, d.B * d.H);
  const int64_t C = std::max<int64_t>(1, std::min<int64_t>(d.S, (64 + BH - 1) / BH));
  at::Tensor dq = at::zeros({d.B, d.Tq, d.H, d.Dh}, q.options());
  at::Tensor dk = at::zeros({d.B, d.Tk, d.H, d.Dh}, q.options()), dv = at::zeros_like(dk);
  at::Tensor dpk = at::zeros({d.B, d.P, d.H, d.Dh}, q.options()), dpv = at::zeros_like(dpk);
  at::Tensor gpk = at::zeros({d.B, d.H, C, d.P, d.Dh}, q.options()), gpv = at::zeros_like(gpk);
  const at::Tensor q_ = last_dim_dense(q), k_ = last_dim_dense(k), v_ = last_dim_dense(v);
  const at::Tensor pk_ = last_dim_dense(pk), pv_ = last_dim_dense(pv);
  const at::Tensor do_ = last_dim_dense(dout), o_ = last_dim_dense(out), lse_ = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "prefix_attention_bwd_cpu", [&] {
    bwd_loop<scalar_t>(Rows<scalar_t>(q_), Rows<scalar_t>(k_), Rows<scalar_t>(v_), Rows<scalar_t>(pk_),
                       Rows<scalar_t>(pv_), Rows<scalar_t>(do_), Rows<scalar_t>(o_), lse_.data_ptr<scalar_t>(), seg,
                       d, static_cast<scalar_t>(scale), C, dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                       dv.data_ptr<scalar_t>(), gpk.data_ptr<scalar_t>(), gpv.data_ptr<scalar_t>());
    sum_chunks<scalar_t>(gpk.data_ptr<scalar_t>(), d, C, dpk.data_ptr<scalar_t>());
    sum_chunks<scalar_t>(gpv.data_ptr<scalar_t>(), d, C, dpv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace
}  // namespace intcoop

TORCH_LIBRARY_IMPL(intcoop_C, CPU, m) {
  m.impl("prefix_attention_fwd", &intcoop::prefix_attention_fwd_cpu);
  m.impl("prefix_attention_bwd", &intcoop::prefix_attention_bwd_cpu);
}
