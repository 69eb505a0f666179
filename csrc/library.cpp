// The schemas of the native ops, defined once. They live in their own namespace,
// fused_ce_native::. The kernel ops (ce_forward, ce_backward, bce) only fill the outputs they
// are given and are called from inside the Python custom ops fused_ce::*, which keep the fakes,
// autograd and torch.compile support. The loss ops (ce_scalar, ce_unreduced, bce_scalar,
// bce_unreduced) are the eager entry on CPU tensors: their autograd is in C++ (autograd.cpp,
// its own library), so a forward + backward costs one dispatcher call and one C++ node.
//
// One translation unit per CPU capability (setup.py compiles this file once per capability,
// with its flags): the kernels are headers included here, so each build parses torch's
// headers once.
#include <torch/library.h>

#include "bce.h"
#include "cross_entropy.h"
#include "distill.h"
#include "memory.h"

TORCH_LIBRARY(fused_ce_native, m) {
  // Per-row (loss, lse, saved (3, n_rows), entropy, argmax) of (n_outer, C, n_inner) logits;
  // with grad_scale (0-d) also the gradient of grad_scale * sum_n (loss_n + z_loss * v_n *
  // lse_n^2) into grad_logits (and grad_target for probability targets).
  m.def(
      "ce_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float logit_scale, float softcap, Tensor(a!) loss, "
      "Tensor(b!) lse, Tensor(c!) saved, Tensor(d!) entropy, Tensor(e!) argmax, "
      "Tensor? grad_scale, float z_loss, Tensor(f!)? grad_logits, Tensor(g!)? grad_target) -> ()");
  // dlogits (and dtarget) recomputed from the saved per-row statistics; grad_logits may be
  // logits itself (each row is read before it is written).
  m.def(
      "ce_backward(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, "
      "Tensor? weight, Tensor saved, int ignore_index, float label_smoothing, float logit_scale, "
      "float softcap, Tensor(a!) grad_logits, Tensor(b!)? grad_target) -> ()");
  // Sigmoid + BCE on 2-D (rows, cols) operands (stride 0 for broadcast ones): any of the
  // elementwise loss, its sum, and the input and target gradients of the upstream grad.
  m.def(
      "bce(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, Tensor? grad, "
      "Tensor(a!)? loss, Tensor(b!)? grad_input, Tensor(c!)? grad_target, "
      "Tensor(d!)? loss_sum) -> ()");
  // The 'mean' (mean=True) or 'sum' of loss_n + z_loss * v_n * lse_n^2 over the rows of the
  // public function's input (C), (N, C) or (N, C, d...) and target (class indices, checked
  // here, or probabilities), 0-d in the accumulation dtype, with its gradients made in the same
  // pass and handed out by the backward (eager, CPU only).
  m.def(
      "ce_scalar(Tensor input, Tensor target, Tensor? weight, bool mean, int ignore_index, "
      "float label_smoothing, float logit_scale, float softcap, float z_loss) -> Tensor");
  // reduction='none' of the same (no z-loss): the per-row loss of the batch shape.
  m.def(
      "ce_unreduced(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float logit_scale, float softcap) -> Tensor");
  // The 'mean' or 'sum' of the elementwise sigmoid + BCE loss, likewise.
  m.def(
      "bce_scalar(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "bool mean) -> Tensor");
  // reduction='none': the elementwise loss.
  m.def(
      "bce_unreduced(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight) -> Tensor");
  // The rules the loss ops apply (autograd.cpp), for the tests to compare with the Python
  // path's: BCE's (rows, cols) operand views (the operands given, in order) and the 0-d factor
  // of a CE 'mean' (mean=True) or 'sum', 1 / the divisor torch divides by.
  m.def(
      "bce_rows_2d(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "Tensor? grad, bool loss_sum) -> Tensor[]");
  m.def(
      "ce_grad_scale(Tensor input, Tensor target, Tensor? weight, int ignore_index, bool mean, "
      "float label_smoothing) -> Tensor");
  // A new uninitialised contiguous tensor like `like`, in 2 MiB pages when it is large (see
  // memory.h): the native ops' large outputs, allocated by their callers.
  m.def("empty_output(Tensor like) -> Tensor");
  // Distillation (distill.h): per-row KL(teacher || student) (beta 0) or generalized JSD
  // (0 < beta < 1) of (N, V) logits at a temperature, with the saved (6, N) statistics; the
  // backward writes the gradients of sum_n grad_loss_n * loss_n (grad_student may be student).
  m.def(
      "distill_forward(Tensor student, Tensor teacher, Tensor? valid, float temperature, "
      "float beta, Tensor(a!) loss, Tensor(b!) saved) -> ()");
  m.def(
      "distill_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? valid, "
      "Tensor saved, float temperature, float beta, Tensor(a!)? grad_student, "
      "Tensor(b!)? grad_teacher) -> ()");
}

TORCH_LIBRARY_IMPL(fused_ce_native, CPU, m) {
  m.impl("ce_forward", &fused_ce_native::ce_forward);
  m.impl("ce_backward", &fused_ce_native::ce_backward);
  m.impl("bce", &fused_ce_native::bce);
  m.impl("empty_output", &fused_ce_native::empty_output);
  m.impl("distill_forward", &fused_ce_native::distill_forward);
  m.impl("distill_backward", &fused_ce_native::distill_backward);
}
