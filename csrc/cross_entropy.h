// Softmax + cross-entropy on the CPU: the math of fused_ce/kernels/cross_entropy.py.
//
// Logits are a strided (n_outer, C, n_inner) array; a row is one softmax over C. Per row, in
// the accumulation dtype A (see common.h), with z the final logits (after logit_scale and
// softcap), ref the row max (0 when it is not finite), d = z - ref, e = exp(d), s = sum e,
// log_s = log s, u the "linear weights" (w for label smoothing, w * ((1 - eps) t + eps / C)
// for probability targets), U = sum u:
//
//   loss  = a (log_s - d_y) + b (U log_s - sum_c u_c d_c)     (a, b: see ce_rows)
//   dz_c  = p_c coef_p - coef_u u_c - coef_y [c == y],         p = e / s
//   dx_c  = dz_c * logit_scale * (1 - tanh^2)                   (the softcap's slope)
//
// Two layouts, chosen by C alone (run()): ce_rows, one row at a time with the classes across
// vector lanes, and for C <= 64 ce_blocks, a block of rows across the lanes with the classes
// along the loop. Passes over one row in ce_rows (forward): read the row from memory finding its
// max (fp32 rows in place, others converted + scaled/capped into a per-thread buffer), then one
// pass of exp and sums. With a gradient in the forward (the scalar-loss path) one more pass
// writes dz (an fp32 gradient is built in its own output row, a reduced one rounded straight
// into it): the whole forward + backward costs one exp per element, one read of the logits and
// one write of the gradient. The backward from saved statistics: read, one exp per element,
// write.
#pragma once

#include "common.h"

namespace fused_ce_native {
namespace {

// Converts one row into the buffer and returns its max (see load_row_max).
template <typename A>
using LoadRowMax = A (*)(const void*, int64_t, int64_t, A*);

template <typename A>
struct CEArgs {
  int64_t n_rows, n_classes, n_inner;
  // logits: element size, (outer, class, inner) strides in elements, loader
  const char* logits;
  int64_t logits_size, lo, lc, li;
  LoadRow<A> load_logits;
  LoadRowMax<A> load_logits_max;
  // target: class indices (int64 or uint8, (outer, inner) strides) or probabilities
  const char* target;
  int64_t target_size, to, tc, ti;
  bool prob, target_uint8;
  LoadRow<A> load_target;
  const A* weight;  // (C,) in A, or nullptr
  int64_t ignore_index;
  A eps, scale, cap;
  // forward outputs (contiguous, A)
  A *loss, *lse, *saved, *entropy;
  int64_t saved_stride;
  int64_t* argmax;
  bool stats;
  // gradient: a scalar grad_scale (forward) or per-row grad_loss / grad_lse (backward)
  A grad_scale, z_loss;
  const A *grad_loss, *grad_lse;
  int64_t grad_loss_stride, grad_lse_stride;
  char* grad_logits;
  int64_t grad_size, go, gc, gi;
  StoreRow<A> store_grad;
  at::ScalarType grad_dtype;
  char* grad_target;
  int64_t grad_target_size, gto, gtc, gti;
  StoreRow<A> store_grad_target;
  // The same conversions for a block of rows across vector lanes (the small-C layout).
  LoadBlock<A> load_logits_block, load_target_block;
  StoreBlock<A> store_grad_block, store_grad_target_block;
  // Logits / grad_logits stored in A with unit class stride: the row path reads and writes
  // them in place instead of through the per-thread buffers.
  bool logits_in_acc, grad_in_acc;
};

enum class Mode { kForward, kForwardGrad, kBackward };

template <typename A, typename F>
inline void for_vectors(int64_t n, F body) {
  constexpr int64_t W = Vectorized<A>::size();
  int64_t i = 0;
  for (; i + W <= n; i += W) body(i, W);
  if (i < n) body(i, n - i);
}

// Lanes past `count` (zero-filled by a partial loadu) replaced by `fill`.
template <typename A>
inline Vectorized<A> head(const Vectorized<A>& v, int64_t count, A fill) {
  return count == Vectorized<A>::size() ? v : Vectorized<A>::set(Vectorized<A>(fill), v, count);
}

// z *= scale; with a cap, z = cap * tanh(z / cap) and slope = scale * (1 - tanh^2), the latter
// as 4w / (1 + w)^2 with w = exp(-2|z / cap|): no cancellation where |tanh| is near 1.
template <typename A>
void final_logits(A* z, A* slope, int64_t n, A scale, A cap) {
  using V = Vectorized<A>;
  if (cap <= A(0)) {
    if (scale != A(1)) for_vectors<A>(n, [&](int64_t i, int64_t k) {
      (V::loadu(z + i, k) * V(scale)).store(z + i, k);
    });
    return;
  }
  for_vectors<A>(n, [&](int64_t i, int64_t k) {
    V a = V::loadu(z + i, k) * V(scale) / V(cap);
    if (slope != nullptr) {
      V w = (a.abs() * V(A(-2))).exp();
      V one_plus = V(A(1)) + w;
      (V(A(4) * scale) * w / (one_plus * one_plus)).store(slope + i, k);
    }
    (a.tanh() * V(cap)).store(z + i, k);
  });
}

// Max of the row (NaN propagates) and, when wanted, its first index (torch.argmax's rule:
// a NaN counts as the maximum).
template <typename A>
A row_max(const A* z, int64_t n) {
  using V = Vectorized<A>;
  const A neg_inf = -std::numeric_limits<A>::infinity();
  V best(neg_inf);
  for_vectors<A>(n, [&](int64_t i, int64_t k) {
    best = at::vec::maximum(best, head(V::loadu(z + i, k), k, neg_inf));
  });
  return at::vec::vec_reduce_all<A>(
      [](V& a, V& b) { return at::vec::maximum(a, b); }, best);
}

template <typename A>
int64_t row_argmax(const A* z, int64_t n) {
  int64_t index = 0;
  A best = n > 0 ? z[0] : A(0);
  for (int64_t c = 1; c < n && !std::isnan(best); ++c) {
    if (z[c] > best || std::isnan(z[c])) {
      best = z[c];
      index = c;
    }
  }
  return index;
}

struct RowSums {
  double sum_exp = 0, exp_dot = 0, lin_sum = 0, lin_dot = 0;
};

// One pass: e = exp(z - ref) (stored when `e_out`), s = sum e, S1 = sum e (z - ref) (entropy),
// and for the linear part U = sum u, sum u (z - ref) (u = `u`, or ones when `u` is null).
template <typename A>
RowSums exp_pass(
    const A* z, int64_t n, A ref, A* e_out, bool stats, bool linear, const A* u) {
  using V = Vectorized<A>;
  V sum_exp(A(0)), exp_dot(A(0)), lin_sum(A(0)), lin_dot(A(0));
  const V zero(A(0));
  for_vectors<A>(n, [&](int64_t i, int64_t k) {
    V d = head(V::loadu(z + i, k) - V(ref), k, A(0));
    V e = head(exp_nonpositive(d), k, A(0));
    if (e_out != nullptr) e.store(e_out + i, k);
    sum_exp += e;
    if (stats) exp_dot += V::blendv(zero, e * d, e > zero);  // e == 0: 0, not 0 * -inf
    if (linear) {
      if (u != nullptr) {
        V uv = V::loadu(u + i, k);
        lin_sum += uv;
        lin_dot += uv * d;
      } else {
        lin_dot += d;
      }
    }
  });
  RowSums sums;
  sums.sum_exp = reduce_sum(sum_exp);
  sums.exp_dot = reduce_sum(exp_dot);
  sums.lin_sum = u != nullptr ? reduce_sum(lin_sum) : static_cast<double>(n);
  sums.lin_dot = reduce_sum(lin_dot);
  return sums;
}

// e = exp(z - m) into `e` (the backward's recomputation of the forward's exp pass: the same
// vector exp on the same operands, so both paths give the same bits).
template <typename A>
void exp_row(const A* z, int64_t n, A m, A* e) {
  using V = Vectorized<A>;
  for_vectors<A>(n, [&](int64_t i, int64_t k) {
    exp_nonpositive(V::loadu(z + i, k) - V(m)).store(e + i, k);
  });
}

// dz = (e * p_mul * coef_p - coef_u * u) * slope into `out` (which may alias `e` when T is A),
// with p_mul = exp(-log_s) so that p = e / s. `u` null with `linear`: ones. `slope` null: the
// scalar `scale`. An fp16/bf16 `out` (A float) is written straight from the vectors, two float
// vectors rounded into one reduced one: no float row to convert afterwards.
template <typename A, typename T>
void gradient_pass(const A* e, int64_t n, A p_mul, A coef_p, A coef_u, bool linear, const A* u,
                   const A* slope, A scale, T* out) {
  using V = Vectorized<A>;
  auto value = [&](int64_t i, int64_t k) {
    V grad = V::loadu(e + i, k) * V(p_mul) * V(coef_p);
    if (linear) grad = grad - V(coef_u) * (u != nullptr ? V::loadu(u + i, k) : V(A(1)));
    return grad * (slope != nullptr ? V::loadu(slope + i, k) : V(scale));
  };
  if constexpr (std::is_same_v<T, A>) {
    for_vectors<A>(n, [&](int64_t i, int64_t k) { value(i, k).store(out + i, k); });
  } else {
    constexpr int64_t W = V::size();
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
      at::vec::convert_from_float<T>(value(i, W), value(i + W, W)).store(out + i);
    }
    A tail[2 * W];
    for (int64_t j = i; j < n; j += W) {
      const int64_t k = std::min(W, n - j);
      value(j, k).store(tail + (j - i), k);
    }
    for (int64_t j = i; j < n; ++j) out[j] = static_cast<T>(tail[j - i]);
  }
}

// load_row and row_max in one pass: the pass that reads the logits from memory also finds the
// max, so the compute overlaps the memory stalls (fp16/bf16 rows with unit stride; other rows
// convert, then take the max from the buffer).
template <typename T, typename A>
A load_row_max(const void* base, int64_t stride, int64_t n, A* out) {
  if constexpr (at::vec::is_reduced_floating_point_v<T> && std::is_same_v<A, float>) {
    if (stride == 1) {
      using V = Vectorized<float>;
      constexpr int64_t W = V::size();
      const T* in = static_cast<const T*>(base);
      V best(-std::numeric_limits<float>::infinity());
      int64_t i = 0;
      for (; i + 2 * W <= n; i += 2 * W) {
        auto [low, high] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(in + i));
        low.store(out + i);
        high.store(out + i + W);
        best = at::vec::maximum(best, at::vec::maximum(low, high));
      }
      for (int64_t j = i; j < n; ++j) out[j] = static_cast<float>(in[j]);
      const float tail = i < n ? row_max(out + i, n - i) : -std::numeric_limits<float>::infinity();
      const float head_max = at::vec::vec_reduce_all<float>(
          [](V& a, V& b) { return at::vec::maximum(a, b); }, best);
      return std::isnan(head_max) || std::isnan(tail) ? std::numeric_limits<float>::quiet_NaN()
                                                      : std::max(head_max, tail);
    }
  }
  load_row<T, A>(base, stride, n, out);
  return row_max(out, n);
}

template <typename A>
LoadRowMax<A> row_max_loader(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return &load_row_max<float, A>;
    case at::kDouble: return &load_row_max<double, A>;
    case at::kHalf: return &load_row_max<c10::Half, A>;
    case at::kBFloat16: return &load_row_max<c10::BFloat16, A>;
    default: TORCH_CHECK(false, "fused_ce native: unsupported floating dtype ", dtype);
  }
}

// The gradient row written from e: in A (in place or into the buffer, then converted by
// store_grad) or, for a unit-stride fp16/bf16 output with A float, rounded straight from the
// vectors. The target class's entry grad_y is written last, over the pass's value.
template <typename A>
void write_gradient(const CEArgs<A>& a, A* e, bool e_in_place, char* grad_row, int64_t C,
                    A p_mul, A coef_p, A coef_u, bool linear, const A* u, const A* slope,
                    int64_t y, bool write_y, A grad_y) {
  if constexpr (std::is_same_v<A, float>) {
    if (!e_in_place && a.gc == 1 &&
        (a.grad_dtype == at::kBFloat16 || a.grad_dtype == at::kHalf)) {
      auto direct = [&](auto* out) {
        using T = std::remove_pointer_t<decltype(out)>;
        gradient_pass(e, C, p_mul, coef_p, coef_u, linear, u, slope, a.scale, out);
        if (write_y) out[y] = static_cast<T>(grad_y);
      };
      if (a.grad_dtype == at::kBFloat16) {
        direct(reinterpret_cast<c10::BFloat16*>(grad_row));
      } else {
        direct(reinterpret_cast<c10::Half*>(grad_row));
      }
      return;
    }
  }
  gradient_pass(e, C, p_mul, coef_p, coef_u, linear, u, slope, a.scale, e);
  if (write_y) e[y] = grad_y;
  if (!e_in_place) a.store_grad(e, grad_row, a.gc, C);
}

template <typename A>
void ce_rows(const CEArgs<A>& a, Mode mode, int64_t begin, int64_t end) {
  const int64_t C = a.n_classes;
  const bool grad = mode != Mode::kForward;
  const bool linear = a.prob || a.eps > A(0);
  // fp32 logits (fp64 with fp64 accumulation) with unit class stride and nothing to apply
  // are read where they are; the target gradient of probability targets needs z after the
  // logits' own gradient may have overwritten them (inplace_backward), so it keeps a copy.
  const bool plain_logits = a.scale == A(1) && a.cap <= A(0);
  const bool z_in_place = a.logits_in_acc && a.lc == 1 && plain_logits &&
                          !(a.prob && a.grad_target != nullptr);
  // The gradient is built in its output row (the exp pass writes e there, the gradient pass
  // rewrites it) when that row is in A with unit stride: no pass through a buffer and no
  // conversion pass. When it aliases the logits (inplace_backward) each element is read before
  // it is written, and z_y is taken before the exp pass.
  const bool e_in_place = grad && a.grad_logits != nullptr && a.grad_in_acc && a.gc == 1;
  A* z_buffer = z_in_place ? nullptr : scratch<A>(0, C);
  A* e_buffer = e_in_place ? nullptr : scratch<A>(1, C);
  A* u = scratch<A>(2, C);
  A* slope = (grad && a.cap > A(0)) ? scratch<A>(3, C) : nullptr;
  const A nan = std::numeric_limits<A>::quiet_NaN();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t outer = row / a.n_inner, inner = row % a.n_inner;
    const char* logits_row = a.logits + a.logits_size * (outer * a.lo + inner * a.li);
    const A* z;
    A max_value = A(0);  // the forward's row max, found by the pass that reads the row
    if (z_in_place) {
      z = reinterpret_cast<const A*>(logits_row);
      if (mode != Mode::kBackward) max_value = row_max(z, C);
    } else {
      if (plain_logits && mode != Mode::kBackward) {
        max_value = a.load_logits_max(logits_row, a.lc, C, z_buffer);
      } else {
        a.load_logits(logits_row, a.lc, C, z_buffer);
        final_logits(z_buffer, slope, C, a.scale, a.cap);
        if (mode != Mode::kBackward) max_value = row_max(z_buffer, C);
      }
      z = z_buffer;
    }
    char* grad_row = a.grad_logits != nullptr
        ? a.grad_logits + a.grad_size * (outer * a.go + inner * a.gi)
        : nullptr;
    A* e = e_in_place ? reinterpret_cast<A*>(grad_row) : e_buffer;

    int64_t y = 0;
    bool valid = true;
    const A* u_row = nullptr;  // null: ones
    if (a.prob) {
      a.load_target(a.target + a.target_size * (outer * a.to + inner * a.ti), a.tc, C, u);
      // u = ((1 - eps) t + eps / C) * w
      using V = Vectorized<A>;
      const A keep = A(1) - a.eps, spread = C > 0 ? a.eps / A(C) : A(0);
      for_vectors<A>(C, [&](int64_t i, int64_t k) {
        V t = V::loadu(u + i, k) * V(keep) + V(spread);
        if (a.weight != nullptr) t = t * V::loadu(a.weight + i, k);
        t.store(u + i, k);
      });
      u_row = u;
    } else {
      const char* t = a.target + a.target_size * (outer * a.to + inner * a.ti);
      // uint8 targets compare as their unsigned value (255 is not -1).
      y = a.target_uint8 ? static_cast<int64_t>(*reinterpret_cast<const uint8_t*>(t))
                         : *reinterpret_cast<const int64_t*>(t);
      valid = y != a.ignore_index && y >= 0 && y < C;
      u_row = a.weight;
    }

    A m, log_s, lin_sum, g, g_lse, p_mul;
    if (mode == Mode::kBackward) {
      m = a.saved[row];
      log_s = a.saved[a.saved_stride + row];
      lin_sum = a.saved[2 * a.saved_stride + row];
      g = a.grad_loss[row * a.grad_loss_stride];
      g_lse = a.grad_lse != nullptr ? a.grad_lse[row * a.grad_lse_stride] : A(0);
    } else {
      if (a.stats) a.argmax[row] = row_argmax(z, C);
      const A ref = std::isfinite(max_value) ? max_value : A(0);
      const A z_y = valid && !a.prob ? z[y] : A(0);
      RowSums sums = exp_pass(z, C, ref, grad ? e : nullptr, a.stats, linear, u_row);
      // A NaN or +inf logit makes the row NaN, as in torch (the fast exp clamps instead).
      A sum_exp = (std::isnan(max_value) || max_value == std::numeric_limits<A>::infinity())
          ? nan
          : A(sums.sum_exp);
      m = ref;
      log_s = std::log(sum_exp);
      lin_sum = linear ? A(sums.lin_sum) : A(0);
      const A smooth = lin_sum * log_s - A(sums.lin_dot);
      A loss;
      if (a.prob) {
        loss = smooth;
      } else if (valid) {
        A nll = log_s + (ref - z_y);
        if (a.weight != nullptr) nll *= a.weight[y];
        loss = a.eps > A(0) ? (A(1) - a.eps) * nll + (a.eps / A(C)) * smooth : nll;
      } else {
        loss = A(0);
      }
      const A lse = ref + log_s;
      a.loss[row] = loss;
      a.lse[row] = lse;
      a.saved[row] = ref;
      a.saved[a.saved_stride + row] = log_s;
      a.saved[2 * a.saved_stride + row] = lin_sum;
      if (a.stats) a.entropy[row] = log_s - A(sums.exp_dot) / sum_exp;
      if (!grad) continue;
      g = a.grad_scale;
      // In the order of the backward's torch_impl.z_loss_grad_lse, for the same bits.
      g_lse = (valid && a.z_loss != A(0)) ? (A(2) * a.z_loss) * a.grad_scale * lse : A(0);
    }
    // p = e * exp(-log_s) on both paths (not e / s: the backward has only log_s), so the
    // gradient made in the forward equals the backward's bit for bit.
    p_mul = std::exp(-log_s);

    if (a.grad_logits != nullptr) {
      // Per-row coefficients; where(), not a product with v, so that an infinite g (an
      // all-ignored 'mean') leaves an ignored row's gradient exactly 0.
      A coef_p, coef_u, coef_y = A(0);
      if (a.prob) {
        coef_p = g * lin_sum;
        coef_u = g;
      } else {
        coef_y = valid ? (A(1) - a.eps) * g * (a.weight != nullptr ? a.weight[y] : A(1)) : A(0);
        coef_u = (valid && a.eps > A(0)) ? (a.eps / A(C)) * g : A(0);
        coef_p = coef_y + coef_u * lin_sum;
      }
      coef_p += g_lse;
      if (std::isnan(log_s)) coef_p = nan;  // the fast exp would not propagate it
      if (mode == Mode::kBackward) exp_row(z, C, m, e);
      // The target class: p_y * coef_p - coef_y in one scalar step, so p - 1 near p = 1 keeps
      // the precision of p (computed before the pass below overwrites e).
      A grad_y = A(0);
      if (coef_y != A(0)) {
        A value = e[y] * p_mul * coef_p - coef_y;
        if (linear) value -= coef_u * (u_row != nullptr ? u_row[y] : A(1));
        grad_y = value * (slope != nullptr ? slope[y] : a.scale);
      }
      write_gradient(a, e, e_in_place, grad_row, C, p_mul, coef_p, coef_u, linear, u_row, slope,
                     y, coef_y != A(0), grad_y);
    }
    if (a.prob && a.grad_target != nullptr) {
      // d loss / d t_c = g (1 - eps) w_c (log_s - (z_c - m)), into the u buffer (now unused).
      using V = Vectorized<A>;
      const A coef_t = g * (A(1) - a.eps);
      for_vectors<A>(C, [&](int64_t i, int64_t k) {
        V value = V(coef_t) * (V(log_s) - (V::loadu(z + i, k) - V(m)));
        if (a.weight != nullptr) value = value * V::loadu(a.weight + i, k);
        value.store(u + i, k);
      });
      a.store_grad_target(
          u, a.grad_target + a.grad_target_size * (outer * a.gto + inner * a.gti), a.gtc, C);
    }
  }
}

// The small-C layout: rows across the lanes of a vector (W = Vectorized<A>::size() rows a
// block), classes along the loop, so a row of a few classes no longer costs four partial
// vectors and four horizontal reductions. The same math as ce_rows, lane by lane: every
// per-row scalar of ce_rows is a vector here, every branch a blend; the target class's
// gradient is formed in the same order ((p coef_p - coef_y) - coef_u u) * slope. Per block:
// gather the logits (and probability targets) into [C][W] buffers, then max, exp and sums,
// per-row outputs, gradient, scatter.
template <typename A>
void ce_blocks(const CEArgs<A>& a, Mode mode, int64_t begin, int64_t end) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const int64_t C = a.n_classes;
  const bool grad = mode != Mode::kForward;
  const bool linear = a.prob || a.eps > A(0);
  A* z = scratch<A>(0, C * W);
  A* e = scratch<A>(1, C * W);
  A* u = a.prob ? scratch<A>(2, C * W) : nullptr;
  A* slope = (grad && a.cap > A(0)) ? scratch<A>(3, C * W) : nullptr;
  const V zero(A(0)), one(A(1)), nan(std::numeric_limits<A>::quiet_NaN());
  const V inf(std::numeric_limits<A>::infinity());
  int64_t logits_at[W], target_at[W], grad_at[W], grad_target_at[W];
  A lane[W];
  for (int64_t first = begin; first < end; first += W) {
    const int64_t count = std::min<int64_t>(W, end - first);
    for (int64_t l = 0; l < count; ++l) {
      const int64_t outer = (first + l) / a.n_inner, inner = (first + l) % a.n_inner;
      logits_at[l] = outer * a.lo + inner * a.li;
      target_at[l] = outer * a.to + inner * a.ti;
      grad_at[l] = outer * a.go + inner * a.gi;
      grad_target_at[l] = outer * a.gto + inner * a.gti;
    }
    // Rows evenly spaced in memory (all of them when n_inner is 1, else within one outer
    // index) let the block moves use the fast transposes of load_block / store_block.
    const bool one_outer = a.n_inner == 1 || first / a.n_inner == (first + count - 1) / a.n_inner;
    auto lane_step = [&](int64_t outer_stride, int64_t inner_stride) -> int64_t {
      return a.n_inner == 1 ? outer_stride : (one_outer ? inner_stride : 0);
    };
    a.load_logits_block(a.logits, logits_at, count, lane_step(a.lo, a.li), W, a.lc, C, z);
    final_logits(z, slope, C * W, a.scale, a.cap);

    // Targets: y as a lane value (-1 where ignored or out of range), or u = ((1 - eps) t +
    // eps / C) w for probability targets.
    V y_lane(A(-1)), valid(zero), w_y(one);
    if (a.prob) {
      a.load_target_block(a.target, target_at, count, lane_step(a.to, a.ti), W, a.tc, C, u);
      const V keep(A(1) - a.eps), spread(C > 0 ? a.eps / A(C) : A(0));
      for (int64_t c = 0; c < C; ++c) {
        V t = V::loadu(u + c * W) * keep + spread;
        if (a.weight != nullptr) t = t * V(a.weight[c]);
        t.store(u + c * W);
      }
      valid = zero == zero;  // every lane
    } else {
      A valid_lane[W] = {}, y_value[W], w_value[W];
      for (int64_t l = 0; l < W; ++l) {
        y_value[l] = A(-1);
        w_value[l] = A(1);
      }
      for (int64_t l = 0; l < count; ++l) {
        const char* t = a.target + a.target_size * target_at[l];
        const int64_t index = a.target_uint8
            ? static_cast<int64_t>(*reinterpret_cast<const uint8_t*>(t))
            : *reinterpret_cast<const int64_t*>(t);
        if (index != a.ignore_index && index >= 0 && index < C) {
          y_value[l] = A(index);
          valid_lane[l] = A(1);
          if (a.weight != nullptr) w_value[l] = a.weight[index];
        }
      }
      y_lane = V::loadu(y_value);
      valid = V::loadu(valid_lane) == one;
      w_y = V::loadu(w_value);
    }
    // u_c as a vector: the probability targets' row, the weight, or ones.
    auto u_at = [&](int64_t c) {
      return a.prob ? V::loadu(u + c * W) : (a.weight != nullptr ? V(a.weight[c]) : one);
    };

    V m, log_s, lin_sum, g, g_lse;
    V z_y = zero;
    if (mode == Mode::kBackward) {
      for (int64_t l = 0; l < W; ++l) {
        lane[l] = l < count ? a.grad_loss[(first + l) * a.grad_loss_stride] : A(0);
      }
      g = V::loadu(lane);
      for (int64_t l = 0; l < W; ++l) {
        lane[l] = (a.grad_lse != nullptr && l < count)
            ? a.grad_lse[(first + l) * a.grad_lse_stride]
            : A(0);
      }
      g_lse = V::loadu(lane);
      m = V::loadu(a.saved + first, count);
      log_s = V::loadu(a.saved + a.saved_stride + first, count);
      lin_sum = V::loadu(a.saved + 2 * a.saved_stride + first, count);
    } else {
      V max_value(-std::numeric_limits<A>::infinity());
      V best_index = zero;
      for (int64_t c = 0; c < C; ++c) {
        const V zc = V::loadu(z + c * W);
        if (a.stats) {
          // torch.argmax: the first maximum, a NaN counting as the maximum.
          const V take = (zc > max_value) | (zc.isnan() & (max_value == max_value));
          best_index = V::blendv(best_index, V(A(c)), take);
        }
        max_value = at::vec::maximum(max_value, zc);
      }
      const V finite = (max_value - max_value) == zero;
      const V ref = V::blendv(zero, max_value, finite);
      V sum_exp = zero, exp_dot = zero, lin_dot = zero;
      lin_sum = zero;
      for (int64_t c = 0; c < C; ++c) {
        const V zc = V::loadu(z + c * W);
        const V d = zc - ref;
        const V ec = exp_nonpositive(d);
        if (grad) ec.store(e + c * W);
        sum_exp += ec;
        if (a.stats) exp_dot += V::blendv(zero, ec * d, ec > zero);
        if (linear) {
          const V uc = u_at(c);
          lin_sum += uc;
          lin_dot += uc * d;
        }
        if (!a.prob) z_y = V::blendv(z_y, zc, y_lane == V(A(c)));
      }
      // A NaN or +inf logit makes the row NaN, as in torch (the fast exp clamps instead).
      sum_exp = V::blendv(sum_exp, nan, max_value.isnan() | (max_value == inf));
      m = ref;
      log_s = sum_exp.log();
      if (!linear) lin_sum = zero;
      const V smooth = lin_sum * log_s - lin_dot;
      V loss;
      if (a.prob) {
        loss = smooth;
      } else {
        V nll = log_s + (ref - z_y);
        if (a.weight != nullptr) nll = nll * w_y;
        if (a.eps > A(0)) nll = V(A(1) - a.eps) * nll + V(a.eps / A(C)) * smooth;
        loss = V::blendv(zero, nll, valid);
      }
      const V lse = ref + log_s;
      loss.store(a.loss + first, count);
      lse.store(a.lse + first, count);
      ref.store(a.saved + first, count);
      log_s.store(a.saved + a.saved_stride + first, count);
      lin_sum.store(a.saved + 2 * a.saved_stride + first, count);
      if (a.stats) {
        (log_s - exp_dot / sum_exp).store(a.entropy + first, count);
        best_index.store(lane);
        for (int64_t l = 0; l < count; ++l) a.argmax[first + l] = static_cast<int64_t>(lane[l]);
      }
      if (!grad) continue;
      g = V(a.grad_scale);
      // In the order of the backward's torch_impl.z_loss_grad_lse, for the same bits.
      g_lse = a.z_loss != A(0)
          ? V::blendv(zero, V((A(2) * a.z_loss) * a.grad_scale) * lse, valid)
          : zero;
    }
    // p = e * exp(-log_s) on both paths, as in ce_rows.
    const V p_mul = (zero - log_s).exp();

    if (a.grad_logits != nullptr) {
      V coef_p, coef_u, coef_y = zero;
      if (a.prob) {
        coef_p = g * lin_sum;
        coef_u = g;
      } else {
        coef_y = V::blendv(zero, V(A(1) - a.eps) * g * w_y, valid);
        coef_u = a.eps > A(0) ? V::blendv(zero, V(a.eps / A(C)) * g, valid) : zero;
        coef_p = coef_y + coef_u * lin_sum;
      }
      coef_p = V::blendv(coef_p + g_lse, nan, log_s.isnan());
      for (int64_t c = 0; c < C; ++c) {
        const V ec = mode == Mode::kBackward ? exp_nonpositive(V::loadu(z + c * W) - m)
                                             : V::loadu(e + c * W);
        V value = ec * p_mul * coef_p;
        if (!a.prob) value = value - V::blendv(zero, coef_y, y_lane == V(A(c)));
        if (linear) value = value - coef_u * u_at(c);
        value = value * (slope != nullptr ? V::loadu(slope + c * W) : V(a.scale));
        value.store(e + c * W);
      }
      a.store_grad_block(e, a.grad_logits, grad_at, count, lane_step(a.go, a.gi), W, a.gc, C);
    }
    if (a.prob && a.grad_target != nullptr) {
      const V coef_t = g * V(A(1) - a.eps);
      for (int64_t c = 0; c < C; ++c) {
        V value = coef_t * (log_s - (V::loadu(z + c * W) - m));
        if (a.weight != nullptr) value = value * V(a.weight[c]);
        value.store(u + c * W);
      }
      a.store_grad_target_block(u, a.grad_target, grad_target_at, count,
                                lane_step(a.gto, a.gti), W, a.gtc, C);
    }
  }
}

at::ScalarType accumulation(const at::Tensor& logits, const at::Tensor& target) {
  return (logits.scalar_type() == at::kDouble || target.scalar_type() == at::kDouble)
      ? at::kDouble
      : at::kFloat;
}

void check_row_output(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(t.is_contiguous() && t.numel() == n && t.scalar_type() == dtype,
              "fused_ce native: ", name, " must be a contiguous ", dtype, " tensor of ", n,
              " elements, got ", t.sizes(), " ", t.scalar_type());
}

template <typename A>
CEArgs<A> common_args(const at::Tensor& logits, const at::Tensor& target,
                      const std::optional<at::Tensor>& weight, at::Tensor& weight_acc,
                      int64_t ignore_index, double eps, double scale, double cap) {
  TORCH_CHECK(logits.dim() == 3, "fused_ce native: logits must be (n_outer, C, n_inner)");
  CEArgs<A> a{};
  a.n_classes = logits.size(1);
  a.n_inner = logits.size(2);
  a.n_rows = logits.size(0) * a.n_inner;
  a.logits = static_cast<const char*>(logits.const_data_ptr());
  a.logits_size = logits.element_size();
  a.lo = logits.stride(0);
  a.lc = logits.stride(1);
  a.li = logits.stride(2);
  a.load_logits = row_loader<A>(logits.scalar_type());
  a.load_logits_block = block_loader<A>(logits.scalar_type());
  a.load_logits_max = row_max_loader<A>(logits.scalar_type());
  a.logits_in_acc = logits.scalar_type() == c10::CppTypeToScalarType<A>::value;
  a.prob = target.is_floating_point();
  a.target = static_cast<const char*>(target.const_data_ptr());
  a.target_size = target.element_size();
  if (a.prob) {
    TORCH_CHECK(target.dim() == 3 && target.sizes() == logits.sizes(),
                "fused_ce native: probability targets must have the logits' shape");
    a.to = target.stride(0);
    a.tc = target.stride(1);
    a.ti = target.stride(2);
    a.load_target = row_loader<A>(target.scalar_type());
    a.load_target_block = block_loader<A>(target.scalar_type());
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte,
                "fused_ce native: class-index targets must be int64 or uint8");
    TORCH_CHECK(target.dim() == 2 && target.size(0) == logits.size(0) &&
                    target.size(1) == a.n_inner,
                "fused_ce native: class-index targets must be (n_outer, n_inner)");
    a.target_uint8 = target.scalar_type() == at::kByte;
    a.to = target.stride(0);
    a.ti = target.stride(1);
  }
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == a.n_classes,
                "fused_ce native: weight must be (C,)");
    weight_acc = weight->to(c10::CppTypeToScalarType<A>::value).contiguous();
    a.weight = weight_acc.const_data_ptr<A>();
  }
  a.ignore_index = ignore_index;
  a.eps = static_cast<A>(eps);
  a.scale = static_cast<A>(scale);
  a.cap = static_cast<A>(cap);
  return a;
}

// Gradient outputs; grad_logits may be absent (only the target's gradient wanted).
template <typename A>
void set_grad_outputs(CEArgs<A>& a, const at::Tensor& logits,
                      const std::optional<at::Tensor>& grad_logits,
                      const std::optional<at::Tensor>& grad_target) {
  if (grad_logits.has_value()) {
    TORCH_CHECK(grad_logits->sizes() == logits.sizes() &&
                    grad_logits->scalar_type() == logits.scalar_type(),
                "fused_ce native: grad_logits must have the logits' shape and dtype");
    a.grad_logits = static_cast<char*>(grad_logits->data_ptr());
    a.grad_size = grad_logits->element_size();
    a.go = grad_logits->stride(0);
    a.gc = grad_logits->stride(1);
    a.gi = grad_logits->stride(2);
    a.store_grad = row_storer<A>(grad_logits->scalar_type());
    a.store_grad_block = block_storer<A>(grad_logits->scalar_type());
    a.grad_dtype = grad_logits->scalar_type();
    a.grad_in_acc = grad_logits->scalar_type() == c10::CppTypeToScalarType<A>::value;
    prefer_huge_pages(*grad_logits);
  }
  if (grad_target.has_value() && a.prob) {
    TORCH_CHECK(grad_target->sizes() == logits.sizes(),
                "fused_ce native: grad_target must have the target's shape");
    a.grad_target = static_cast<char*>(grad_target->data_ptr());
    a.grad_target_size = grad_target->element_size();
    a.gto = grad_target->stride(0);
    a.gtc = grad_target->stride(1);
    a.gti = grad_target->stride(2);
    a.store_grad_target = row_storer<A>(grad_target->scalar_type());
    a.store_grad_target_block = block_storer<A>(grad_target->scalar_type());
    prefer_huge_pages(*grad_target);
  }
}

// Rows of at most this many classes run in the small-C layout (ce_blocks). Both directions
// choose by C alone, so the backward recomputes exactly what the forward's gradient made.
constexpr int64_t kBlockMaxClasses = 64;

template <typename A>
void run(const CEArgs<A>& a, Mode mode) {
  if (a.n_rows == 0) return;
  if (a.n_classes <= kBlockMaxClasses) {
    // Grains of whole blocks, so a split across threads leaves at most one partial block.
    constexpr int64_t W = Vectorized<A>::size();
    const int64_t grain = (row_grain(a.n_classes) + W - 1) / W * W;
    at::parallel_for(0, a.n_rows, grain, [&](int64_t begin, int64_t end) {
      ce_blocks<A>(a, mode, begin, end);
    });
    return;
  }
  at::parallel_for(0, a.n_rows, row_grain(a.n_classes), [&](int64_t begin, int64_t end) {
    ce_rows<A>(a, mode, begin, end);
  });
}

template <typename A>
void forward_impl(const at::Tensor& logits, const at::Tensor& target,
                  const std::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
                  double scale, double cap, const at::Tensor& loss, const at::Tensor& lse,
                  const at::Tensor& saved, const at::Tensor& entropy, const at::Tensor& argmax,
                  const std::optional<at::Tensor>& grad_scale, double z_loss,
                  const std::optional<at::Tensor>& grad_logits,
                  const std::optional<at::Tensor>& grad_target) {
  at::Tensor weight_acc;
  CEArgs<A> a = common_args<A>(logits, target, weight, weight_acc, ignore_index, eps, scale, cap);
  const at::ScalarType acc = c10::CppTypeToScalarType<A>::value;
  check_row_output(loss, "loss", a.n_rows, acc);
  check_row_output(lse, "lse", a.n_rows, acc);
  TORCH_CHECK(saved.dim() == 2 && saved.size(0) == 3 && saved.size(1) == a.n_rows &&
                  saved.stride(1) == 1 && saved.scalar_type() == acc,
              "fused_ce native: saved must be (3, n_rows) with unit row stride");
  a.loss = loss.data_ptr<A>();
  a.lse = lse.data_ptr<A>();
  a.saved = saved.data_ptr<A>();
  a.saved_stride = saved.stride(0);
  a.stats = entropy.numel() > 0;
  if (a.stats) {
    check_row_output(entropy, "entropy", a.n_rows, acc);
    check_row_output(argmax, "argmax", a.n_rows, at::kLong);
    a.entropy = entropy.data_ptr<A>();
    a.argmax = argmax.data_ptr<int64_t>();
  }
  Mode mode = Mode::kForward;
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->numel() == 1 && grad_scale->scalar_type() == acc,
                "fused_ce native: grad_scale must be a 0-d tensor of the accumulation dtype");
    TORCH_CHECK(grad_logits.has_value() || grad_target.has_value(),
                "fused_ce native: grad_scale needs grad_logits or grad_target");
    a.grad_scale = *grad_scale->const_data_ptr<A>();
    a.z_loss = static_cast<A>(z_loss);
    set_grad_outputs(a, logits, grad_logits, grad_target);
    mode = Mode::kForwardGrad;
  }
  run(a, mode);
}

void ce_forward(const at::Tensor& logits, const at::Tensor& target,
                const std::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
                double scale, double cap, const at::Tensor& loss, const at::Tensor& lse,
                const at::Tensor& saved, const at::Tensor& entropy, const at::Tensor& argmax,
                const std::optional<at::Tensor>& grad_scale, double z_loss,
                const std::optional<at::Tensor>& grad_logits,
                const std::optional<at::Tensor>& grad_target) {
  if (accumulation(logits, target) == at::kDouble) {
    forward_impl<double>(logits, target, weight, ignore_index, eps, scale, cap, loss, lse,
                         saved, entropy, argmax, grad_scale, z_loss, grad_logits, grad_target);
  } else {
    forward_impl<float>(logits, target, weight, ignore_index, eps, scale, cap, loss, lse, saved,
                        entropy, argmax, grad_scale, z_loss, grad_logits, grad_target);
  }
}

template <typename A>
void backward_impl(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                   const at::Tensor& logits, const at::Tensor& target,
                   const std::optional<at::Tensor>& weight, const at::Tensor& saved,
                   int64_t ignore_index, double eps, double scale, double cap,
                   const at::Tensor& grad_logits, const std::optional<at::Tensor>& grad_target) {
  at::Tensor weight_acc;
  CEArgs<A> a = common_args<A>(logits, target, weight, weight_acc, ignore_index, eps, scale, cap);
  const at::ScalarType acc = c10::CppTypeToScalarType<A>::value;
  TORCH_CHECK(saved.dim() == 2 && saved.size(0) == 3 && saved.size(1) == a.n_rows &&
                  saved.stride(1) == 1 && saved.scalar_type() == acc,
              "fused_ce native: saved must be (3, n_rows) with unit row stride");
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == a.n_rows &&
                  grad_loss.scalar_type() == acc,
              "fused_ce native: grad_loss must be (n_rows,) in the accumulation dtype");
  a.saved = const_cast<A*>(saved.const_data_ptr<A>());
  a.saved_stride = saved.stride(0);
  a.grad_loss = grad_loss.const_data_ptr<A>();
  a.grad_loss_stride = grad_loss.stride(0);
  if (grad_lse.has_value()) {
    TORCH_CHECK(grad_lse->dim() == 1 && grad_lse->size(0) == a.n_rows &&
                    grad_lse->scalar_type() == acc,
                "fused_ce native: grad_lse must be (n_rows,) in the accumulation dtype");
    a.grad_lse = grad_lse->const_data_ptr<A>();
    a.grad_lse_stride = grad_lse->stride(0);
  }
  set_grad_outputs(a, logits, grad_logits, grad_target);
  run(a, Mode::kBackward);
}

void ce_backward(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                 const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, const at::Tensor& saved,
                 int64_t ignore_index, double eps, double scale, double cap,
                 const at::Tensor& grad_logits, const std::optional<at::Tensor>& grad_target) {
  if (saved.scalar_type() == at::kDouble) {
    backward_impl<double>(grad_loss, grad_lse, logits, target, weight, saved, ignore_index, eps,
                          scale, cap, grad_logits, grad_target);
  } else {
    backward_impl<float>(grad_loss, grad_lse, logits, target, weight, saved, ignore_index, eps,
                         scale, cap, grad_logits, grad_target);
  }
}

}  // namespace
}  // namespace fused_ce_native
