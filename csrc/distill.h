// Distillation losses on the CPU: the math of fused_ce/kernels/distill.py.
//
// Student and teacher logits are strided (N, V) arrays; a row is one distribution. Per row, in
// the accumulation dtype A, with x = student / T and y = teacher / T, m_x = max x, log_s_x =
// log sum exp(x - m_x), lq = (x - m_x) - log_s_x (the student's log-probabilities, q = exp lq)
// and likewise m_y, log_s_y, lp, p for the teacher:
//
//   beta == 0 (KL(p || q)):   loss = c_p = sum p (lp - lq)
//       d student = g/T (q - p),                   d teacher = g/T p (lp - lq - c_p)
//   0 < beta < 1 (JSD):       lm = log(beta p + (1 - beta) q), c_p = sum p (lp - lm),
//                             c_q = sum q (lq - lm), loss = beta c_p + (1 - beta) c_q
//       d student = g/T (1 - beta) q (lq - lm - c_q),   d teacher = g/T beta p (lp - lm - c_p)
//
// Terms whose probability is 0 count 0 (their log-probability may be -inf). The forward saves
// (m_x, log_s_x, m_y, log_s_y, c_q, c_p) per row; x - m_x is exact near the max, so logits of
// size 1e4 lose nothing to a rounded lse. Each row is converted once into two per-thread
// buffers: the forward reads them three times (max, exp sums, divergence sums), the backward
// once (the statistics are saved) and writes both gradients from them, so grad_student may be
// the student logits themselves. Rows that are
// not valid get loss 0 and gradient 0 without being read.
#pragma once

#include <cmath>

#include "cross_entropy.h"

namespace fused_ce_native {
namespace {

template <typename A>
struct DistillArgs {
  int64_t n_rows, n_classes;
  // logits: (row, class) strides in elements, element size, loader
  const char *student, *teacher;
  int64_t s_row, s_col, s_size, t_row, t_col, t_size;
  LoadRow<A> load_student, load_teacher;
  const bool* valid;  // (N,) or nullptr: every row counts
  int64_t valid_stride;
  A inv_temperature, beta;
  A *loss, *saved;  // forward outputs; saved is (6, N)
  int64_t saved_stride;
  const A* grad_loss;  // backward: per-row upstream
  int64_t grad_loss_stride;
  char *grad_student, *grad_teacher;
  int64_t gs_row, gs_col, gs_size, gt_row, gt_col, gt_size;
  StoreRow<A> store_grad_student, store_grad_teacher;
};

enum Saved { kMaxX = 0, kLogSX, kMaxY, kLogSY, kCQ, kCP, kSavedRows };

// log(sum exp(z - m)) over a row.
template <typename A>
A log_sum_exp_shifted(const A* z, int64_t n, A m) {
  using V = Vectorized<A>;
  V sum(A(0));
  for_vectors<A>(n, [&](int64_t i, int64_t k) {
    sum += head(exp_nonpositive(V::loadu(z + i, k) - V(m)), k, A(0));
  });
  return std::log(reduce_sum(sum));
}

// The per-element log-probabilities and, for the JSD, the mixture's log: what both passes
// need. lm = max(a, b) + log1p(exp(-|a - b|)) with a = lp + log beta, b = lq + log(1 - beta).
template <typename A>
struct Terms {
  Vectorized<A> lq, lp, q, p, lm;
};

// `with_q`: the KL's forward needs no q (one exp per element fewer).
template <typename A>
inline Terms<A> terms(const DistillArgs<A>& a, const A* x, const A* y, int64_t i, int64_t k,
                      const A* stats, bool with_q) {
  using V = Vectorized<A>;
  Terms<A> t;
  t.lq = V::loadu(x + i, k) - V(stats[kMaxX]) - V(stats[kLogSX]);
  t.lp = V::loadu(y + i, k) - V(stats[kMaxY]) - V(stats[kLogSY]);
  if (with_q) t.q = exp_nonpositive(t.lq);
  t.p = exp_nonpositive(t.lp);
  if (a.beta > A(0)) {
    const V from_p = t.lp + V(std::log(a.beta));
    const V from_q = t.lq + V(std::log1p(-a.beta));
    // exp of a non-positive argument: the fast exp (its 1e-6 relative error moves log1p by
    // at most 1e-6 absolute).
    t.lm = at::vec::maximum(from_p, from_q) +
           exp_nonpositive(V(A(0)) - (from_p - from_q).abs()).log1p();
  }
  return t;
}

// prob * value, 0 where prob is 0 (value may be infinite there).
template <typename A>
inline Vectorized<A> weighted(const Vectorized<A>& prob, const Vectorized<A>& value) {
  return Vectorized<A>::blendv(Vectorized<A>(A(0)), prob * value, prob > Vectorized<A>(A(0)));
}

template <typename A>
void load_scaled(const DistillArgs<A>& a, int64_t row, A* x, A* y) {
  const int64_t V = a.n_classes;
  a.load_student(a.student + row * a.s_row * a.s_size, a.s_col, V, x);
  a.load_teacher(a.teacher + row * a.t_row * a.t_size, a.t_col, V, y);
  if (a.inv_temperature != A(1)) {
    using Vec = Vectorized<A>;
    for_vectors<A>(V, [&](int64_t i, int64_t k) {
      (Vec::loadu(x + i, k) * Vec(a.inv_temperature)).store(x + i, k);
      (Vec::loadu(y + i, k) * Vec(a.inv_temperature)).store(y + i, k);
    });
  }
}

template <typename A>
void distill_forward_rows(const DistillArgs<A>& a, int64_t begin, int64_t end) {
  using Vec = Vectorized<A>;
  const int64_t V = a.n_classes;
  A* x = scratch<A>(0, V);
  A* y = scratch<A>(1, V);
  for (int64_t row = begin; row < end; ++row) {
    A stats[kSavedRows] = {};
    A loss = 0;
    if (a.valid == nullptr || a.valid[row * a.valid_stride]) {
      load_scaled(a, row, x, y);
      stats[kMaxX] = row_max(x, V);
      stats[kMaxY] = row_max(y, V);
      stats[kLogSX] = log_sum_exp_shifted(x, V, stats[kMaxX]);
      stats[kLogSY] = log_sum_exp_shifted(y, V, stats[kMaxY]);
      Vec c_p(A(0)), c_q(A(0));
      for_vectors<A>(V, [&](int64_t i, int64_t k) {
        const Terms<A> t = terms(a, x, y, i, k, stats, a.beta > A(0));
        if (a.beta > A(0)) {
          c_p += head(weighted(t.p, t.lp - t.lm), k, A(0));
          c_q += head(weighted(t.q, t.lq - t.lm), k, A(0));
        } else {
          c_p += head(weighted(t.p, t.lp - t.lq), k, A(0));
        }
      });
      stats[kCP] = reduce_sum(c_p);
      stats[kCQ] = reduce_sum(c_q);
      loss = a.beta > A(0) ? a.beta * stats[kCP] + (A(1) - a.beta) * stats[kCQ] : stats[kCP];
    }
    a.loss[row] = loss;
    for (int s = 0; s < kSavedRows; ++s) a.saved[s * a.saved_stride + row] = stats[s];
  }
}

template <typename A>
void distill_backward_rows(const DistillArgs<A>& a, int64_t begin, int64_t end) {
  using Vec = Vectorized<A>;
  const int64_t V = a.n_classes;
  A* x = scratch<A>(0, V);
  A* y = scratch<A>(1, V);
  for (int64_t row = begin; row < end; ++row) {
    const bool valid = a.valid == nullptr || a.valid[row * a.valid_stride];
    if (!valid) {
      std::fill(x, x + V, A(0));
      std::fill(y, y + V, A(0));
    } else {
      load_scaled(a, row, x, y);
      A stats[kSavedRows];
      for (int s = 0; s < kSavedRows; ++s) stats[s] = a.saved[s * a.saved_stride + row];
      const A g = a.grad_loss[row * a.grad_loss_stride] * a.inv_temperature;
      const Vec coef_s(a.beta > A(0) ? g * (A(1) - a.beta) : g);
      const Vec coef_t(a.beta > A(0) ? g * a.beta : g);
      for_vectors<A>(V, [&](int64_t i, int64_t k) {
        const Terms<A> t = terms(a, x, y, i, k, stats, true);
        Vec d_student, d_teacher;
        if (a.beta > A(0)) {
          d_student = coef_s * weighted(t.q, t.lq - t.lm - Vec(stats[kCQ]));
          d_teacher = coef_t * weighted(t.p, t.lp - t.lm - Vec(stats[kCP]));
        } else {
          d_student = coef_s * (t.q - t.p);
          d_teacher = coef_t * weighted(t.p, t.lp - t.lq - Vec(stats[kCP]));
        }
        // Each element of x and y is read above before it is overwritten here.
        d_student.store(x + i, k);
        d_teacher.store(y + i, k);
      });
    }
    if (a.grad_student != nullptr) {
      a.store_grad_student(x, a.grad_student + row * a.gs_row * a.gs_size, a.gs_col, V);
    }
    if (a.grad_teacher != nullptr) {
      a.store_grad_teacher(y, a.grad_teacher + row * a.gt_row * a.gt_size, a.gt_col, V);
    }
  }
}

template <typename A>
DistillArgs<A> distill_args(const at::Tensor& student, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& valid, double temperature,
                            double beta, const at::Tensor& saved) {
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes(),
              "fused_ce native: student and teacher logits must be (N, V) of one shape");
  TORCH_CHECK(temperature > 0.0 && beta >= 0.0 && beta < 1.0,
              "fused_ce native: distill needs temperature > 0 and 0 <= beta < 1");
  DistillArgs<A> a{};
  a.n_rows = student.size(0);
  a.n_classes = student.size(1);
  a.student = static_cast<const char*>(student.const_data_ptr());
  a.s_row = student.stride(0);
  a.s_col = student.stride(1);
  a.s_size = student.element_size();
  a.load_student = row_loader<A>(student.scalar_type());
  a.teacher = static_cast<const char*>(teacher.const_data_ptr());
  a.t_row = teacher.stride(0);
  a.t_col = teacher.stride(1);
  a.t_size = teacher.element_size();
  a.load_teacher = row_loader<A>(teacher.scalar_type());
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool && valid->dim() == 1 &&
                    valid->size(0) == a.n_rows,
                "fused_ce native: valid must be a (N,) bool tensor");
    a.valid = valid->const_data_ptr<bool>();
    a.valid_stride = valid->stride(0);
  }
  a.inv_temperature = static_cast<A>(1.0 / temperature);
  a.beta = static_cast<A>(beta);
  TORCH_CHECK(saved.dim() == 2 && saved.size(0) == kSavedRows && saved.size(1) == a.n_rows &&
                  saved.stride(1) == 1 && saved.scalar_type() == c10::CppTypeToScalarType<A>::value,
              "fused_ce native: saved must be (6, N) with unit row stride in the accumulation "
              "dtype");
  a.saved = const_cast<A*>(saved.const_data_ptr<A>());
  a.saved_stride = saved.stride(0);
  return a;
}

template <typename A>
void distill_forward_impl(const at::Tensor& student, const at::Tensor& teacher,
                          const std::optional<at::Tensor>& valid, double temperature,
                          double beta, const at::Tensor& loss, const at::Tensor& saved) {
  DistillArgs<A> a = distill_args<A>(student, teacher, valid, temperature, beta, saved);
  check_row_output(loss, "loss", a.n_rows, c10::CppTypeToScalarType<A>::value);
  a.loss = loss.data_ptr<A>();
  if (a.n_rows == 0) return;
  at::parallel_for(0, a.n_rows, row_grain(2 * a.n_classes), [&](int64_t begin, int64_t end) {
    distill_forward_rows<A>(a, begin, end);
  });
}

template <typename A>
void set_distill_grad(const std::optional<at::Tensor>& grad, const at::Tensor& like,
                      const char* name, char*& data, int64_t& row, int64_t& col, int64_t& size,
                      StoreRow<A>& store) {
  if (!grad.has_value()) return;
  TORCH_CHECK(grad->sizes() == like.sizes() && grad->scalar_type() == like.scalar_type(),
              "fused_ce native: ", name, " must have its logits' shape and dtype");
  data = static_cast<char*>(grad->data_ptr());
  row = grad->stride(0);
  col = grad->stride(1);
  size = grad->element_size();
  store = row_storer<A>(grad->scalar_type());
  prefer_huge_pages(*grad);
}

template <typename A>
void distill_backward_impl(const at::Tensor& grad_loss, const at::Tensor& student,
                           const at::Tensor& teacher, const std::optional<at::Tensor>& valid,
                           const at::Tensor& saved, double temperature, double beta,
                           const std::optional<at::Tensor>& grad_student,
                           const std::optional<at::Tensor>& grad_teacher) {
  DistillArgs<A> a = distill_args<A>(student, teacher, valid, temperature, beta, saved);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == a.n_rows &&
                  grad_loss.scalar_type() == c10::CppTypeToScalarType<A>::value,
              "fused_ce native: grad_loss must be (N,) in the accumulation dtype");
  a.grad_loss = grad_loss.const_data_ptr<A>();
  a.grad_loss_stride = grad_loss.stride(0);
  set_distill_grad<A>(grad_student, student, "grad_student", a.grad_student, a.gs_row, a.gs_col,
                      a.gs_size, a.store_grad_student);
  set_distill_grad<A>(grad_teacher, teacher, "grad_teacher", a.grad_teacher, a.gt_row, a.gt_col,
                      a.gt_size, a.store_grad_teacher);
  if (a.n_rows == 0 || (a.grad_student == nullptr && a.grad_teacher == nullptr)) return;
  at::parallel_for(0, a.n_rows, row_grain(2 * a.n_classes), [&](int64_t begin, int64_t end) {
    distill_backward_rows<A>(a, begin, end);
  });
}

void distill_forward(const at::Tensor& student, const at::Tensor& teacher,
                     const std::optional<at::Tensor>& valid, double temperature, double beta,
                     const at::Tensor& loss, const at::Tensor& saved) {
  if (accumulation(student, teacher) == at::kDouble) {
    distill_forward_impl<double>(student, teacher, valid, temperature, beta, loss, saved);
  } else {
    distill_forward_impl<float>(student, teacher, valid, temperature, beta, loss, saved);
  }
}

void distill_backward(const at::Tensor& grad_loss, const at::Tensor& student,
                      const at::Tensor& teacher, const std::optional<at::Tensor>& valid,
                      const at::Tensor& saved, double temperature, double beta,
                      const std::optional<at::Tensor>& grad_student,
                      const std::optional<at::Tensor>& grad_teacher) {
  if (accumulation(student, teacher) == at::kDouble) {
    distill_backward_impl<double>(grad_loss, student, teacher, valid, saved, temperature, beta,
                                  grad_student, grad_teacher);
  } else {
    distill_backward_impl<float>(grad_loss, student, teacher, valid, saved, temperature, beta,
                                 grad_student, grad_teacher);
  }
}

}  // namespace
}  // namespace fused_ce_native
