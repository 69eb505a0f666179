// Sigmoid + binary cross-entropy on the CPU: the math of fused_ce/kernels/bce.py, with torch's
// forms at the edges. Per element (x logit, t target, w weight, pw pos_weight, g upstream
// gradient; e = exp(-|x|) never overflows; nls(x) = -logsigmoid(x) = log1p(e) + max(-x, 0)):
//
//   loss  = w * [(1 - t) x + ((pw - 1) t + 1) nls(x)]
//   dx    = g w [(1 - t) sigmoid(x) - pw t sigmoid(-x)]
//   dt    = g w [pw nls(x) - nls(-x)]     (torch's logsigmoid(-x) - pw logsigmoid(x));
//           g w (-x) without pos_weight
//
// so dt at x = -inf is +inf (no 0 * inf), and dx needs no cancellation near sigmoid = t.
// Cost per element: one exp and one log1p for the loss (the exp shared with the gradients),
// one division for dx; operands are read once and each requested output written once, so a
// forward + backward with a uniform upstream gradient (a 0-d grad) is one pass.
#pragma once

#include "common.h"

namespace fused_ce_native {
namespace {

// Elements per block: a thread takes blocks of this many elements of one row.
constexpr int64_t kBlock = 2048;

// log1p(e) for e = exp(-|x|) in [0, 1]. fp32: e * q(e) with q a degree-9 polynomial fitted to
// log1p(e) / e on [0, 1] (relative error 5e-9 before rounding; at most 1.6e-7, about 1.4 ulp,
// with the fp32 coefficients and Horner steps, measured on 2e5 points), so the loss of a
// confident element (e down to 1e-38) keeps its relative precision. Nine FMAs and no
// division: Sleef's general log1p cost 1.2 ns of the 2.05 ns per element that the loss and
// gradient took together (1 thread, in cache). fp64 keeps Sleef's 1-ulp log1p.
inline Vectorized<float> log1p_unit(const Vectorized<float>& e) {
  using V = Vectorized<float>;
  static constexpr float kCoefficients[] = {
      -0.0032930434681475163f, 0.0200739074498415f,  -0.05738065764307976f,
      0.1064671203494072f,     -0.15331298112869263f, 0.1968497633934021f,
      -0.24955923855304718f,   0.3333013951778412f,  -0.49999910593032837f,
      1.0f};
  V q(kCoefficients[0]);
  for (int i = 1; i < 10; ++i) q = at::vec::fmadd(q, e, V(kCoefficients[i]));
  return q * e;
}
inline Vectorized<double> log1p_unit(const Vectorized<double>& e) { return e.log1p(); }

// exp(a) for a = -|x| in [-inf, 0] or NaN, inlined. Sleef's exp is an out-of-line call, around
// which every live vector register is spilled (all are caller-saved): it cost about as much as
// the rest of the gradient. fp32: a = k ln2 + r with |r| <= ln2/2 (ln2 split in two, as Sleef
// does, so k ln2 is exact), e^r by a degree-6 polynomial fitted for relative error (2e-9), and
// 2^k put in the exponent bits: at most 1.05e-7 relative (0.9 ulp) over [-87.34, 0], measured
// on 4e5 points. Below ln(2^-126) = -87.34 the result would be subnormal and is flushed to 0:
// the loss and gradients there are below 1e-38 (tests/test_native.py holds them to that).
// fp64 keeps Sleef's exp.
inline Vectorized<float> precise_exp_nonpositive(const Vectorized<float>& a) {
  using V = Vectorized<float>;
  static constexpr float kCoefficients[] = {
      0.0013841403415426612f, 0.008374842815101147f, 0.04166814312338829f,
      0.16666419804096222f,   0.49999991059303284f,  1.0f,
      1.0f};
  const V k = (a * V(1.4426950408889634f)).round();
  V r = at::vec::fmadd(k, V(-0.693145751953125f), a);
  r = at::vec::fmadd(k, V(-1.428606765330187e-06f), r);
  V p(kCoefficients[0]);
  for (int i = 1; i < 7; ++i) p = at::vec::fmadd(p, r, V(kCoefficients[i]));
  // 2^k for k in [-126, 0] (clamped: -inf and NaN lanes are replaced below).
  const auto exponent = at::vec::convert_to_int_of_same_size(at::vec::maximum(k, V(-126.0f)));
  const V scale = at::vec::cast<float>(
      (exponent + Vectorized<int32_t>(127)) << Vectorized<int32_t>(23));
  V result = V::blendv(p * scale, V(0.0f), a < V(-87.33654f));
  return V::blendv(result, a, a.isnan());  // NaN stays NaN
}
inline Vectorized<double> precise_exp_nonpositive(const Vectorized<double>& a) { return a.exp(); }

// One operand, 2-D strided. A block of it is read in place when it is already contiguous in
// the accumulation dtype, is one value when broadcast along the row (stride 0: a 0-d upstream
// gradient, a per-row weight), and is converted into a per-thread buffer otherwise.
template <typename A>
struct Operand {
  const char* data = nullptr;
  int64_t size = 0, row_stride = 0, col_stride = 0;
  bool in_place = false;
  LoadRow<A> load = nullptr;

  Operand() = default;
  Operand(const std::optional<at::Tensor>& t) {
    if (!t.has_value()) return;
    data = static_cast<const char*>(t->const_data_ptr());
    size = t->element_size();
    row_stride = t->stride(0);
    col_stride = t->stride(1);
    in_place = col_stride == 1 && t->scalar_type() == c10::CppTypeToScalarType<A>::value;
    load = row_loader<A>(t->scalar_type());
  }
  bool present() const { return data != nullptr; }
  // n elements of row `row` from column `col`: a pointer to them (into the tensor or into
  // `buffer`), or nullptr with `uniform` set when the operand is constant along the row.
  const A* get(int64_t row, int64_t col, int64_t n, A* buffer, A& uniform) const {
    const char* base = data + size * (row * row_stride + col * col_stride);
    if (col_stride == 0) {
      load(base, 0, 1, &uniform);
      return nullptr;
    }
    if (in_place) return reinterpret_cast<const A*>(base);
    load(base, col_stride, n, buffer);
    return buffer;
  }
};

// One contiguous output: written in place when it has the accumulation dtype, else through a
// per-thread buffer and one conversion.
template <typename A>
struct Output {
  char* data = nullptr;
  int64_t size = 0;
  bool in_place = false;
  StoreRow<A> store = nullptr;

  Output() = default;
  Output(const std::optional<at::Tensor>& t) {
    if (!t.has_value()) return;
    data = static_cast<char*>(t->data_ptr());
    size = t->element_size();
    in_place = t->scalar_type() == c10::CppTypeToScalarType<A>::value;
    store = row_storer<A>(t->scalar_type());
  }
  bool present() const { return data != nullptr; }
  A* begin(int64_t offset, A* buffer) const {
    return in_place ? reinterpret_cast<A*>(data) + offset : buffer;
  }
  void finish(int64_t offset, const A* values, int64_t n) const {
    if (!in_place) store(values, data + size * offset, 1, n);
  }
};

template <typename A>
void bce_impl(const at::Tensor& input, const at::Tensor& target,
              const std::optional<at::Tensor>& weight,
              const std::optional<at::Tensor>& pos_weight, const std::optional<at::Tensor>& grad,
              const std::optional<at::Tensor>& loss, const std::optional<at::Tensor>& grad_input,
              const std::optional<at::Tensor>& grad_target,
              const std::optional<at::Tensor>& loss_sum) {
  using V = Vectorized<A>;
  const int64_t n_rows = input.size(0), n_cols = input.size(1);
  const Operand<A> x_op(input), t_op(target), w_op(weight), pw_op(pos_weight), g_op(grad);
  const Output<A> loss_out(loss), gx_out(grad_input), gt_out(grad_target);
  const bool want_loss = loss_out.present() || loss_sum.has_value();
  const bool want_gx = gx_out.present(), want_gt = gt_out.present();
  TORCH_CHECK(!(want_gx || want_gt) || g_op.present(),
              "fused_ce native: gradients need the upstream grad");
  const int64_t col_blocks = (n_cols + kBlock - 1) / kBlock;
  const int64_t n_blocks = n_rows * col_blocks;
  // Per-block partial sums, added in block order afterwards: the same sum for any thread count.
  std::vector<A> partial(loss_sum.has_value() ? n_blocks : 0);
  // Blocks per grain (row_grain: no division by zero for empty rows).
  const int64_t grain = row_grain(std::min(n_cols, kBlock));
  if (n_blocks > 0) {
    at::parallel_for(0, n_blocks, grain, [&](int64_t begin, int64_t end) {
      A* buffers[5];
      for (int slot = 0; slot < 5; ++slot) buffers[slot] = scratch<A>(slot, kBlock);
      A* out_loss_buffer = scratch<A>(5, kBlock);
      A* out_gx_buffer = scratch<A>(6, kBlock);
      A* out_gt_buffer = scratch<A>(7, kBlock);
      for (int64_t block = begin; block < end; ++block) {
        const int64_t row = block / col_blocks, col = (block % col_blocks) * kBlock;
        const int64_t n = std::min(kBlock, n_cols - col);
        A x_u = 0, t_u = 0, w_u = 1, pw_u = 1, g_u = 0;
        const A* x = x_op.get(row, col, n, buffers[0], x_u);
        const A* t = t_op.get(row, col, n, buffers[1], t_u);
        const A* w = w_op.present() ? w_op.get(row, col, n, buffers[2], w_u) : nullptr;
        const A* pw = pw_op.present() ? pw_op.get(row, col, n, buffers[3], pw_u) : nullptr;
        const A* g = g_op.present() ? g_op.get(row, col, n, buffers[4], g_u) : nullptr;
        const int64_t out_offset = row * n_cols + col;
        A* out_loss = loss_out.begin(out_offset, out_loss_buffer);
        A* out_gx = gx_out.begin(out_offset, out_gx_buffer);
        A* out_gt = gt_out.begin(out_offset, out_gt_buffer);
        auto at = [](const A* values, A uniform, int64_t i, int64_t k) {
          return values != nullptr ? V::loadu(values + i, k) : V(uniform);
        };
        V sum(A(0));
        const V zero(A(0)), one(A(1));
        constexpr int64_t W = V::size();
        for (int64_t i = 0; i < n; i += W) {
          const int64_t k = std::min(W, n - i);
          const V xv = at(x, x_u, i, k), tv = at(t, t_u, i, k);
          // A 1-ulp exp, not ATen's fast one: dx is held to one rounding of the fp32
          // reference (the fast exp's 20 ulp show up in sigmoid directly).
          const V e = precise_exp_nonpositive(zero - xv.abs());
          // log1p only where the loss or the target gradient needs it (not for dx alone).
          const V l1 = (want_loss || want_gt) ? log1p_unit(e) : zero;
          const V nls = l1 + at::vec::maximum(zero - xv, zero);  // -logsigmoid(x)
          const V pwv = at(pw, pw_u, i, k), wv = at(w, w_u, i, k);
          if (want_loss) {
            V value = (one - tv) * xv + ((pwv - one) * tv + one) * nls;
            value = value * wv;
            value.store(out_loss + i, k);
            sum += k == W ? value : V::set(zero, value, k);
          }
          if (!(want_gx || want_gt)) continue;
          const V gw = at(g, g_u, i, k) * wv;
          if (want_gx) {
            const V inv = one / (one + e);
            const V positive = xv >= zero;
            const V sig = V::blendv(e * inv, inv, positive);      // sigmoid(x)
            const V sig_neg = V::blendv(inv, e * inv, positive);  // sigmoid(-x)
            (gw * ((one - tv) * sig - pwv * tv * sig_neg)).store(out_gx + i, k);
          }
          if (want_gt) {
            V value;
            if (pw_op.present()) {
              const V nls_neg = l1 + at::vec::maximum(xv, zero);  // -logsigmoid(-x)
              value = gw * (pwv * nls - nls_neg);
            } else {
              value = (zero - xv) * gw;
            }
            value.store(out_gt + i, k);
          }
        }
        if (loss_out.present()) loss_out.finish(out_offset, out_loss, n);
        if (want_gx) gx_out.finish(out_offset, out_gx, n);
        if (want_gt) gt_out.finish(out_offset, out_gt, n);
        if (!partial.empty()) partial[block] = reduce_sum(sum);
      }
    });
  }
  if (loss_sum.has_value()) {
    A total = A(0);
    for (A value : partial) total += value;
    *loss_sum->data_ptr<A>() = total;
  }
}

void bce(const at::Tensor& input, const at::Tensor& target,
         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
         const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& loss,
         const std::optional<at::Tensor>& grad_input,
         const std::optional<at::Tensor>& grad_target,
         const std::optional<at::Tensor>& loss_sum) {
  TORCH_CHECK(input.dim() == 2 && target.sizes() == input.sizes(),
              "fused_ce native: bce takes 2-D (rows, cols) input and target of one shape");
  for (const auto* t : {&weight, &pos_weight, &grad}) {
    TORCH_CHECK(!t->has_value() || (*t)->sizes() == input.sizes(),
                "fused_ce native: bce operands must be (rows, cols) views (stride 0 to broadcast)");
  }
  for (const auto* t : {&loss, &grad_input, &grad_target}) {
    TORCH_CHECK(!t->has_value() || ((*t)->is_contiguous() && (*t)->numel() == input.numel()),
                "fused_ce native: bce outputs must be contiguous with the input's size");
  }
  const bool fp64 = input.scalar_type() == at::kDouble || target.scalar_type() == at::kDouble;
  if (loss_sum.has_value()) {
    TORCH_CHECK(loss_sum->numel() == 1 &&
                    loss_sum->scalar_type() == (fp64 ? at::kDouble : at::kFloat),
                "fused_ce native: loss_sum must be one element of the accumulation dtype");
  }
  if (fp64) {
    bce_impl<double>(input, target, weight, pos_weight, grad, loss, grad_input, grad_target,
                     loss_sum);
  } else {
    bce_impl<float>(input, target, weight, pos_weight, grad, loss, grad_input, grad_target,
                    loss_sum);
  }
}

}  // namespace
}  // namespace fused_ce_native
