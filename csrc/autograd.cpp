// The eager entry of the native backend: one op per loss and reduction ('mean'/'sum', 'none')
// whose autograd lives here, in C++, so a forward + backward from Python is one dispatcher
// call, one C++ autograd node and the kernels (no Python autograd.Function, no Python backward).
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
#include <ATen/EmptyTensor.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <mutex>
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

using torch::autograd::variable_list;

// Whether the 0-d upstream gradient is exactly 1: read on the host (a CPU tensor; there is no
// device to sync with), straight from its memory (item() dispatches an op: about 1 us a call).
bool is_unit(const at::Tensor& upstream) {
  bool unit = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, upstream.scalar_type(),
                                  "fused_ce_is_unit", [&] {
    unit = static_cast<double>(*upstream.const_data_ptr<scalar_t>()) == 1.0;
  });
  return unit;
}

// With create_graph=True the gradients are handed out through a node that raises when it is
// differentiated (the fused backward has no derivative of its own). Its extra input, a saved
// operand that requires grad, links it to the forward's inputs, so that differentiating
// towards them reaches it (and raises) instead of finding no path.
// The losses, as the "double backward" error names them: ours, and torch's to use instead.
struct LossNames {
  const char* ours;
  const char* torch;
};
constexpr LossNames kCrossEntropy{"softmax_cross_entropy", "torch.nn.functional.cross_entropy"};
constexpr LossNames kBinaryCrossEntropy{"sigmoid_binary_cross_entropy",
                                        "torch.nn.functional.binary_cross_entropy_with_logits"};

variable_list guard_double_backward(variable_list grads, const at::Tensor& anchor,
                                    LossNames names) {
  if (!at::GradMode::is_enabled()) return grads;
  variable_list inputs;
  for (const at::Tensor& g : grads) {
    inputs.push_back(g.defined() ? g.detach().requires_grad_(true) : at::Tensor());
  }
  const bool anchored = anchor.defined() && anchor.requires_grad();
  if (anchored) inputs.push_back(anchor);
  const std::string message = std::string("fused_ce: double backward through ") + names.ours +
                              " is not supported; the fused backward kernel has no derivative "
                              "of its own. Use " +
                              names.torch + " for higher-order gradients.";
  auto error = std::make_shared<torch::autograd::DelayedError>(
      message, static_cast<int64_t>(inputs.size()));
  variable_list linked = (*error)(std::move(inputs));
  linked.resize(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) linked[i] = at::Tensor();
  }
  return linked;
}

// The per-row outputs a call does not ask for (entropy, argmax): an empty tensor of `dtype`,
// made once per process (the kernel reads no element of it and writes none), rather than two
// allocations a call.
const at::Tensor& no_rows(at::ScalarType dtype) {
  static const at::Tensor* const float_rows = new at::Tensor(at::empty({0}, at::kFloat));
  static const at::Tensor* const double_rows = new at::Tensor(at::empty({0}, at::kDouble));
  static const at::Tensor* const long_rows = new at::Tensor(at::empty({0}, at::kLong));
  switch (dtype) {
    case at::kFloat: return *float_rows;
    case at::kDouble: return *double_rows;
    default:
      TORCH_CHECK(dtype == at::kLong, "fused_ce native: no_rows of ", dtype);
      return *long_rows;
  }
}

// Tensors made without the dispatcher, for the ops' own buffers and the kernels' views of the
// operands (CPU only, below autograd): at the lecture's 64-row batches one dispatcher call, 0.3
// to 0.5 us, costs a tenth of the kernel it feeds.
// A new uninitialised CPU tensor.
at::Tensor new_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_cpu(sizes, dtype);
}

// A 0-d CPU tensor holding `value` rounded to `dtype` (as at::full rounds it).
at::Tensor scalar_cpu(double value, at::ScalarType dtype) {
  at::Tensor out = new_cpu({}, dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "fused_ce_scalar_cpu", [&] {
    *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(value);
  });
  return out;
}

// `t`'s memory seen with other sizes and strides (a view that autograd never sees: the
// kernels' operands and outputs only).
at::Tensor raw_view(const at::Tensor& t, at::IntArrayRef sizes, at::IntArrayRef strides) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(
      c10::Storage(t.storage()), c10::DispatchKeySet(c10::DispatchKey::CPU), t.dtype());
  impl->set_sizes_and_strides(sizes, strides, t.storage_offset());
  return at::Tensor(std::move(impl));
}

// grad_scale * total (both 0-d, one dtype) as a new 0-d tensor: the product rounded once, the
// bits of their mul op without its dispatch.
at::Tensor scaled(const at::Tensor& total, const at::Tensor& grad_scale) {
  at::Tensor out = new_cpu({}, total.scalar_type());
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
// target likewise. A view (a copy only when the spatial dims cannot be merged by one); (C) and
// (N, C), the common calls, as raw views.
at::Tensor class_rows(const at::Tensor& t) {
  if (t.dim() == 1) {
    return raw_view(t, {1, t.size(0), 1}, {t.size(0) * t.stride(0), t.stride(0), 1});
  }
  if (t.dim() == 2) {
    return raw_view(t, {t.size(0), t.size(1), 1}, {t.stride(0), t.stride(1), 1});
  }
  return t.flatten(2);
}

// Class indices of the batch shape as the kernels see them, (n_outer, n_inner).
at::Tensor index_rows(const at::Tensor& target, int64_t n_outer, int64_t n_inner) {
  if (target.dim() == 0) return raw_view(target, {1, 1}, {1, 1});
  if (target.dim() == 1) return raw_view(target, {n_outer, 1}, {target.stride(0), 1});
  return target.reshape({n_outer, n_inner});
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

// What every loss node keeps: the operands, saved as ATen's generated nodes save theirs (the
// nodes are written out that way rather than as torch::autograd::Functions, whose context keeps
// its state in a map of named IValues and whose wrapper walks every argument: on the lecture's
// 64-row batches that bookkeeping was a visible part of the call). Edges: input 0, target 1.
struct LossBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable input, target, weight, pos_weight;

  void release_variables() override {
    input.reset_data();
    target.reset_data();
    weight.reset_data();
    pos_weight.reset_data();
  }

 protected:
  static OptionalTensor optional(const at::Tensor& t) {
    return t.defined() ? OptionalTensor(t) : std::nullopt;
  }
};

// The scalar losses' nodes: the forward made the gradients for an upstream of 1; the first
// backward gives them away (rewritten for another upstream), any later one writes new buffers.
struct ScalarLossBackward : public LossBackward {
  OptionalTensor made_input, made_target;
  bool handed_out = false;

  void release_variables() override {
    LossBackward::release_variables();
    made_input.reset();
    made_target.reset();
  }

 protected:
  // The wanted gradients for `upstream`. `rewrite(into_input, into_target)` writes them into
  // the buffers it is given (nullopt: not wanted); `fresh(like)` makes a new buffer. The
  // caller holds mutex_ (backward calls of one retained graph may run on several threads).
  template <typename Rewrite>
  std::pair<at::Tensor, at::Tensor> hand_out(const at::Tensor& upstream, bool want_input,
                                             bool want_target, const at::Tensor& input_value,
                                             const at::Tensor& target_value,
                                             at::Tensor (*fresh)(const at::Tensor&),
                                             Rewrite rewrite) {
    OptionalTensor into_input, into_target;
    if (!handed_out && (made_input.has_value() || !want_input) &&
        (made_target.has_value() || !want_target)) {
      // Given away: the node keeps no reference, so AccumulateGrad takes the buffer as .grad
      // instead of copying it.
      handed_out = true;
      if (want_input) into_input = std::move(made_input);
      if (want_target) into_target = std::move(made_target);
      made_input.reset();
      made_target.reset();
      if ((want_input || want_target) && !is_unit(upstream)) rewrite(into_input, into_target);
    } else if (want_input || want_target) {
      if (want_input) into_input = fresh(input_value);
      if (want_target) into_target = fresh(target_value);
      rewrite(into_input, into_target);
    }
    return {into_input.value_or(at::Tensor()), into_target.value_or(at::Tensor())};
  }
};

// A new node of type NodeT as `loss`'s grad_fn, with edges to (and saved) input and target and
// the saved constant operands; returned for the caller to fill in the rest.
template <typename NodeT>
NodeT& attach(const at::Tensor& loss, const at::Tensor& input, const at::Tensor& target,
              const OptionalTensor& weight, const OptionalTensor& pos_weight) {
  c10::intrusive_ptr<NodeT> node = c10::make_intrusive<NodeT>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, target));
  node->input = torch::autograd::SavedVariable(input, false);
  node->target = torch::autograd::SavedVariable(target, false);
  node->weight = torch::autograd::SavedVariable(weight.value_or(at::Tensor()), false);
  node->pos_weight = torch::autograd::SavedVariable(pos_weight.value_or(at::Tensor()), false);
  torch::autograd::set_history(loss, node);
  return *node;  // owned by the loss's autograd meta from here
}

// The node of ce_scalar.
struct CrossEntropyScalarBackward final : public ScalarLossBackward {
  at::Tensor saved, grad_scale;  // made by the op: row statistics (3, n_rows), 0-d scale
  CEOptionsNative options{};
  bool prob_target = false;

  std::string name() const override { return "fused_ce_native::CrossEntropyScalarBackward"; }

  void release_variables() override {
    ScalarLossBackward::release_variables();
    saved.reset();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor& upstream = grads[0];
    if (!upstream.defined()) return variable_list(2);
    const at::Tensor input_value = input.unpack();
    const at::Tensor target_value = target.unpack();
    std::pair<at::Tensor, at::Tensor> handed;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      handed = hand_out(
          upstream, task_should_compute_output(0),
          prob_target && task_should_compute_output(1), input_value, target_value,
          gradient_like, [&](const OptionalTensor& into_input, const OptionalTensor& into_target) {
            // Only here: the common backward hands out the forward's buffers and reads nothing.
            const OptionalTensor weight_value = optional(weight.unpack());
            const at::Tensor logits = class_rows(input_value);
            const at::Tensor rows_target = prob_target
                ? class_rows(target_value)
                : index_rows(target_value, logits.size(0), logits.size(2));
            // The kernel writes an input gradient in any case.
            const at::Tensor input_buffer = into_input.value_or(gradient_like(input_value));
            ce_rewrite(upstream, logits, rows_target, weight_value, saved, grad_scale, options,
                       class_rows(input_buffer),
                       into_target.has_value() ? OptionalTensor(class_rows(*into_target))
                                               : std::nullopt);
          });
    }
    return guard_double_backward({handed.first, handed.second},
                                 input_value.requires_grad() ? input_value : target_value,
                                 kCrossEntropy);
  }
};

// reduction='none' (no z-loss, no stats, no in-place backward): the per-row loss of the batch
// shape in the accumulation dtype; the backward recomputes the gradient from the saved row
// statistics for the upstream per-row gradient.
struct CrossEntropyUnreducedBackward final : public LossBackward {
  at::Tensor saved;  // the row statistics (3, n_rows), made by the op
  CEOptionsNative options{};

  std::string name() const override { return "fused_ce_native::CrossEntropyUnreducedBackward"; }

  void release_variables() override {
    LossBackward::release_variables();
    saved.reset();
  }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor input_value = input.unpack();
    const at::Tensor target_value = target.unpack();
    const bool prob_target = target_value.is_floating_point();
    const bool want_input = task_should_compute_output(0);
    const bool want_target = prob_target && task_should_compute_output(1);
    if (!grads[0].defined() || (!want_input && !want_target)) return variable_list(2);
    at::Tensor grad_input, grad_target;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const at::Tensor logits = class_rows(input_value);
      const at::Tensor rows_target = prob_target
          ? class_rows(target_value)
          : index_rows(target_value, logits.size(0), logits.size(2));
      grad_input = gradient_like(input_value);  // the kernel's buffer even when not wanted
      if (want_target) grad_target = gradient_like(target_value);
      ce_backward(grads[0].reshape({-1}).to(saved.scalar_type()), std::nullopt, logits,
                  rows_target, optional(weight.unpack()), saved, options.ignore_index, options.label_smoothing, options.logit_scale,
                  options.softcap, class_rows(grad_input),
                  want_target ? OptionalTensor(class_rows(grad_target)) : std::nullopt);
      if (!want_input) grad_input = at::Tensor();
    }
    return guard_double_backward({grad_input, grad_target},
                                 input_value.requires_grad() ? input_value : target_value,
                                 kCrossEntropy);
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
  if (!in_range) {
    // Only now, on the error path: the first offending index, named as torch names it.
    for (int64_t i = 0, n = dense.numel(); i < n; ++i) {
      const int64_t y = static_cast<int64_t>(index[i]);
      TORCH_CHECK(y == ignore_index || (y >= 0 && y < n_classes),
                  "target: a class index is out of bounds: Target ", y,
                  " is out of bounds. (expected values in [0, ", n_classes,
                  "), or ignore_index ", ignore_index, ")");
    }
  }
  return ignored;
}

// grad_scale: 1 for 'sum'; for 'mean' 1 / the divisor torch divides by (the number of rows for
// probability targets, else the class weights of the non-ignored rows, or their count), in the
// accumulation dtype, with the bits of the Python path's fused_ce._reduction._grad_scale (the
// same ops where a tensor is summed; a correctly rounded reciprocal of the count otherwise).
at::Tensor ce_grad_scale(const at::Tensor& input, const at::Tensor& target,
                         const std::optional<at::Tensor>& weight, int64_t ignore_index,
                         bool mean, double label_smoothing) {
  const at::ScalarType acc = accumulation(input, target);
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
  if (!mean) return scalar_cpu(1.0, acc);
  if (target.is_floating_point()) {
    return scalar_cpu(
        n_rows ? 1.0 / static_cast<double>(n_rows) : std::numeric_limits<double>::quiet_NaN(), acc);
  }
  if (weight.has_value()) {
    const at::Tensor class_weight = weight->to(acc);
    at::Tensor divisor;
    if (ignored == 0) {
      divisor = class_weight.index({target.to(at::kLong)}).sum();
    } else if (n_classes == 0) {
      divisor = scalar_cpu(0.0, acc);  // no class: every row is ignored
    } else {
      const at::Tensor valid = target.to(at::kLong) != ignore_index;
      const at::Tensor index = at::where(valid, target, 0).to(at::kLong);
      divisor = (class_weight.index({index}) * valid).sum();
    }
    // With label smoothing a zero divisor gives NaN, as torch's (1 - eps) * 0 / 0 term does
    // (see fused_ce._reduction._smoothed_divisor).
    if (label_smoothing > 0.0) {
      divisor = at::where(divisor == 0, std::numeric_limits<double>::quiet_NaN(), divisor);
    }
    return at::reciprocal(divisor);
  }
  const int64_t count = n_rows - ignored;
  if (acc == at::kDouble) return scalar_cpu(1.0 / static_cast<double>(count), acc);
  return scalar_cpu(1.0f / static_cast<float>(count), acc);
}

at::Tensor ce_unreduced(const at::Tensor& input, const at::Tensor& target,
                        const OptionalTensor& weight, int64_t ignore_index,
                        double label_smoothing, double logit_scale, double softcap) {
  TORCH_CHECK(input.device().is_cpu() && target.device().is_cpu(),
              "fused_ce native: ce_unreduced takes CPU tensors");
  const bool prob_target = target.is_floating_point();
  if (!prob_target) {
    const int64_t n_classes = input.size(input.dim() > 1 ? 1 : 0);
    if (target.scalar_type() == at::kByte) {
      count_ignored<uint8_t>(target, n_classes, ignore_index);
    } else {
      count_ignored<int64_t>(target, n_classes, ignore_index);
    }
  }
  at::Tensor loss, saved;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor logits = class_rows(input);
    const at::Tensor rows_target = prob_target
        ? class_rows(target)
        : index_rows(target, logits.size(0), logits.size(2));
    const int64_t n_rows = logits.size(0) * logits.size(2);
    const at::ScalarType acc = accumulation(input, target);
    // The loss in the batch shape: the input's without the class dim.
    std::vector<int64_t> batch_shape(input.sizes().begin(), input.sizes().end());
    batch_shape.erase(batch_shape.begin() + (input.dim() > 1 ? 1 : 0));
    loss = new_cpu(batch_shape, acc);
    saved = new_cpu({3, n_rows}, acc);
    ce_forward(logits, rows_target, weight, ignore_index, label_smoothing, logit_scale, softcap,
               raw_view(loss, {n_rows}, {1}), new_cpu({n_rows}, acc), saved, no_rows(acc),
               no_rows(at::kLong),
               std::nullopt, 0.0, std::nullopt, std::nullopt);
  }
  const bool grad_mode = at::GradMode::is_enabled();
  if (grad_mode && (input.requires_grad() || (prob_target && target.requires_grad()))) {
    auto& node =
        attach<CrossEntropyUnreducedBackward>(loss, input, target, weight, std::nullopt);
    node.saved = saved;
    node.options = {ignore_index, label_smoothing, logit_scale, softcap, 0.0};
  }
  return loss;
}

// input: logits (C), (N, C) or (N, C, d1..dK); target: class indices of the batch shape, or
// probabilities of input's shape. Returns the 0-d loss grad_scale * sum_n (loss_n + z_loss *
// v_n * lse_n^2) (grad_scale: 1 / the divisor for 'mean', 1 for 'sum') and makes, in the same
// pass, the gradients the caller's grad mode asks for.
at::Tensor ce_scalar(const at::Tensor& input, const at::Tensor& target,
                     const std::optional<at::Tensor>& weight, bool mean, int64_t ignore_index,
                     double label_smoothing, double logit_scale, double softcap, double z_loss) {
  TORCH_CHECK(input.device().is_cpu() && target.device().is_cpu(),
              "fused_ce native: ce_scalar takes CPU tensors");
  const bool prob_target = target.is_floating_point();  // else class indices
  const bool grad_mode = at::GradMode::is_enabled();
  const bool input_grad = grad_mode && input.requires_grad();
  const bool target_grad = grad_mode && prob_target && target.requires_grad();
  at::Tensor loss, saved, grad_scale;
  OptionalTensor grad_input, grad_target;
  {
    // The views and buffers made here are internal: no autograd or view tracking for them.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    grad_scale = ce_grad_scale(input, target, weight, ignore_index, mean, label_smoothing);
    const at::Tensor logits = class_rows(input);
    const at::Tensor rows_target = prob_target
        ? class_rows(target)
        : index_rows(target, logits.size(0), logits.size(2));
    const int64_t n_rows = logits.size(0) * logits.size(2);
    const at::ScalarType acc = accumulation(input, target);
    const at::Tensor loss_rows = new_cpu({n_rows}, acc);
    const at::Tensor lse = new_cpu({n_rows}, acc);
    saved = new_cpu({3, n_rows}, acc);
    if (input_grad) grad_input = gradient_like(input);
    if (target_grad) grad_target = gradient_like(target);
    ce_forward(logits, rows_target, weight, ignore_index, label_smoothing, logit_scale, softcap,
               loss_rows, lse, saved, no_rows(acc), no_rows(at::kLong),
               input_grad || target_grad ? OptionalTensor(grad_scale) : std::nullopt, z_loss,
               grad_input.has_value() ? OptionalTensor(class_rows(*grad_input)) : std::nullopt,
               grad_target.has_value() ? OptionalTensor(class_rows(*grad_target)) : std::nullopt);
    at::Tensor per_row = loss_rows;
    if (z_loss > 0.0) {
      at::Tensor z_rows = lse.square() * z_loss;
      // where(), not a product: an ignored row's lse may be inf and its term must be 0.
      if (!prob_target) {
        z_rows = at::where(rows_target.reshape({-1}).to(at::kLong) != ignore_index, z_rows, 0.0);
      }
      per_row = per_row + z_rows;
    }
    loss = scaled(per_row.sum(), grad_scale);
  }
  if (input_grad || target_grad) {
    auto& node = attach<CrossEntropyScalarBackward>(loss, input, target, weight, std::nullopt);
    node.saved = saved;
    node.grad_scale = grad_scale;
    node.options = {ignore_index, label_smoothing, logit_scale, softcap, z_loss};
    node.prob_target = prob_target;
    node.made_input = std::move(grad_input);
    node.made_target = std::move(grad_target);
  }
  return loss;
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

// BCE's operands (input, target, weight, pos_weight, upstream gradient) as the kernel's
// (rows, cols) views, by fused_ce._common.bce_rows_2d's rule, the one rule for every BCE kernel
// (tests/test_shared_rules.py checks the two give the same views): flat when every operand is
// dense of the input's shape or uniform; with a loss sum, operands that are strided but not
// broadcast are copied dense (then flat) rather than changing the view, so a strided problem
// sums to the dense problem's bits.
std::array<OptionalTensor, 5> bce_rows_2d(const at::Tensor& input, const at::Tensor& target,
                                          const OptionalTensor& weight,
                                          const OptionalTensor& pos_weight,
                                          const OptionalTensor& grad, bool loss_sum) {
  const at::IntArrayRef shape = input.sizes();
  std::array<OptionalTensor, 5> operands = {input, target, weight, pos_weight, grad};
  auto dense = [&](const at::Tensor& t) {
    return (t.sizes() == shape && t.is_contiguous()) || uniform_operand(t);
  };
  bool flat = true, copyable = true;
  for (const auto& t : operands) {
    if (!t.has_value() || dense(*t)) continue;
    flat = false;
    copyable = copyable && t->sizes() == shape && !broadcast_operand(*t);
  }
  if (!flat && loss_sum && copyable) {
    for (auto& t : operands) {
      if (t.has_value() && !dense(*t)) t = t->contiguous();
    }
    flat = true;
  }
  for (auto& t : operands) {
    if (t.has_value()) t = rows_2d(*t, shape, flat);
  }
  return operands;
}

// One kernel call on operands of any layout: any of the elementwise loss, its sum, and the
// gradients for the upstream `grad` (0-d, or broadcastable to the input).
void bce_run(const at::Tensor& input, const at::Tensor& target, const OptionalTensor& weight,
             const OptionalTensor& pos_weight, const OptionalTensor& grad,
             const OptionalTensor& loss, const OptionalTensor& grad_input,
             const OptionalTensor& grad_target, const OptionalTensor& loss_sum) {
  const auto rows = bce_rows_2d(input, target, weight, pos_weight, grad, loss_sum.has_value());
  bce(*rows[0], *rows[1], rows[2], rows[3], rows[4], loss, grad_input, grad_target, loss_sum);
}

// The node of bce_scalar.
struct BinaryCrossEntropyScalarBackward final : public ScalarLossBackward {
  at::Tensor grad_scale;  // 0-d, made by the op

  std::string name() const override {
    return "fused_ce_native::BinaryCrossEntropyScalarBackward";
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor& upstream = grads[0];
    if (!upstream.defined()) return variable_list(2);
    const at::Tensor input_value = input.unpack();
    const at::Tensor target_value = target.unpack();
    std::pair<at::Tensor, at::Tensor> handed;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      handed = hand_out(
          upstream, task_should_compute_output(0), task_should_compute_output(1), input_value,
          target_value, empty_output,
          [&](const OptionalTensor& into_input, const OptionalTensor& into_target) {
            bce_run(input_value, target_value, optional(weight.unpack()),
                    optional(pos_weight.unpack()), grad_scale * upstream, std::nullopt,
                    into_input, into_target, std::nullopt);
          });
    }
    return guard_double_backward({handed.first, handed.second},
                                 input_value.requires_grad() ? input_value : target_value,
                                 kBinaryCrossEntropy);
  }
};

// reduction='none': the elementwise loss (input's shape, target's dtype); the backward reads
// the operands again for the upstream gradient.
struct BinaryCrossEntropyUnreducedBackward final : public LossBackward {
  std::string name() const override {
    return "fused_ce_native::BinaryCrossEntropyUnreducedBackward";
  }

  variable_list apply(variable_list&& grads) override {
    const bool want_input = task_should_compute_output(0);
    const bool want_target = task_should_compute_output(1);
    if (!grads[0].defined() || (!want_input && !want_target)) return variable_list(2);
    const at::Tensor input_value = input.unpack();
    const at::Tensor target_value = target.unpack();
    at::Tensor grad_input, grad_target;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      if (want_input) grad_input = empty_output(input_value);
      if (want_target) grad_target = empty_output(target_value);
      bce_run(input_value, target_value, optional(weight.unpack()), optional(pos_weight.unpack()),
              grads[0], std::nullopt, optional(grad_input), optional(grad_target), std::nullopt);
    }
    return guard_double_backward({grad_input, grad_target},
                                 input_value.requires_grad() ? input_value : target_value,
                                 kBinaryCrossEntropy);
  }
};

at::Tensor bce_unreduced(const at::Tensor& input, const at::Tensor& target,
                         const OptionalTensor& weight, const OptionalTensor& pos_weight) {
  TORCH_CHECK(input.device().is_cpu() && target.device().is_cpu(),
              "fused_ce native: bce_unreduced takes CPU tensors");
  at::Tensor loss;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    loss = at::empty(input.sizes(), target.options());
    bce_run(input, target, weight, pos_weight, std::nullopt, loss, std::nullopt, std::nullopt,
            std::nullopt);
  }
  if (at::GradMode::is_enabled() && (input.requires_grad() || target.requires_grad())) {
    attach<BinaryCrossEntropyUnreducedBackward>(loss, input, target, weight, pos_weight);
  }
  return loss;
}

at::Tensor bce_scalar(const at::Tensor& input, const at::Tensor& target,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& pos_weight, bool mean) {
  TORCH_CHECK(input.device().is_cpu() && target.device().is_cpu(),
              "fused_ce native: bce_scalar takes CPU tensors");
  // Which gradients to make: decided where grad mode is the caller's.
  const bool grad_mode = at::GradMode::is_enabled();
  const bool input_grad = grad_mode && input.requires_grad();
  const bool target_grad = grad_mode && target.requires_grad();
  // 1 / numel for 'mean' (rounded once from the double quotient, as torch.full does), 1 for
  // 'sum', in the accumulation dtype.
  const int64_t numel = input.numel();
  const double scale = !mean ? 1.0
      : numel            ? 1.0 / static_cast<double>(numel)
                         : std::numeric_limits<double>::quiet_NaN();
  at::Tensor loss;
  OptionalTensor grad_input, grad_target;
  at::Tensor grad_scale;
  {
    // The views and buffers made here are internal: no autograd or view tracking for them.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::ScalarType acc = accumulation(input, target);
    grad_scale = scalar_cpu(scale, acc);
    if (input_grad) grad_input = empty_output(input);
    if (target_grad) grad_target = empty_output(target);
    const at::Tensor loss_sum = new_cpu({}, acc);
    bce_run(input, target, weight, pos_weight, grad_scale, std::nullopt, grad_input,
            grad_target, loss_sum);
    loss = scaled(loss_sum, grad_scale);
  }
  if (input_grad || target_grad) {
    auto& node =
        attach<BinaryCrossEntropyScalarBackward>(loss, input, target, weight, pos_weight);
    node.grad_scale = grad_scale;
    node.made_input = std::move(grad_input);
    node.made_target = std::move(grad_target);
  }
  return loss;
}

// The two rules above exposed as ops, for tests/test_shared_rules.py to hold them equal to
// the Python path's (the loss ops call the C++ functions directly): bce_rows_2d's views of the
// operands given (absent ones skipped), and ce_grad_scale.
std::vector<at::Tensor> bce_rows_2d_op(const at::Tensor& input, const at::Tensor& target,
                                       const OptionalTensor& weight,
                                       const OptionalTensor& pos_weight,
                                       const OptionalTensor& grad, bool loss_sum) {
  std::vector<at::Tensor> views;
  for (const auto& t : bce_rows_2d(input, target, weight, pos_weight, grad, loss_sum)) {
    if (t.has_value()) views.push_back(*t);
  }
  return views;
}

}  // namespace
}  // namespace fused_ce_native

// Registered for CompositeImplicitAutograd: the kernels run at the dispatcher's autograd keys
// and attach their autograd nodes to the loss themselves.
TORCH_LIBRARY_IMPL(fused_ce_native, CompositeImplicitAutograd, m) {
  m.impl("ce_scalar", &fused_ce_native::ce_scalar);
  m.impl("ce_unreduced", &fused_ce_native::ce_unreduced);
  m.impl("bce_scalar", &fused_ce_native::bce_scalar);
  m.impl("bce_unreduced", &fused_ce_native::bce_unreduced);
  m.impl("bce_rows_2d", &fused_ce_native::bce_rows_2d_op);
  m.impl("ce_grad_scale", &fused_ce_native::ce_grad_scale);
}
