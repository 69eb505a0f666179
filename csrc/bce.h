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

// Elements per block: operands are converted block by block into per-thread buffers.
constexpr int64_t kBlock = 2048;

template <typename A>
struct Operand {
  const char* data = nullptr;
  int64_t size = 0, row_stride = 0, col_stride = 0;
  LoadRow<A> load = nullptr;

  Operand() = default;
  Operand(const std::optional<at::Tensor>& t) {
    if (!t.has_value()) return;
    data = static_cast<const char*>(t->const_data_ptr());
    size = t->element_size();
    row_stride = t->stride(0);
    col_stride = t->stride(1);
    load = row_loader<A>(t->scalar_type());
  }
  bool present() const { return data != nullptr; }
  // n elements of row `row` from column `col` into `out` (a broadcast operand is a fill).
  void get(int64_t row, int64_t col, int64_t n, A* out) const {
    const char* base = data + size * (row * row_stride + col * col_stride);
    if (col_stride == 0) {
      A value;
      load(base, 0, 1, &value);
      std::fill(out, out + n, value);
    } else {
      load(base, col_stride, n, out);
    }
  }
};

template <typename A>
struct Output {
  char* data = nullptr;
  int64_t size = 0;
  StoreRow<A> store = nullptr;

  Output() = default;
  Output(const std::optional<at::Tensor>& t) {
    if (!t.has_value()) return;
    data = static_cast<char*>(t->data_ptr());
    size = t->element_size();
    store = row_storer<A>(t->scalar_type());
  }
  bool present() const { return data != nullptr; }
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
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::min(n_cols, kBlock));
  if (n_blocks > 0) {
    at::parallel_for(0, n_blocks, grain, [&](int64_t begin, int64_t end) {
      A* x = scratch<A>(0, kBlock);
      A* t = scratch<A>(1, kBlock);
      A* w = w_op.present() ? scratch<A>(2, kBlock) : nullptr;
      A* pw = pw_op.present() ? scratch<A>(3, kBlock) : nullptr;
      A* g = g_op.present() ? scratch<A>(4, kBlock) : nullptr;
      A* out_loss = scratch<A>(5, kBlock);
      A* out_gx = scratch<A>(6, kBlock);
      A* out_gt = scratch<A>(7, kBlock);
      for (int64_t block = begin; block < end; ++block) {
        const int64_t row = block / col_blocks, col = (block % col_blocks) * kBlock;
        const int64_t n = std::min(kBlock, n_cols - col);
        x_op.get(row, col, n, x);
        t_op.get(row, col, n, t);
        if (w) w_op.get(row, col, n, w);
        if (pw) pw_op.get(row, col, n, pw);
        if (g) g_op.get(row, col, n, g);
        V sum(A(0));
        const V zero(A(0)), one(A(1));
        constexpr int64_t W = V::size();
        for (int64_t i = 0; i < n; i += W) {
          const int64_t k = std::min(W, n - i);
          const V xv = V::loadu(x + i, k), tv = V::loadu(t + i, k);
          const V e = (zero - xv.abs()).exp();
          // log1p only where the loss or the target gradient needs it (not for dx alone).
          const V l1 = (want_loss || want_gt) ? e.log1p() : zero;
          const V nls = l1 + at::vec::maximum(zero - xv, zero);  // -logsigmoid(x)
          if (want_loss) {
            V c = pw ? (V::loadu(pw + i, k) - one) * tv + one : one;
            V value = (one - tv) * xv + c * nls;
            if (w) value = value * V::loadu(w + i, k);
            value.store(out_loss + i, k);
            sum += k == W ? value : V::set(zero, value, k);
          }
          if (!(want_gx || want_gt)) continue;
          V gw = V::loadu(g + i, k);
          if (w) gw = gw * V::loadu(w + i, k);
          if (want_gx) {
            const V inv = one / (one + e);
            const V positive = xv >= zero;
            const V sig = V::blendv(e * inv, inv, positive);      // sigmoid(x)
            const V sig_neg = V::blendv(inv, e * inv, positive);  // sigmoid(-x)
            const V pt = pw ? V::loadu(pw + i, k) * tv : tv;
            (gw * ((one - tv) * sig - pt * sig_neg)).store(out_gx + i, k);
          }
          if (want_gt) {
            V value;
            if (pw) {
              const V nls_neg = l1 + at::vec::maximum(xv, zero);  // -logsigmoid(-x)
              value = gw * (V::loadu(pw + i, k) * nls - nls_neg);
            } else {
              value = (zero - xv) * gw;
            }
            value.store(out_gt + i, k);
          }
        }
        const int64_t out_offset = row * n_cols + col;
        if (loss_out.present())
          loss_out.store(out_loss, loss_out.data + loss_out.size * out_offset, 1, n);
        if (want_gx) gx_out.store(out_gx, gx_out.data + gx_out.size * out_offset, 1, n);
        if (want_gt) gt_out.store(out_gt, gt_out.data + gt_out.size * out_offset, 1, n);
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
