"""Compile every Triton kernel for CUDA targets on a machine without a GPU, and read its IR.

Run as a script in a process where ``TRITON_INTERPRET`` is unset (tests/test_gpu_compile.py
does that): the kernels must be real ``JITFunction``s and the launchers must take their
compiled-mode tiles. Nothing runs on a device:

1. Each launcher of ``fused_ce.launch`` is called on small CPU tensors, over a covering set of
   its options (every value of every option, and every pair of values of two options, at least
   once), with each kernel's ``run`` replaced by a recorder. So the variants compiled are
   exactly the constexpr flags, dtypes, tiles and ``num_warps`` the launchers pass, and the
   other arguments get the specialisation Triton's JIT gives them (an int equal to 1 becomes a
   constexpr, a multiple of 16 gets ``tt.divisibility``).
2. Each distinct variant is compiled by ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", cc, 32))`` for sm_90 and sm_80, through every stage Triton has
   here, ``ptxas`` included (the wheel ships it).
3. Each TTIR is checked for pointer offsets computed in 32 bits: an ``arith`` op on i32 values
   that depend on a kernel argument or the program id (a stride, a size, a row index), in the
   def-use chain of a ``tt.addptr`` offset, can overflow beyond 2^31 elements.

Prints one JSON report; exits 1 when any variant fails to compile or has an i32 offset.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence

import torch

CUDA_TARGETS = (90, 80)

# Ops that lead out of a pointer's offset computation: loop and branch results and block
# arguments are leaves (their operands are bounds and initial values, not offsets).
_LEAF_OPS = re.compile(r"^(scf|cf|tt\.load|tt\.reduce|tt\.scan|tt\.call)")
_I32 = re.compile(r"(^|x)i32>?$")
_ARITH_INT = {"arith.muli", "arith.addi", "arith.subi", "arith.shli", "arith.divsi", "arith.remsi"}


def covering(factors: dict[str, Sequence]) -> Iterator[dict]:
    """Assignments of ``factors``: by default every value of every factor at least once (row
    ``i`` takes each factor's value ``i`` modulo its count); with ``FUSED_CE_COMPILE_PAIRS=1``,
    every pair of values of two factors at least once too (greedy all-pairs), a deeper run
    that takes minutes."""
    names = list(factors)
    if os.environ.get("FUSED_CE_COMPILE_PAIRS", "0") != "1":
        for i in range(max(len(values) for values in factors.values())):
            yield {name: factors[name][i % len(factors[name])] for name in names}
        return
    uncovered = {
        (a, va, b, vb)
        for a, b in itertools.combinations(names, 2)
        for va in factors[a]
        for vb in factors[b]
    }
    while uncovered:
        best, best_gain = None, -1
        for candidate in itertools.product(*(factors[n] for n in names)):
            row = dict(zip(names, candidate, strict=True))
            gain = sum(
                (a, row[a], b, row[b]) in uncovered for a, b in itertools.combinations(names, 2)
            )
            if gain > best_gain:
                best, best_gain = row, gain
        for a, b in itertools.combinations(names, 2):
            uncovered.discard((a, best[a], b, best[b]))
        yield best


# --- what the launchers pass --------------------------------------------------------------------


def _randn(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _ce_calls() -> Iterator[None]:
    from fused_ce._common import CEOptions
    from fused_ce.launch import cross_entropy as ce

    factors = {
        "dtype": [torch.float16, torch.bfloat16, torch.float32, torch.float64],
        "target": ["int64", "uint8", "prob"],
        "weight": [False, True],
        "smoothing": [0.0, 0.1],
        "softcap": [0.0, 3.0],
        "z_loss": [0.0, 0.1],
        "stats": [False, True],
        "grad_lse": [False, True],
        # The scalar-loss path: the forward writes the gradients, the backward rescales them.
        "scalar": [True, False],
        "logits_grad": [False, True],
        # (n_outer, C, n_inner): one row, short rows (many per program), long rows, NCHW.
        "shape": [(1, 1, 1), (64, 11, 1), (2, 5000, 1), (2, 3, 4)],
        # The scalar-loss forward's schedules (issue 22), in an order that meets the scalar
        # path in the default covering's rows (row_on_chip at row 0, l2 at row 2). Their LLM
        # rows (on chip; longer than an l2 block, re-read reversed) follow the covering rows.
        "schedule": ["row_on_chip", "loop", "l2", "loop"],
    }
    for case in covering(factors):
        ce.scalar_schedule = case["schedule"]
        n_outer, n_classes, n_inner = case["shape"]
        logits = _randn(n_outer, n_classes, n_inner, dtype=case["dtype"])
        prob = case["target"] == "prob"
        if prob:
            target = torch.softmax(_randn(n_outer, n_classes, n_inner, dtype=torch.float64), 1)
            target = target.to(case["dtype"])
        else:
            target = torch.zeros(n_outer, n_inner, dtype=getattr(torch, case["target"]))
        weight = torch.ones(n_classes, dtype=case["dtype"]) if case["weight"] else None
        options = CEOptions(-100, case["smoothing"], 1.0, case["softcap"])
        acc = torch.float64 if case["dtype"] == torch.float64 else torch.float32
        # Only a probability target can leave the logits without a gradient.
        grad_logits = torch.empty_like(logits) if case["logits_grad"] or not prob else None
        grad_target = torch.empty_like(target) if prob else None
        scalar = case["scalar"]
        _, _, saved, _, _ = ce.forward(
            logits,
            target,
            weight,
            options,
            with_stats=case["stats"],
            z_loss=case["z_loss"],
            grad_scale=torch.ones((), dtype=acc) if scalar else None,
            grad_logits=grad_logits,
            grad_target=grad_target,
        )
        rows = n_outer * n_inner
        ce.backward(
            # The upstream gradient of a 'mean' arrives as one value (0-d) or expanded.
            torch.ones((), dtype=acc) if scalar else torch.ones((), dtype=acc).expand(rows),
            torch.ones(rows, dtype=acc) if case["grad_lse"] else None,
            logits,
            target,
            weight,
            saved,
            options,
            grad_logits,
            grad_target,
            z_loss=case["z_loss"],
            upstream=torch.ones((), dtype=acc) if scalar else None,
        )
        yield
    # The LLM rows: 2^15 classes on chip in one block (32 warps), 2^17 under l2 (blocks of
    # 2^14 re-read from the row's end), bf16 and fp32.
    for schedule, n_classes, dtype in itertools.product(
        ("row_on_chip", "l2"), (1 << 15, 1 << 17), (torch.bfloat16, torch.float32)
    ):
        ce.scalar_schedule = schedule
        logits = _randn(1, n_classes, 1, dtype=dtype)
        ce.forward(
            logits,
            torch.zeros(1, 1, dtype=torch.int64),
            None,
            CEOptions(),
            grad_scale=torch.ones((), dtype=torch.float32),
            grad_logits=torch.empty_like(logits),
        )
        yield
    ce.scalar_schedule = "loop"


def _bce_calls() -> Iterator[None]:
    from fused_ce.launch import bce

    factors = {
        "dtype": [torch.float16, torch.bfloat16, torch.float32, torch.float64],
        "weight": [False, True],
        "pos_weight": [False, True],
        "outputs": ["loss", "loss_sum", "grad_input", "grad_target", "both_grads"],
        "uniform_grad": [False, True],
        "upstream": [False, True],
        "shape": [(7,), (33, 5)],
    }
    for case in covering(factors):
        shape, dtype = case["shape"], case["dtype"]
        x, t = _randn(*shape, dtype=dtype), torch.rand(shape).to(dtype)
        weight = torch.ones(shape[-1:], dtype=dtype) if case["weight"] else None
        pos_weight = torch.ones(shape[-1:], dtype=dtype) if case["pos_weight"] else None
        outputs = case["outputs"]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        grads = "grad" in outputs
        grad = None
        if grads:
            grad = torch.ones((), dtype=acc)
            grad = grad if case["uniform_grad"] else grad.expand(shape)
        bce.run(
            x,
            t,
            weight,
            pos_weight,
            grad,
            torch.empty(shape, dtype=acc) if outputs == "loss" else None,
            torch.empty(shape, dtype=dtype) if outputs in ("grad_input", "both_grads") else None,
            torch.empty(shape, dtype=dtype) if outputs in ("grad_target", "both_grads") else None,
            loss_sum=torch.empty((), dtype=acc) if outputs == "loss_sum" else None,
            upstream=torch.ones((), dtype=acc) if grads and case["upstream"] else None,
        )
        yield


def _linear_calls() -> Iterator[None]:
    from fused_ce._common import CEOptions
    from fused_ce.launch import linear_cross_entropy as lce

    factors = {
        "dtype": [torch.float16, torch.bfloat16, torch.float32, torch.float64],
        "target": ["int64", "uint8", "prob"],
        "bias": [False, True],
        "weight": [False, True],
        "smoothing": [0.0, 0.1],
        "softcap": [0.0, 3.0],
        "stats_or_grad_lse": [False, True],
        "input_grads": ["input", "both", "target"],
        "weight_grads": ["weight", "bias", "both"],
    }
    n_rows, n_classes, n_features = 5, 37, 24
    for case in covering(factors):
        dtype = case["dtype"]
        x, w = _randn(n_rows, n_features, dtype=dtype), _randn(n_classes, n_features, dtype=dtype)
        b = _randn(n_classes, dtype=dtype) if case["bias"] else None
        if case["target"] == "prob":
            target = torch.softmax(_randn(n_rows, n_classes, dtype=torch.float64), 1).to(dtype)
        else:
            target = torch.zeros(n_rows, dtype=getattr(torch, case["target"]))
        weight = torch.ones(n_classes, dtype=dtype) if case["weight"] else None
        options = CEOptions(-100, case["smoothing"], 1.0, case["softcap"])
        flag = case["stats_or_grad_lse"]
        _, _, saved, _, _ = lce.forward(x, w, b, target, weight, options, with_stats=flag)
        acc = saved.dtype
        prob = case["target"] == "prob"
        want_input = case["input_grads"] != "target" or not prob
        want_target = prob and case["input_grads"] != "input"
        want_weight = case["weight_grads"] != "bias" or b is None
        want_bias = b is not None and case["weight_grads"] != "weight"
        lce.backward(
            torch.ones(n_rows, dtype=acc),
            torch.ones(n_rows, dtype=acc) if flag else None,
            x,
            w,
            b,
            target,
            weight,
            saved,
            options,
            torch.empty_like(x) if want_input else None,
            torch.zeros(n_classes, n_features, dtype=acc) if want_weight else None,
            torch.zeros(n_classes, dtype=acc) if want_bias else None,
            torch.empty_like(target) if want_target else None,
        )
        yield


def _distill_calls() -> Iterator[None]:
    from fused_ce.launch import distill

    factors = {
        "student_dtype": [torch.float16, torch.bfloat16, torch.float32, torch.float64],
        "teacher_dtype": [torch.float32, torch.bfloat16],
        "beta": [0.0, 0.5],
        "valid": [False, True],
        "grads": ["student", "teacher", "both"],
        "layout": ["contiguous", "transposed"],
    }
    for case in covering(factors):
        shape = (5, 37)
        student = _randn(*shape, dtype=case["student_dtype"])
        teacher = _randn(*shape, dtype=case["teacher_dtype"])
        if case["layout"] == "transposed":
            student = _randn(shape[1], shape[0], dtype=case["student_dtype"]).t()
        valid = torch.ones(shape[0], dtype=torch.bool) if case["valid"] else None
        loss, saved = distill.forward(student, teacher, valid, 2.0, case["beta"])
        grads = case["grads"]
        distill.backward(
            torch.ones(shape[0], dtype=saved.dtype),
            student,
            teacher,
            valid,
            saved,
            2.0,
            case["beta"],
            torch.empty_like(student) if grads != "teacher" else None,
            torch.empty_like(teacher) if grads != "student" else None,
        )
        yield


LAUNCH_CALLS = {
    "cross_entropy": _ce_calls,
    "bce": _bce_calls,
    "linear_cross_entropy": _linear_calls,
    "distill": _distill_calls,
}


# --- recording and specialising ------------------------------------------------------------------


def _kernels() -> list:
    from triton.runtime.jit import JITFunction

    from fused_ce.kernels import bce, cross_entropy, distill, linear_cross_entropy

    found = []
    for module in (cross_entropy, bce, linear_cross_entropy, distill):
        for value in vars(module).values():
            if (
                isinstance(value, JITFunction)
                and value.fn.__module__ == module.__name__
                and value.__name__.endswith("_kernel")
            ):
                found.append(value)
    return found


_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
    torch.int8: "i8",
    torch.bool: "i1",
}


def specialise(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """``(signature, constexprs, attrs, options)`` as Triton's JIT makes them for a launch."""
    names = kernel.arg_names
    options = {k: v for k, v in kwargs.items() if k not in names}
    bound = inspect.signature(kernel.fn).bind(
        *args, **{k: v for k, v in kwargs.items() if k in names}
    )
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = bound.arguments[param.name]
        key = (index,)
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constexprs[key] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[key] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:
                signature[param.name] = "constexpr"
                constexprs[key] = 1
            else:
                signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                aligned = not (param.do_not_specialize or param.do_not_specialize_on_alignment)
                if aligned and value % 16 == 0:
                    attrs[key] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}.{param.name}: unexpected {type(value)}")
    return signature, constexprs, attrs, options


def record_launches() -> dict[str, list]:
    """Every distinct (kernel, specialisation) the launchers produce over their options."""
    kernels = _kernels()
    variants: dict[str, dict] = {k.__name__: {} for k in kernels}

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            signature, constexprs, attrs, options = specialise(kernel, args, kwargs)
            key = repr((sorted(signature.items()), sorted(constexprs.items()), attrs, options))
            variants[kernel.__name__].setdefault(key, (signature, constexprs, attrs, options))

        return run

    for kernel in kernels:
        kernel.run = recorder(kernel)
    try:
        for calls in LAUNCH_CALLS.values():
            for _ in calls():
                pass
    finally:
        for kernel in kernels:
            del kernel.run
    by_name = {k.__name__: k for k in kernels}
    return {name: (by_name[name], list(found.values())) for name, found in variants.items()}


def uncovered_flags(launches: dict) -> list[str]:
    """``kernel.FLAG=value`` for each value of a bool constexpr flag that no recorded variant
    takes: a launcher option the calls above do not reach (the covering set must then grow)."""
    missing = []
    for name, (kernel, variants) in launches.items():
        for index, param in enumerate(kernel.params):
            values = [constexprs.get((index,)) for _, constexprs, _, _ in variants]
            flags = {v for v in values if isinstance(v, bool)}  # not the ints (1 == True)
            if param.is_constexpr and flags:
                missing += [f"{name}.{param.name}={v}" for v in (True, False) if v not in flags]
    return missing


# --- the i32 offset check ------------------------------------------------------------------------

_DEF = re.compile(r"^\s*(%[\w$.-]+)(?::\d+)?\s*=\s*([\w.]+)\s+(.*)$")
_VALUE = re.compile(r"%[\w$.-]+")


def i32_offsets(ttir: str) -> list[str]:
    """Lines of ``ttir`` where an i32 ``arith`` op on a kernel argument or the program id
    feeds the offset of a ``tt.addptr`` (directly or through extensions and broadcasts)."""
    func = re.search(r"tt\.func\b[^(]*\((.*?)\)\s*(attributes|\{)", ttir, re.S)
    int_args = set(re.findall(r"(%[\w$.-]+): i(?:32|64)\b", func.group(1))) if func else set()
    defs: dict[str, tuple[str, list[str], str, str]] = {}
    uses = []
    for line in ttir.splitlines():
        match = _DEF.match(line)
        if not match:
            continue
        name, op, rest = match.groups()
        body = rest.split(" loc(")[0]
        operands_part, _, type_part = body.partition(" : ")
        operands = [v.split("#")[0] for v in _VALUE.findall(operands_part)]
        defs[name] = (op, operands, type_part.strip(), line.strip())
        if op == "tt.addptr":
            uses.append((operands[1], line.strip()))

    dynamic_memo: dict[str, bool] = {}

    def dynamic(value: str) -> bool:
        """Depends on a kernel argument, the program id or a block argument."""
        if value in dynamic_memo:
            return dynamic_memo[value]
        dynamic_memo[value] = False
        if value in int_args:
            result = True
        elif value not in defs:
            result = not value.startswith("%c")  # block arguments; %c... are constants
        else:
            op, operands, _, _ = defs[value]
            result = op == "tt.get_program_id" or any(dynamic(v) for v in operands)
        dynamic_memo[value] = result
        return result

    findings = []
    for offset, use in uses:
        stack, seen = [offset], set()
        while stack:
            value = stack.pop()
            if value in seen or value not in defs:
                continue
            seen.add(value)
            op, operands, types, line = defs[value]
            if _LEAF_OPS.match(op):
                continue
            result_type = types.split(",")[-1].strip().split(" ")[-1]
            if op in _ARITH_INT and _I32.search(result_type) and dynamic(value):
                findings.append(f"{line}  ->  {use}")
            stack.extend(operands)
    return findings


# --- compiling ----------------------------------------------------------------------------------


def compile_all() -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    started = time.perf_counter()
    report = {"triton": triton.__version__, "targets": [], "kernels": {}, "failures": []}
    launches = record_launches()
    for cc in CUDA_TARGETS:
        target = GPUTarget("cuda", cc, 32)
        report["targets"].append(f"sm_{cc}")
        for name, (kernel, variants) in launches.items():
            entry = report["kernels"].setdefault(name, {"variants": len(variants), "stages": []})
            for signature, constexprs, attrs, options in variants:
                flags = {
                    kernel.arg_names[k[0]]: str(v)
                    for k, v in constexprs.items()
                    if kernel.params[k[0]].is_constexpr
                }
                try:
                    source = ASTSource(kernel, signature, constexprs, attrs)
                    compiled = triton.compile(source, target=target, options=options)
                except Exception as error:  # every compiler error is a finding
                    report["failures"].append(
                        {"kernel": name, "target": f"sm_{cc}", "flags": flags, "error": str(error)}
                    )
                    continue
                entry["stages"] = sorted(compiled.asm)
                for finding in i32_offsets(compiled.asm["ttir"]):
                    report["failures"].append(
                        {"kernel": name, "target": f"sm_{cc}", "flags": flags, "i32": finding}
                    )
    report["uncovered"] = uncovered_flags(launches)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def probe_detector() -> dict[str, int]:
    """Findings of :func:`i32_offsets` on two probe kernels: the saved-row address as it was
    before the int64 fix (must be found) and as it is now (must not)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def i32_probe(saved_ptr, saved_stride, n_rows, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(saved_ptr + 2 * saved_stride + rows, 1.0, rows < n_rows)

    @triton.jit
    def i64_probe(saved_ptr, saved_stride, n_rows, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(saved_ptr + 2 * tl.cast(saved_stride, tl.int64) + rows, 1.0, rows < n_rows)

    found = {}
    signature = {"saved_ptr": "*fp32", "saved_stride": "i32", "n_rows": "i32", "BLOCK": "constexpr"}
    for probe in (i32_probe, i64_probe):
        source = ASTSource(probe, signature, {(3,): 128})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        found[probe.__name__] = len(i32_offsets(compiled.asm["ttir"]))
    return found


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("run with TRITON_INTERPRET unset: the kernels must be compiled", file=sys.stderr)
        return 2
    report = compile_all()
    report["probes"] = probe_detector()
    print(json.dumps(report, indent=1))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
