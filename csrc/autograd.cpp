// The eager entry of the native backend for 'mean'/'sum' losses: one op per loss whose
// autograd lives here, in C++, so a forward + backward from Python is one dispatcher call, one
// C++ autograd node and the kernels (no Python autograd.Function, no Python backward).
//
// Built once into its own library (_C_autograd), not once per CPU capability: it holds no
// vector code, and calls the kernels of whichever capability library is loaded through their
// ops (fused_ce_native::ce_forward, ce_backward, bce), dispatched straight to the CPU kernel.
//
// Same math and same bits as the Python scalar path (fused_ce/ops/_scalar.py, which serves
// torch.compile and the other backends): the forward makes the loss and, for the inputs that
// need it, the gradient for an upstream gradient of 1 in the same sweep over the operands; the
// first backward hands those buffers out (rewritten in place from the operands when the
// upstream gradient is not 1: one rounding, as torch's own backward), and any later backward
// of a retained graph writes new buffers, so a gradient once handed out never changes.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <vector>

namespace fused_ce_native {
namespace {

// --- the kernels, through their ops (schemas in library.cpp) ---------------------------------

using OptionalTensor = std::optional<at::Tensor>;
const c10::DispatchKeySet kCPU(c10::DispatchKey::CPU);

template <typename Signature>
c10::TypedOperatorHandle<Signature> kernel(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

void ce_forward(const at::Tensor& logits, const at::Tensor& target, const OptionalTensor& weight,
                int64_t ignore_index, double eps, double scale, double cap,
                const at::Tensor& loss, const at::Tensor& lse, const at::Tensor& saved,
                const at::Tensor& entropy, const at::Tensor& argmax,
                const OptionalTensor& grad_scale, double z_loss,
                const OptionalTensor& grad_logits, const OptionalTensor& grad_target) {
  static const auto op = kernel<void(
      const at::Tensor&, const at::Tensor&, const OptionalTensor&, int64_t, double, double,
      double, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const OptionalTensor&, double, const OptionalTensor&,
      const OptionalTensor&)>("fused_ce_native::ce_forward");
  op.redispatch(kCPU, logits, target, weight, ignore_index, eps, scale, cap, loss, lse, saved,
                entropy, argmax, grad_scale, z_loss, grad_logits, grad_target);
}

void ce_backward(const at::Tensor& grad_loss, const OptionalTensor& grad_lse,
                 const at::Tensor& logits, const at::Tensor& target,
                 const OptionalTensor& weight, const at::Tensor& saved, int64_t ignore_index,
                 double eps, double scale, double cap, const at::Tensor& grad_logits,
                 const OptionalTensor& grad_target) {
  static const auto op = kernel<void(
      const at::Tensor&, const OptionalTensor&, const at::Tensor&, const at::Tensor&,
      const OptionalTensor&, const at::Tensor&, int64_t, double, double, double,
      const at::Tensor&, const OptionalTensor&)>("fused_ce_native::ce_backward");
  op.redispatch(kCPU, grad_loss, grad_lse, logits, target, weight, saved, ignore_index, eps,
                scale, cap, grad_logits, grad_target);
}

void bce(const at::Tensor& input, const at::Tensor& target, const OptionalTensor& weight,
         const OptionalTensor& pos_weight, const OptionalTensor& grad, const OptionalTensor& loss,
         const OptionalTensor& grad_input, const OptionalTensor& grad_target,
         const OptionalTensor& loss_sum) {
  static const auto op = kernel<void(
      const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
      const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
      const OptionalTensor&, const OptionalTensor&)>("fused_ce_native::bce");
  op.redispatch(kCPU, input, target, weight, pos_weight, grad, loss, grad_input, grad_target,
                loss_sum);
}

// A new contiguous tensor like `like`, in 2 MiB pages when large (csrc/memory.h): the
// gradients, whose 4 KiB page faults on first touch cost more than the kernel filling them.
at::Tensor empty_output(const at::Tensor& like) {
  static const auto op =
      kernel<at::Tensor(const at::Tensor&)>("fused_ce_native::empty_output");
  return op.redispatch(kCPU, like);
}

at::ScalarType accumulation(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble
                                                                              : at::kFloat;
}

// --- autograd ---------------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The gradient buffers live in saved_data, not in the saved variables: the backward may
// rewrite them in place, which is not a change of a saved input that the version check
// should report.
std::optional<at::Tensor> saved_buffer(AutogradContext* ctx, const char* name) {
  const c10::IValue& value = ctx->saved_data.at(name);
  return value.isNone() ? std::nullopt : std::optional<at::Tensor>(value.toTensor());
}

// The first backward gives the forward's buffers away: the context drops its references, so
// that the caller's are the only ones and AccumulateGrad takes the buffer as the .grad instead
// of copying it (it copies a gradient that something else still references).
void hand_out(AutogradContext* ctx, std::initializer_list<const char*> names) {
  ctx->saved_data["handed_out"] = true;
  for (const char* name : names) ctx->saved_data[name] = c10::IValue();
}

// Whether the 0-d upstream gradient is exactly 1: read on the host (a CPU tensor; there is no
// device to sync with).
bool is_unit(const at::Tensor& upstream) { return upstream.item<double>() == 1.0; }

// With create_graph=True the gradients are handed out through a node that raises when it is
// differentiated (the fused backward has no derivative of its own). Its extra input, a saved
// operand that requires grad, links it to the forward's inputs, so that differentiating
// towards them reaches it (and raises) instead of finding no path.
variable_list guard_double_backward(variable_list grads, const at::Tensor& anchor,
                                    const std::string& message) {
  if (!at::GradMode::is_enabled()) return grads;
  variable_list inputs;
  for (const at::Tensor& g : grads) {
    inputs.push_back(g.defined() ? g.detach().requires_grad_(true) : at::Tensor());
  }
  const bool anchored = anchor.defined() && anchor.requires_grad();
  if (anchored) inputs.push_back(anchor);
  auto error = std::make_shared<torch::autograd::DelayedError>(
      message, static_cast<int64_t>(inputs.size()));
  variable_list linked = (*error)(std::move(inputs));
  linked.resize(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) linked[i] = at::Tensor();
  }
  return linked;
}

std::string double_backward_message(const char* loss, const char* torch_name) {
  return std::string("fused_ce: double backward through ") + loss +
         " is not supported; the fused backward kernel has no derivative of its own. Use " +
         torch_name + " for higher-order gradients.";
}

// grad_scale * total (both 0-d, one dtype) as a new 0-d tensor: the product rounded once, the
// bits of their mul op without its dispatch.
at::Tensor scaled(const at::Tensor& total, const at::Tensor& grad_scale) {
  at::Tensor out = at::empty({}, total.options());
  AT_DISPATCH_FLOATING_TYPES(total.scalar_type(), "fused_ce_scaled", [&] {
    *out.mutable_data_ptr<scalar_t>() =
        *total.const_data_ptr<scalar_t>() * *grad_scale.const_data_ptr<scalar_t>();
  });
  return out;
}

// --- softmax + cross-entropy ----------------------------------------------------------------

struct CEOptionsNative {
  int64_t ignore_index;
  double label_smoothing;
  double logit_scale;
  double softcap;
  double z_loss;
};

CEOptionsNative ce_options(AutogradContext* ctx) {
  return {ctx->saved_data.at("ignore_index").toInt(),
          ctx->saved_data.at("label_smoothing").toDouble(),
          ctx->saved_data.at("logit_scale").toDouble(), ctx->saved_data.at("softcap").toDouble(),
          ctx->saved_data.at("z_loss").toDouble()};
}

// Writes the gradients of grad_scale * upstream * sum_n (loss_n + z_loss * v_n * lse_n^2)
// into grad_logits / grad_target (the same ops, in the same order, as the Python rewrite).
void ce_rewrite(const at::Tensor& upstream, const at::Tensor& logits, const at::Tensor& target,
                const std::optional<at::Tensor>& weight, const at::Tensor& saved,
                const at::Tensor& grad_scale, const CEOptionsNative& o,
                const at::Tensor& grad_logits, const std::optional<at::Tensor>& grad_target) {
  const at::Tensor grad_loss = (grad_scale * upstream).expand({saved.size(1)});
  std::optional<at::Tensor> grad_lse;
  if (o.z_loss > 0.0) {
    at::Tensor value = grad_loss * (2.0 * o.z_loss) * (saved[0] + saved[1]);
    if (target.dim() != 3) {
      value = at::where(target.reshape({-1}).to(at::kLong) != o.ignore_index, value, 0.0);
    }
    grad_lse = value;
  }
  ce_backward(grad_loss, grad_lse, logits, target, weight, saved, o.ignore_index,
              o.label_smoothing, o.logit_scale, o.softcap, grad_logits, grad_target);
}

// Logits as the kernels see them, (n_outer, C, n_inner), from the public function's input:
// (C) -> (1, C, 1), (N, C) -> (N, C, 1), (N, C, d1..dK) -> (N, C, d1 * .. * dK); a probability
// target likewise. A view (a copy only when the spatial dims cannot be merged by one).
at::Tensor class_rows(const at::Tensor& t) {
  if (t.dim() == 1) return t.view({1, -1, 1});
  if (t.dim() == 2) return t.unsqueeze(-1);
  return t.flatten(2);
}

// A new tensor like `input` whose class_rows is a view of it (so the kernel writes the
// gradient in the input's own shape): for a contiguous input an empty_output (large ones in
// 2 MiB pages, see memory.h), else empty_like's layout, or contiguous where that layout's
// spatial dims do not merge.
at::Tensor gradient_like(const at::Tensor& input) {
  if (input.is_contiguous()) return empty_output(input);
  at::Tensor grad = at::empty_like(input);
  if (input.dim() > 3 && !class_rows(grad).is_alias_of(grad)) {
    grad = at::empty(input.sizes(), input.options());
  }
  return grad;
}

struct CrossEntropyScalar : public torch::autograd::Function<CrossEntropyScalar> {
  // input: logits (C), (N, C) or (N, C, d1..dK); target: class indices of the batch shape, or
  // probabilities of input's shape; grad_scale 0-d in the accumulation dtype (1 / divisor for
  // 'mean', 1 for 'sum'). Returns the 0-d loss grad_scale * sum_n (loss_n + z_loss * v_n *
  // lse_n^2) and makes the gradients the two flags ask for.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& target, const std::optional<at::Tensor>& weight,
                            const at::Tensor& grad_scale, int64_t ignore_index,
                            double label_smoothing, double logit_scale, double softcap,
                            double z_loss, bool input_grad, bool target_grad) {
    TORCH_CHECK(input.device().is_cpu() && target.device().is_cpu() &&
                    grad_scale.device().is_cpu(),
                "fused_ce native: ce_scalar takes CPU tensors");
    // The views and buffers made here are internal: no autograd or view tracking for them.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const bool prob_target = target.is_floating_point();  // else class indices
    const at::Tensor logits = class_rows(input);
    const at::Tensor rows_target = prob_target
        ? class_rows(target)
        : target.reshape({logits.size(0), logits.size(2)});
    const at::ScalarType acc = accumulation(logits, target);
    const int64_t n_rows = logits.size(0) * logits.size(2);
    const auto row_options = logits.options().dtype(acc);
    const at::Tensor loss_rows = at::empty({n_rows}, row_options);
    const at::Tensor lse = at::empty({n_rows}, row_options);
    const at::Tensor saved = at::empty({3, n_rows}, row_options);
    const at::Tensor no_entropy = at::empty({0}, row_options);
    const at::Tensor no_argmax = at::empty({0}, row_options.dtype(at::kLong));
    std::optional<at::Tensor> grad_input, grad_target;
    if (input_grad) grad_input = gradient_like(input);
    if (target_grad) grad_target = gradient_like(target);
    ce_forward(logits, rows_target, weight, ignore_index, label_smoothing, logit_scale, softcap,
               loss_rows, lse, saved, no_entropy, no_argmax,
               input_grad || target_grad ? std::optional<at::Tensor>(grad_scale) : std::nullopt,
               z_loss, grad_input.has_value() ? std::optional(class_rows(*grad_input)) : std::nullopt,
               grad_target.has_value() ? std::optional(class_rows(*grad_target)) : std::nullopt);
    at::Tensor per_row = loss_rows;
    if (z_loss > 0.0) {
      at::Tensor z_rows = lse.square() * z_loss;
      // where(), not a product: an ignored row's lse may be inf and its term must be 0.
      if (!prob_target) {
        z_rows = at::where(rows_target.reshape({-1}).to(at::kLong) != ignore_index, z_rows, 0.0);
      }
      per_row = per_row + z_rows;
    }
    ctx->save_for_backward({input, target, weight.value_or(at::Tensor()), saved, grad_scale});
    ctx->saved_data["grad_input"] = grad_input;
    ctx->saved_data["grad_target"] = grad_target;
    ctx->saved_data["handed_out"] = false;
    ctx->saved_data["prob_target"] = prob_target;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["logit_scale"] = logit_scale;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["z_loss"] = z_loss;
    ctx->set_materialize_grads(false);
    return scaled(per_row.sum(), grad_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // One gradient per forward argument: input, target, then ten that have none.
    variable_list grads(12);
    const at::Tensor& upstream = grad_outputs[0];
    if (!upstream.defined()) return grads;
    // Internal ops below autograd, up to handing the gradients out.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd(std::in_place);
    const variable_list stored = ctx->get_saved_variables();
    const at::Tensor& input = stored[0];
    const at::Tensor& target = stored[1];
    const std::optional<at::Tensor> weight =
        stored[2].defined() ? std::optional<at::Tensor>(stored[2]) : std::nullopt;
    const at::Tensor& saved = stored[3];
    const at::Tensor& grad_scale = stored[4];
    const bool prob_target = ctx->saved_data.at("prob_target").toBool();
    const bool want_input = ctx->needs_input_grad(0);
    const bool want_target = prob_target && ctx->needs_input_grad(1);
    const std::optional<at::Tensor> made_input = saved_buffer(ctx, "grad_input");
    const std::optional<at::Tensor> made_target = saved_buffer(ctx, "grad_target");
    const CEOptionsNative options = ce_options(ctx);
    const at::Tensor logits = class_rows(input);
    const at::Tensor rows_target = prob_target
        ? class_rows(target)
        : target.reshape({logits.size(0), logits.size(2)});
    // Writes the gradients for `upstream` into the given buffers (input's and target's shapes).
    auto rewrite = [&](const at::Tensor& into_input, const std::optional<at::Tensor>& into_target) {
      ce_rewrite(upstream, logits, rows_target, weight, saved, grad_scale, options,
                 class_rows(into_input),
                 into_target.has_value() ? std::optional(class_rows(*into_target)) : std::nullopt);
    };
    const bool first = !ctx->saved_data.at("handed_out").toBool() &&
                       (made_input.has_value() || !want_input) &&
                       (made_target.has_value() || !want_target);
    at::Tensor grad_input, grad_target;
    if (first) {
      hand_out(ctx, {"grad_input", "grad_target"});
      if (want_input) grad_input = *made_input;
      if (want_target) grad_target = *made_target;
      if ((want_input || want_target) && !is_unit(upstream)) {
        rewrite(made_input.has_value() ? *made_input : gradient_like(input),
                want_target ? made_target : std::nullopt);
      }
    } else if (want_input || want_target) {
      const at::Tensor into_input = gradient_like(input);
      if (want_input) grad_input = into_input;
      if (want_target) grad_target = gradient_like(target);
      rewrite(into_input, want_target ? std::optional(grad_target) : std::nullopt);
    }
    below_autograd.reset();
    variable_list handed = guard_double_backward(
        {grad_input, grad_target}, input.requires_grad() ? input : target,
        double_backward_message("softmax_cross_entropy", "torch.nn.functional.cross_entropy"));
    grads[0] = handed[0];
    grads[1] = handed[1];
    return grads;
  }
};

// reduction='none' (no z-loss, no stats, no in-place backward): the per-row loss of the batch
// shape in the accumulation dtype; the backward recomputes the gradient from the saved row
// statistics for the upstream per-row gradient.
struct CrossEntropyUnreduced : public torch::autograd::Function<CrossEntropyUnreduced> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& target, const OptionalTensor& weight,
                            int64_t ignore_index, double label_smoothing, double logit_scale,
                            double softcap) {
    TORCH_CHECK(input.device().is_cpu() && target.device().is_cpu(),
                "fused_ce native: ce_unreduced takes CPU tensors");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const bool prob_target = target.is_floating_point();
    const at::Tensor logits = class_rows(input);
    const at::Tensor rows_target = prob_target
        ? class_rows(target)
        : target.reshape({logits.size(0), logits.size(2)});
    const at::ScalarType acc = accumulation(input, target);
    const int64_t n_rows = logits.size(0) * logits.size(2);
    const auto row_options = input.options().dtype(acc);
    // The loss in the batch shape: the input's without the class dim.
    std::vector<int64_t> batch_shape(input.sizes().begin(), input.sizes().end());
    batch_shape.erase(batch_shape.begin() + (input.dim() > 1 ? 1 : 0));
    const at::Tensor loss = at::empty(batch_shape, row_options);
    const at::Tensor saved = at::empty({3, n_rows}, row_options);
    ce_forward(logits, rows_target, weight, ignore_index, label_smoothing, logit_scale, softcap,
               loss.view({n_rows}), at::empty({n_rows}, row_options), saved,
               at::empty({0}, row_options), at::empty({0}, row_options.dtype(at::kLong)),
               std::nullopt, 0.0, std::nullopt, std::nullopt);
    ctx->save_for_backward({input, target, weight.value_or(at::Tensor()), saved});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["logit_scale"] = logit_scale;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["z_loss"] = 0.0;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(7);  // input, target, then five that have none
    const at::Tensor& upstream = grad_outputs[0];
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd(std::in_place);
    const variable_list stored = ctx->get_saved_variables();
    const at::Tensor& input = stored[0];
    const at::Tensor& target = stored[1];
    const OptionalTensor weight = stored[2].defined() ? OptionalTensor(stored[2]) : std::nullopt;
    const at::Tensor& saved = stored[3];
    const bool want_input = ctx->needs_input_grad(0);
    const bool want_target = target.is_floating_point() && ctx->needs_input_grad(1);
    if (!want_input && !want_target) return grads;
    const CEOptionsNative o = ce_options(ctx);
    const at::Tensor logits = class_rows(input);
    const at::Tensor rows_target = target.is_floating_point()
        ? class_rows(target)
        : target.reshape({logits.size(0), logits.size(2)});
    const at::Tensor grad_input = gradient_like(input);
    const at::Tensor grad_target = want_target ? gradient_like(target) : at::Tensor();
    ce_backward(upstream.reshape({-1}).to(saved.scalar_type()), std::nullopt, logits,
                rows_target, weight, saved, o.ignore_index, o.label_smoothing, o.logit_scale,
                o.softcap, class_rows(grad_input),
                want_target ? OptionalTensor(class_rows(grad_target)) : std::nullopt);
    below_autograd.reset();
    variable_list handed = guard_double_backward(
        {want_input ? grad_input : at::Tensor(), grad_target},
        input.requires_grad() ? input : target,
        double_backward_message("softmax_cross_entropy", "torch.nn.functional.cross_entropy"));
    grads[0] = handed[0];
    grads[1] = handed[1];
    return grads;
  }
};

// The number of class indices equal to ignore_index, after checking that every other one is in
// [0, n_classes) (the kernels read the logits and the weight at it): one read on the host, where
// the Python path needs an aminmax and two reads, or eight small ops on a device.
template <typename T>
int64_t count_ignored(const at::Tensor& target, int64_t n_classes, int64_t ignore_index) {
  const at::Tensor dense = target.contiguous();
  const T* index = dense.const_data_ptr<T>();
  int64_t ignored = 0;
  bool in_range = true;
  for (int64_t i = 0, n = dense.numel(); i < n; ++i) {
    const int64_t y = static_cast<int64_t>(index[i]);
    const bool skip = y == ignore_index;
    ignored += skip;
    in_range &= skip || (y >= 0 && y < n_classes);
  }
  TORCH_CHECK(in_range,
              "target: a class index is out of bounds (expected values in [0, C), C the number "
              "of classes, or ignore_index)");
  return ignored;
}

// grad_scale: 1 for 'sum'; for 'mean' 1 / the divisor torch divides by (the number of rows for
// probability targets, else the class weights of the non-ignored rows, or their count), in the
// accumulation dtype, with the bits of the Python path's fused_ce.functional._grad_scale (the
// same ops where a tensor is summed; a correctly rounded reciprocal of the count otherwise).
at::Tensor ce_grad_scale(const at::Tensor& input, const at::Tensor& target,
                         const std::optional<at::Tensor>& weight, int64_t ignore_index,
                         bool mean) {
  const at::ScalarType acc = accumulation(input, target);
  const auto options = input.options().dtype(acc);
  const int64_t class_dim = input.dim() > 1 ? 1 : 0;
  const int64_t n_classes = input.size(class_dim);
  int64_t n_rows = 1;
  for (int64_t d = 0; d < input.dim(); ++d) n_rows *= d == class_dim ? 1 : input.size(d);
  int64_t ignored = 0;
  if (!target.is_floating_point()) {
    ignored = target.scalar_type() == at::kByte
        ? count_ignored<uint8_t>(target, n_classes, ignore_index)
        : count_ignored<int64_t>(target, n_classes, ignore_index);
  }
  if (!mean) return at::ones({}, options);
  if (target.is_floating_point()) {
    return at::full({}, n_rows ? 1.0 / static_cast<double>(n_rows) : std::numeric_limits<double>::quiet_NaN(), options);
  }
  if (weight.has_value()) {
    const at::Tensor class_weight = weight->to(acc);
    if (ignored == 0) return at::reciprocal(class_weight.index({target.to(at::kLong)}).sum());
    const at::Tensor valid = target.to(at::kLong) != ignore_index;
    const at::Tensor index = at::where(valid, target, 0).to(at::kLong);
    return at::reciprocal((class_weight.index({index}) * valid).sum());
  }
  const int64_t count = n_rows - ignored;
  if (acc == at::kDouble) return at::full({}, 1.0 / static_cast<double>(count), options);
  return at::full({}, 1.0f / static_cast<float>(count), options);
}

at::Tensor ce_unreduced(const at::Tensor& input, const at::Tensor& target,
                        const OptionalTensor& weight, int64_t ignore_index,
                        double label_smoothing, double logit_scale, double softcap) {
  if (!target.is_floating_point()) {
    const int64_t n_classes = input.size(input.dim() > 1 ? 1 : 0);
    if (target.scalar_type() == at::kByte) {
      count_ignored<uint8_t>(target, n_classes, ignore_index);
    } else {
      count_ignored<int64_t>(target, n_classes, ignore_index);
    }
  }
  return CrossEntropyUnreduced::apply(input, target, weight, ignore_index, label_smoothing,
                                      logit_scale, softcap);
}

at::Tensor ce_scalar(const at::Tensor& input, const at::Tensor& target,
                     const std::optional<at::Tensor>& weight, bool mean, int64_t ignore_index,
                     double label_smoothing, double logit_scale, double softcap, double z_loss) {
  TORCH_CHECK(input.device().is_cpu() && target.device().is_cpu(),
              "fused_ce native: ce_scalar takes CPU tensors");
  const at::Tensor grad_scale = ce_grad_scale(input, target, weight, ignore_index, mean);
  // Which gradients the forward makes: decided here, where grad mode is the caller's (the
  // forward runs with it off). Edges: input 0, target 1, then weight and grad_scale.
  const bool grad_mode = at::GradMode::is_enabled();
  return CrossEntropyScalar::apply(
      input, target, weight, grad_scale, ignore_index, label_smoothing, logit_scale, softcap,
      z_loss, grad_mode && input.requires_grad(),
      grad_mode && target.is_floating_point() && target.requires_grad());
}

// --- sigmoid + binary cross-entropy ---------------------------------------------------------

// An operand broadcast to `shape` as the kernel's (rows, cols) view: one long row when `flat`
// (every operand dense of `shape` or one value), else (prod(shape[:-1]), shape[-1]); stride-0
// dims stay stride 0. As fused_ce._common.as_rows_2d.
at::Tensor rows_2d(const at::Tensor& t, at::IntArrayRef shape, bool flat) {
  if (flat) {
    const int64_t numel = c10::multiply_integers(shape);
    if (t.numel() == 1 || t.sizes() != shape || !t.is_contiguous()) {
      return t.as_strided({1, numel}, {0, 0});  // one value
    }
    return t.view({1, t.numel()});
  }
  const at::Tensor expanded = t.expand(shape);
  if (shape.empty()) return expanded.reshape({1, 1});
  return expanded.reshape({-1, shape.back()});
}

// One value for every element: one element, or one expanded (every stride 0 where size > 1).
bool uniform_operand(const at::Tensor& t) {
  if (t.numel() == 1) return true;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) != 0) return false;
  }
  return true;
}

bool broadcast_operand(const at::Tensor& t) {
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) == 0) return true;
  }
  return false;
}

// One kernel call on operands of any layout: any of the elementwise loss, its sum, and the
// gradients for the upstream `grad` (0-d, or broadcastable to the input). The views are those
// of fused_ce._common.bce_rows_2d, the one rule for every BCE kernel: flat when every operand
// is dense of `shape` or uniform; with a loss sum, operands that are strided but not broadcast
// are copied dense (then flat) rather than changing the view, so a strided problem sums to the
// dense problem's bits.
void bce_run(const at::Tensor& input, const at::Tensor& target, const OptionalTensor& weight,
             const OptionalTensor& pos_weight, const OptionalTensor& grad,
             const OptionalTensor& loss, const OptionalTensor& grad_input,
             const OptionalTensor& grad_target, const OptionalTensor& loss_sum) {
  const at::IntArrayRef shape = input.sizes();
  OptionalTensor operands[5] = {input, target, weight, pos_weight, grad};
  auto dense = [&](const at::Tensor& t) {
    return (t.sizes() == shape && t.is_contiguous()) || uniform_operand(t);
  };
  bool flat = true, copyable = true;
  for (const auto& t : operands) {
    if (!t.has_value() || dense(*t)) continue;
    flat = false;
    copyable = copyable && t->sizes() == shape && !broadcast_operand(*t);
  }
  if (!flat && loss_sum.has_value() && copyable) {
    for (auto& t : operands) {
      if (t.has_value() && !dense(*t)) t = t->contiguous();
    }
    flat = true;
  }
  auto rows = [&](const OptionalTensor& t) -> OptionalTensor {
    if (!t.has_value()) return std::nullopt;
    return rows_2d(*t, shape, flat);
  };
  bce(*rows(operands[0]), *rows(operands[1]), rows(operands[2]), rows(operands[3]),
      rows(operands[4]), loss, grad_input, grad_target, loss_sum);
}

struct BinaryCrossEntropyScalar : public torch::autograd::Function<BinaryCrossEntropyScalar> {
  // Any-shape input and target, weight / pos_weight broadcastable to them; grad_scale 0-d in
  // the accumulation dtype (1 / numel for 'mean', 1 for 'sum'). Returns grad_scale * sum loss.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& target, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& pos_weight,
                            const at::Tensor& grad_scale, bool input_grad, bool target_grad) {
    TORCH_CHECK(input.device().is_cpu() && target.device().is_cpu() &&
                    grad_scale.device().is_cpu(),
                "fused_ce native: bce_scalar takes CPU tensors");
    // The views and buffers made here are internal: no autograd or view tracking for them.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::optional<at::Tensor> grad_input, grad_target;
    if (input_grad) grad_input = empty_output(input);
    if (target_grad) grad_target = empty_output(target);
    const at::Tensor loss_sum = at::empty({}, input.options().dtype(grad_scale.scalar_type()));
    bce_run(input, target, weight, pos_weight, grad_scale, std::nullopt, grad_input,
            grad_target, loss_sum);
    ctx->save_for_backward({input, target, weight.value_or(at::Tensor()),
                            pos_weight.value_or(at::Tensor()), grad_scale});
    ctx->saved_data["grad_input"] = grad_input;
    ctx->saved_data["grad_target"] = grad_target;
    ctx->saved_data["handed_out"] = false;
    ctx->set_materialize_grads(false);
    return scaled(loss_sum, grad_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(7);
    const at::Tensor& upstream = grad_outputs[0];
    if (!upstream.defined()) return grads;
    // Internal ops below autograd, up to handing the gradients out.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd(std::in_place);
    const variable_list stored = ctx->get_saved_variables();
    auto optional = [](const at::Tensor& t) {
      return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    const at::Tensor& input = stored[0];
    const at::Tensor& target = stored[1];
    const std::optional<at::Tensor> weight = optional(stored[2]);
    const std::optional<at::Tensor> pos_weight = optional(stored[3]);
    const at::Tensor& grad_scale = stored[4];
    const bool want_input = ctx->needs_input_grad(0);
    const bool want_target = ctx->needs_input_grad(1);
    const std::optional<at::Tensor> made_input = saved_buffer(ctx, "grad_input");
    const std::optional<at::Tensor> made_target = saved_buffer(ctx, "grad_target");
    const bool first = !ctx->saved_data.at("handed_out").toBool() &&
                       (made_input.has_value() || !want_input) &&
                       (made_target.has_value() || !want_target);
    at::Tensor grad_input, grad_target;
    if (first) {
      hand_out(ctx, {"grad_input", "grad_target"});
      if (want_input) grad_input = *made_input;
      if (want_target) grad_target = *made_target;
      if ((want_input || want_target) && !is_unit(upstream)) {
        bce_run(input, target, weight, pos_weight, grad_scale * upstream, std::nullopt,
                want_input ? made_input : std::nullopt, want_target ? made_target : std::nullopt,
                std::nullopt);
      }
    } else if (want_input || want_target) {
      if (want_input) grad_input = empty_output(input);
      if (want_target) grad_target = empty_output(target);
      bce_run(input, target, weight, pos_weight, grad_scale * upstream, std::nullopt,
              optional(grad_input), optional(grad_target), std::nullopt);
    }
    below_autograd.reset();
    variable_list handed = guard_double_backward(
        {grad_input, grad_target}, input.requires_grad() ? input : target,
        double_backward_message("sigmoid_binary_cross_entropy",
                                "torch.nn.functional.binary_cross_entropy_with_logits"));
    grads[0] = handed[0];
    grads[1] = handed[1];
    return grads;
  }
};

// reduction='none': the elementwise loss (input's shape, target's dtype); the backward reads
// the operands again for the upstream gradient.
struct BinaryCrossEntropyUnreduced
    : public torch::autograd::Function<BinaryCrossEntropyUnreduced> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& target, const OptionalTensor& weight,
                            const OptionalTensor& pos_weight) {
    TORCH_CHECK(input.device().is_cpu() && target.device().is_cpu(),
                "fused_ce native: bce_unreduced takes CPU tensors");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor loss = at::empty(input.sizes(), target.options());
    bce_run(input, target, weight, pos_weight, std::nullopt, loss, std::nullopt, std::nullopt,
            std::nullopt);
    ctx->save_for_backward(
        {input, target, weight.value_or(at::Tensor()), pos_weight.value_or(at::Tensor())});
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(4);
    const at::Tensor& upstream = grad_outputs[0];
    const bool want_input = ctx->needs_input_grad(0);
    const bool want_target = ctx->needs_input_grad(1);
    if (!want_input && !want_target) return grads;
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd(std::in_place);
    const variable_list stored = ctx->get_saved_variables();
    auto optional = [](const at::Tensor& t) {
      return t.defined() ? OptionalTensor(t) : std::nullopt;
    };
    const at::Tensor& input = stored[0];
    const at::Tensor& target = stored[1];
    at::Tensor grad_input, grad_target;
    if (want_input) grad_input = empty_output(input);
    if (want_target) grad_target = empty_output(target);
    bce_run(input, target, optional(stored[2]), optional(stored[3]), upstream, std::nullopt,
            optional(grad_input), optional(grad_target), std::nullopt);
    below_autograd.reset();
    variable_list handed = guard_double_backward(
        {grad_input, grad_target}, input.requires_grad() ? input : target,
        double_backward_message("sigmoid_binary_cross_entropy",
                                "torch.nn.functional.binary_cross_entropy_with_logits"));
    grads[0] = handed[0];
    grads[1] = handed[1];
    return grads;
  }
};

at::Tensor bce_unreduced(const at::Tensor& input, const at::Tensor& target,
                         const OptionalTensor& weight, const OptionalTensor& pos_weight) {
  return BinaryCrossEntropyUnreduced::apply(input, target, weight, pos_weight);
}

at::Tensor bce_scalar(const at::Tensor& input, const at::Tensor& target,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& pos_weight, bool mean) {
  TORCH_CHECK(input.device().is_cpu() && target.device().is_cpu(),
              "fused_ce native: bce_scalar takes CPU tensors");
  // 1 / numel for 'mean' (rounded once from the double quotient, as torch.full does), 1 for
  // 'sum', in the accumulation dtype.
  const int64_t numel = input.numel();
  const double scale = !mean ? 1.0 : (numel ? 1.0 / static_cast<double>(numel) : std::numeric_limits<double>::quiet_NaN());
  const at::ScalarType acc = accumulation(input, target);
  const at::Tensor grad_scale = at::full({}, scale, input.options().dtype(acc));
  const bool grad_mode = at::GradMode::is_enabled();
  return BinaryCrossEntropyScalar::apply(input, target, weight, pos_weight, grad_scale,
                                         grad_mode && input.requires_grad(),
                                         grad_mode && target.requires_grad());
}

}  // namespace
}  // namespace fused_ce_native

// The autograd Functions are built inside these kernels (below the dispatcher's autograd keys).
TORCH_LIBRARY_IMPL(fused_ce_native, CompositeImplicitAutograd, m) {
  m.impl("ce_scalar", &fused_ce_native::ce_scalar);
  m.impl("ce_unreduced", &fused_ce_native::ce_unreduced);
  m.impl("bce_scalar", &fused_ce_native::bce_scalar);
  m.impl("bce_unreduced", &fused_ce_native::bce_unreduced);
}
