// C++/OpenMP CPU kernels of prefix_attention (forward and backward) for float32, float64, bfloat16 and float16,
// registered for the CPU key of torch.ops.intcoop_C. Semantics: intcoop/ops/prefix_attention.py. Accumulation is
// in at::opmath_type of the input dtype: double for float64, float for the others. bfloat16 / float16 rows are
// converted to float once per task (the image's prefix rows, a segment's key/value rows, each query row), every
// sum runs in float, and results are rounded to the input dtype once when stored; lse is float32 (float64 for
// float64). Forward tasks are (image, head, segment); backward tasks are (image, head, chunk of segments), each
// summing its prefix gradients privately, reduced in a fixed order after.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
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

// Row x [n] in the accumulation type A: x itself when T is A, else converted into buf [n].
template <typename T, typename A>
inline const A* as_acc(const T* x, int64_t n, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return x;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(x[i]);
    return buf;
  }
}

template <typename T, typename A>
inline void store(const A* x, int64_t n, T* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(x[i]);
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

// out [B, Tq, H, Dh] (T) and lse [B, H, Tq] (A), both contiguous. One task per (image, head, segment); a query
// row sees the P prefix keys and the first i + lk - lq + 1 keys of its segment. kr / vr point at the task's key
// and value rows in A (into the inputs when T is A, else into the task's converted copy).
template <typename T, typename A = at::opmath_type<T>>
void fwd_loop(const Rows<T>& Q, const Rows<T>& K, const Rows<T>& V, const Rows<T>& PK, const Rows<T>& PV,
              const Segments& seg, const PrefixDims& d, A scale, T* out, A* lse) {
  const int64_t H = d.H, S = d.S, P = d.P, Dh = d.Dh, tasks = d.B * d.H * d.S, n = P + seg.max_lk;
#pragma omp parallel num_threads(threads_for(tasks))
  {
    std::vector<A> w(n), o(Dh), qb(Dh), kvb(2 * n * Dh);
    std::vector<const A*> kr(n), vr(n);
#pragma omp for schedule(dynamic, 8)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / (H * S), h = (task / S) % H, s = task % S;
      const int64_t q0 = seg.q[s], lq = seg.q[s + 1] - q0, k0 = seg.k[s], lk = seg.k[s + 1] - k0;
      if (lq == 0) continue;
      for (int64_t j = 0; j < P; ++j) {
        kr[j] = as_acc(PK(b, j, h), Dh, &kvb[(2 * j) * Dh]);
        vr[j] = as_acc(PV(b, j, h), Dh, &kvb[(2 * j + 1) * Dh]);
      }
      for (int64_t j = 0; j < lk; ++j) {
        kr[P + j] = as_acc(K(b, k0 + j, h), Dh, &kvb[(2 * (P + j)) * Dh]);
        vr[P + j] = as_acc(V(b, k0 + j, h), Dh, &kvb[(2 * (P + j) + 1) * Dh]);
      }
      for (int64_t i = 0; i < lq; ++i) {
        const int64_t t = q0 + i, m_keys = P + i + lk - lq + 1;
        const A* qi = as_acc(Q(b, t, h), Dh, qb.data());
        A m = -std::numeric_limits<A>::infinity();
        for (int64_t j = 0; j < m_keys; ++j) m = std::max(m, w[j] = scale * dot(qi, kr[j], Dh));
        A sum = 0;
        for (int64_t j = 0; j < m_keys; ++j) sum += (w[j] = std::exp(w[j] - m));
        std::fill(o.begin(), o.end(), A(0));
        const A inv = A(1) / sum;
        for (int64_t j = 0; j < m_keys; ++j) axpy(w[j] * inv, vr[j], o.data(), Dh);
        store(o.data(), Dh, out + ((b * d.Tq + t) * H + h) * Dh);
        lse[(b * H + h) * d.Tq + t] = m + std::log(sum);
      }
    }
  }
}

// dq, dk, dv zero-initialised in A, contiguous like q, k, v; gpk, gpv [B, H, C, P, Dh] zeros in A: the prefix
// gradients of each (image, head, chunk of segments) task, summed over chunks by the caller.
template <typename T, typename A = at::opmath_type<T>>
void bwd_loop(const Rows<T>& Q, const Rows<T>& K, const Rows<T>& V, const Rows<T>& PK, const Rows<T>& PV,
              const Rows<T>& DO, const Rows<T>& O, const A* lse, const Segments& seg, const PrefixDims& d, A scale,
              int64_t C, A* dq, A* dk, A* dv, A* gpk, A* gpv) {
  const int64_t H = d.H, S = d.S, P = d.P, Dh = d.Dh, tasks = d.B * d.H * C, n = P + seg.max_lk;
#pragma omp parallel num_threads(threads_for(tasks))
  {
    std::vector<A> kvb(2 * n * Dh), qb(Dh), dob(Dh), ob(Dh);
    std::vector<const A*> kr(n), vr(n);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / (H * C), h = (task / C) % H, c = task % C;
      A* tpk = gpk + task * P * Dh;
      A* tpv = gpv + task * P * Dh;
      for (int64_t j = 0; j < P; ++j) {
        kr[j] = as_acc(PK(b, j, h), Dh, &kvb[(2 * j) * Dh]);
        vr[j] = as_acc(PV(b, j, h), Dh, &kvb[(2 * j + 1) * Dh]);
      }
      for (int64_t s = c * S / C; s < (c + 1) * S / C; ++s) {
        const int64_t q0 = seg.q[s], lq = seg.q[s + 1] - q0, k0 = seg.k[s], lk = seg.k[s + 1] - k0;
        if (lq == 0) continue;
        for (int64_t j = 0; j < lk; ++j) {
          kr[P + j] = as_acc(K(b, k0 + j, h), Dh, &kvb[(2 * (P + j)) * Dh]);
          vr[P + j] = as_acc(V(b, k0 + j, h), Dh, &kvb[(2 * (P + j) + 1) * Dh]);
        }
        for (int64_t i = 0; i < lq; ++i) {
          const int64_t t = q0 + i, nsuf = i + lk - lq + 1;
          const A* qi = as_acc(Q(b, t, h), Dh, qb.data());
          const A* doi = as_acc(DO(b, t, h), Dh, dob.data());
          const A li = lse[(b * H + h) * d.Tq + t], delta = dot(doi, as_acc(O(b, t, h), Dh, ob.data()), Dh);
          A* dqi = dq + ((b * d.Tq + t) * H + h) * Dh;
          for (int64_t j = 0; j < P; ++j) {
            const A p = std::exp(scale * dot(qi, kr[j], Dh) - li);
            const A ds = p * (dot(doi, vr[j], Dh) - delta) * scale;
            axpy(ds, kr[j], dqi, Dh);
            axpy(ds, qi, tpk + j * Dh, Dh);
            axpy(p, doi, tpv + j * Dh, Dh);
          }
          for (int64_t j = 0; j < nsuf; ++j) {
            const A* kj = kr[P + j];
            const A p = std::exp(scale * dot(qi, kj, Dh) - li);
            const A ds = p * (dot(doi, vr[P + j], Dh) - delta) * scale;
            const int64_t row = ((b * d.Tk + k0 + j) * H + h) * Dh;
            axpy(ds, kj, dqi, Dh);
            axpy(ds, qi, dk + row, Dh);
            axpy(p, doi, dv + row, Dh);
          }
        }
      }
    }
  }
}

// dst [B, P, H, Dh] = sum over c of part [B, H, C, P, Dh].
template <typename A>
void sum_chunks(const A* part, const PrefixDims& d, int64_t C, A* dst) {
  const int64_t P = d.P, H = d.H, Dh = d.Dh, rows = d.B * P * H;
#pragma omp parallel for num_threads(threads_for(rows / 64 + 1))
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / (P * H), j = (r / H) % P, h = r % H;
    A* o = dst + r * Dh;
    for (int64_t c = 0; c < C; ++c) axpy(A(1), part + (((b * H + h) * C + c) * P + j) * Dh, o, Dh);
  }
}

void check_cpu_inputs(const at::Tensor& q) {
  INTCOOP_CHECK_DEVICE(q, at::Device(at::kCPU));
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
              "q must be float32, float64, bfloat16 or float16 for the CPU kernel, got ", t, " (shape ", q.sizes(),
              ")");
}

// The accumulation dtype of the op's sums and of lse: float64 for float64 inputs, float32 for the others.
at::ScalarType acc_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& pk,
                                                            const at::Tensor& pv, const at::Tensor& cu_q,
                                                            const at::Tensor& cu_k, int64_t max_q, int64_t max_k,
                                                            double scale) {
  const PrefixDims d = check_prefix_attention_args(q, k, v, pk, pv, cu_q, cu_k);
  check_cpu_inputs(q);
  const Segments seg = read_segments(cu_q, cu_k, d, max_q, max_k);
  at::Tensor out = at::empty({d.B, d.Tq, d.H, d.Dh}, q.options());
  at::Tensor lse = at::empty({d.B, d.H, d.Tq}, q.options().dtype(acc_dtype(q)));
  const at::Tensor q_ = last_dim_dense(q), k_ = last_dim_dense(k), v_ = last_dim_dense(v);
  const at::Tensor pk_ = last_dim_dense(pk), pv_ = last_dim_dense(pv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "prefix_attention_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    fwd_loop<scalar_t>(Rows<scalar_t>(q_), Rows<scalar_t>(k_), Rows<scalar_t>(v_), Rows<scalar_t>(pk_),
                       Rows<scalar_t>(pv_), seg, d, static_cast<A>(scale), out.data_ptr<scalar_t>(),
                       lse.data_ptr<A>());
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
  const auto acc = q.options().dtype(acc_dtype(q));         // gradients are summed in it, rounded once at the end
  at::Tensor dq = at::zeros({d.B, d.Tq, d.H, d.Dh}, acc);
  at::Tensor dk = at::zeros({d.B, d.Tk, d.H, d.Dh}, acc), dv = at::zeros_like(dk);
  at::Tensor dpk = at::zeros({d.B, d.P, d.H, d.Dh}, acc), dpv = at::zeros_like(dpk);
  at::Tensor gpk = at::zeros({d.B, d.H, C, d.P, d.Dh}, acc), gpv = at::zeros_like(gpk);
  const at::Tensor q_ = last_dim_dense(q), k_ = last_dim_dense(k), v_ = last_dim_dense(v);
  const at::Tensor pk_ = last_dim_dense(pk), pv_ = last_dim_dense(pv);
  const at::Tensor do_ = last_dim_dense(dout), o_ = last_dim_dense(out), lse_ = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "prefix_attention_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    bwd_loop<scalar_t>(Rows<scalar_t>(q_), Rows<scalar_t>(k_), Rows<scalar_t>(v_), Rows<scalar_t>(pk_),
                       Rows<scalar_t>(pv_), Rows<scalar_t>(do_), Rows<scalar_t>(o_), lse_.data_ptr<A>(), seg, d,
                       static_cast<A>(scale), C, dq.data_ptr<A>(), dk.data_ptr<A>(), dv.data_ptr<A>(),
                       gpk.data_ptr<A>(), gpv.data_ptr<A>());
    sum_chunks<A>(gpk.data_ptr<A>(), d, C, dpk.data_ptr<A>());
    sum_chunks<A>(gpv.data_ptr<A>(), d, C, dpv.data_ptr<A>());
  });
  const auto t = q.scalar_type();
  return {dq.to(t), dk.to(t), dv.to(t), dpk.to(t), dpv.to(t)};
}

}  // namespace
}  // namespace intcoop

TORCH_LIBRARY_IMPL(intcoop_C, CPU, m) {
  m.impl("prefix_attention_fwd", &intcoop::prefix_attention_fwd_cpu);
  m.impl("prefix_attention_bwd", &intcoop::prefix_attention_bwd_cpu);
}
