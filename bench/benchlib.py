"""Shared machinery of the benchmark suite: workloads, byte and FLOP bounds, providers, ceilings
and the measurement that fills each pytest-benchmark record.

Definitions (docs/benchmarks.md has the long form):

* ``bytes_min``: the fewest bytes an op must move through memory: each input read once, each
  output written once. A training forward also writes one fp32 statistic per row (the
  log-sum-exp the backward needs); a scalar loss counts 4 bytes.
* ``lower_bound_bytes``: the memory that must be live at once: the inputs, the outputs and, for
  forward+backward, the gradients of the inputs that require grad.
* ``flops`` (fused linear ops only): ``2·N·D·V`` for the forward GEMM, ``6·N·D·V`` for
  forward+backward (logits, grad-input and grad-weight GEMMs). A design that recomputes the
  logits in backward does ``8·N·D·V`` but is credited with 6.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.metadata
import inspect
import itertools
import math
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fused_ce
from fused_ce._backend import native_available, resolve
from fused_ce._memory import peak_bytes

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
REPO = Path(__file__).resolve().parent.parent

FAMILIES = ("bce", "ce", "linear_ce", "linear_bce")

# Measuring: each case aims at about this much timed work (seconds), within these rounds. The
# reported time is the fastest round, so every case needs a few rounds for that minimum to be
# stable (one round on a busy machine is whatever the scheduler made of it).
TARGET_SECONDS = 0.15 if CUDA else 1.0
MIN_ROUNDS, MAX_ROUNDS = 5, 50
# A pass slower than this runs the fewest rounds that still give a minimum and its spread, with
# no warm-up round (slow CPU cases): the warm-up call has already compiled and loaded.
SLOW_CALL_SECONDS = 2.0
SLOW_ROUNDS = 3
# Input sets smaller than the last-level cache rotate until they span this many times it, so
# that every call reads its inputs from memory rather than from a cache the previous call warmed.
CACHE_SPAN = 3
MAX_INPUT_SETS = 32


@dataclass(frozen=True)
class Case:
    """One benchmarked computation.

    ``shape`` is ``(N, C)`` for the losses on logits (BCE logits of shape ``(N, C)``) and
    ``(N, D, V)`` for the fused linear ops (input ``(N, D)``, weight ``(V, D)``).
    ``workload`` names where the shape comes from (``majority-bits``, ``popcount``, ``grid``,
    ``llm``).
    """

    family: str
    workload: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    backward: bool

    @property
    def pass_name(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def shape_name(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def group(self) -> str:
        """pytest-benchmark group: the providers of one case side by side."""
        return f"{self.family} {self.workload} {self.shape_name} {self.dtype_name} {self.pass_name}"

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def linear(self) -> bool:
        return self.family.startswith("linear")

    def bytes_min(self) -> int:
        """Fewest bytes moved: inputs read once, outputs (and gradients) written once."""
        s = self.element_size
        if self.linear:
            n, d, v = self.shape
            target = n * 8 if self.family == "linear_ce" else n * v * s
            moved = n * d * s + v * d * s + target + n * 4
            if self.backward:
                moved += n * d * s + v * d * s  # grad_input, grad_weight
            return moved
        n, c = self.shape
        # CE: logits + int64 targets + one fp32 per row (the saved log-sum-exp).
        # BCE: logits + targets + a scalar loss.
        moved = n * c * s + n * 8 + n * 4 if self.family == "ce" else 2 * n * c * s + 4
        if self.backward:
            moved += n * c * s  # grad_logits
        return moved

    def lower_bound_bytes(self) -> int:
        """Memory that must be live at once: inputs, outputs and gradients of the inputs."""
        return self.bytes_min()

    def flops(self) -> int | None:
        """Matmul FLOPs of the fused linear ops (None for losses on logits)."""
        if not self.linear:
            return None
        n, d, v = self.shape
        return (6 if self.backward else 2) * n * d * v


@dataclass
class InputSet:
    """Positional arguments of one call and the leaves whose gradients backward fills."""

    args: tuple[Tensor, ...]
    leaves: tuple[Tensor, ...]

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.args)

    def clear_grads(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None


def make_inputs(case: Case, device: str, seed: int) -> InputSet:
    """Random inputs for ``case`` (never zeros: they can hide unwritten outputs and run faster).

    CE: standard-normal logits and uniform class targets. BCE: standard-normal logits and
    targets of 0/1 labels (majority bits) or probabilities. Linear: inputs and weights of
    standard deviation ``D**-0.25`` each, so the logits have unit variance.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = case.dtype

    def normal(*shape: int, scale: float = 1.0) -> Tensor:
        # Drawn in the target dtype and scaled in place: no fp32 temporaries of the big shapes.
        values = torch.randn(*shape, generator=gen, device=device, dtype=dt)
        return values if scale == 1.0 else values.mul_(scale)

    if case.linear:
        n, d, v = case.shape
        x = normal(n, d, scale=d**-0.25)
        w = normal(v, d, scale=d**-0.25)
        if case.family == "linear_ce":
            target = torch.randint(0, v, (n,), generator=gen, device=device)
        else:
            target = torch.rand(n, v, generator=gen, device=device, dtype=dt).round_()
        leaves = (x.requires_grad_(), w.requires_grad_()) if case.backward else ()
        return InputSet((x, w, target), leaves)
    n, c = case.shape
    logits = normal(n, c)
    if case.family == "ce":
        target = torch.randint(0, c, (n,), generator=gen, device=device)
    else:
        target = torch.rand(n, c, generator=gen, device=device, dtype=dt)
        if case.workload == "majority-bits":
            target.round_()  # 0/1 labels
    leaves = (logits.requires_grad_(),) if case.backward else ()
    return InputSet((logits, target), leaves)


# ----------------------------------------------------------------------------- providers


def reference(case: Case) -> Callable[..., Tensor]:
    """The plain-PyTorch composition the fused ops replace (what eager and compile run)."""
    return {
        "ce": _reference_ce,
        "bce": _reference_bce,
        "linear_ce": _reference_linear_ce,
        "linear_bce": _reference_linear_bce,
    }[case.family]


def _reference_ce(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target)


def _reference_bce(logits: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, target)


def _reference_linear_ce(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(x, weight), target)


def _reference_linear_bce(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(F.linear(x, weight), target)


def _fused(case: Case, backend: str, **options: str) -> Callable[..., Tensor]:
    fn = {
        "ce": fused_ce.softmax_cross_entropy,
        "bce": fused_ce.sigmoid_binary_cross_entropy,
        "linear_ce": getattr(fused_ce, "linear_cross_entropy", None),
        "linear_bce": getattr(fused_ce, "linear_binary_cross_entropy_with_logits", None),
    }[case.family]
    return lambda *args: fn(*args, backend=backend, **options)


def _compiled(case: Case) -> Callable[..., Tensor]:
    # Static in the class/feature dims, dynamic in the batch dim: one graph per (C, dtype,
    # pass) serves both batch sizes, and every graph is specialised to its class count as a
    # fixed-shape training loop would be (see configure_compile).
    compiled = torch.compile(reference(case))

    def call(*args: Tensor) -> Tensor:
        for arg in (args[0], args[-1]):  # the rows of the input and of the target
            if arg.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(arg, 0)
        return compiled(*args)

    return call


def _torch_chunked(case: Case) -> Callable[..., Tensor]:
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)


def _liger(case: Case) -> Callable[..., Tensor]:
    if case.family == "ce":
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        return LigerCrossEntropyLoss()
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: loss(w, x, t)


def _cce(case: Case) -> Callable[..., Tensor]:
    from cut_cross_entropy import linear_cross_entropy

    # Defaults, as a user calls it: filter_eps="high" skips gradient blocks it judges negligible.
    return lambda x, w, t: linear_cross_entropy(x, w, t)


@dataclass(frozen=True)
class Provider:
    """An implementation to time: ``build(case)`` returns the loss function."""

    name: str
    families: tuple[str, ...]
    build: Callable[[Case], Callable[..., Tensor]]
    devices: tuple[str, ...] = ("cpu", "cuda")
    module: str | None = None  # a peer's import name: the provider exists where it imports
    applies: Callable[[Case], bool] | None = None  # narrower than its families, with why_not
    why_not: str = ""

    def supports(self, case: Case) -> bool:
        return case.family in self.families and (self.applies is None or self.applies(case))


def _has_fused(family: str) -> bool:
    name = {
        "linear_ce": "linear_cross_entropy",
        "linear_bce": "linear_binary_cross_entropy_with_logits",
    }.get(family)
    return name is None or hasattr(fused_ce, name)


def _has_linear_path_option() -> bool:
    fn = getattr(fused_ce, "linear_cross_entropy", None)
    return fn is not None and "path" in inspect.signature(fn).parameters


ALL_PROVIDERS = (
    Provider("fused_ce-triton", FAMILIES, lambda c: _fused(c, "triton"), devices=("cuda",)),
    # The linear CE's all-in-registers Triton path (path="fused"), beside the default. Its
    # backward recomputes the logits once per feature block: meant for small D only.
    Provider(
        "fused_ce-triton-fused",
        ("linear_ce",),
        lambda c: _fused(c, "triton", path="fused"),
        devices=("cuda",),
        applies=lambda c: c.shape[1] <= 1024,
        why_not="path='fused' recomputes the logits per feature block; timed for D <= 1024",
    ),
    Provider("fused_ce-torch", FAMILIES, lambda c: _fused(c, "torch")),
    # The C++ kernels of csrc/ (CPU; listed where the extension is built).
    Provider("fused_ce-native", FAMILIES, lambda c: _fused(c, "native"), devices=("cpu",)),
    Provider("torch-eager", FAMILIES, reference),
    Provider("torch-compile", FAMILIES, _compiled),
    Provider("torch-chunked", ("linear_ce",), _torch_chunked),
    Provider("liger", ("ce", "linear_ce"), _liger, devices=("cuda",), module="liger_kernel"),
    Provider("cce", ("linear_ce",), _cce, devices=("cuda",), module="cut_cross_entropy"),
)

# Run order: the fused ops and the peers first, then torch.compile (its compile time is spent
# inside the time budget), then fused_ce's torch path on GPU; a budget cut drops the tail.
PRIORITY = {
    "fused_ce-triton": 0,
    "fused_ce-triton-fused": 0,
    "torch-eager": 0,
    "liger": 0,
    "cce": 0,
    "torch-chunked": 0,
    "torch-compile": 1,
    "fused_ce-torch": 2 if CUDA else 0,
    "fused_ce-native": 0,
}


@cache
def peer_status() -> dict[str, str]:
    """Version of each peer package, or why it is absent (recorded in machine info)."""
    status = {}
    peers = (("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy"))
    for module, dist in peers:
        try:
            importlib.import_module(module)
            status[dist] = importlib.metadata.version(dist)
        except Exception as exc:  # a peer that fails to import is reported, never fatal
            status[dist] = f"unavailable ({type(exc).__name__}: {str(exc)[:120]})"
    status["torch.nn.functional.linear_cross_entropy"] = (
        "present" if hasattr(F, "linear_cross_entropy") else "absent"
    )
    return status


def providers_for(family: str) -> list[str]:
    """Names of the providers that can run ``family`` on this machine (decided at collection)."""
    names = []
    for p in ALL_PROVIDERS:
        if family not in p.families or DEVICE not in p.devices:
            continue
        if p.name.startswith("fused_ce") and not _has_fused(family):
            continue
        if p.name == "fused_ce-triton-fused" and not _has_linear_path_option():
            continue
        if p.name == "torch-chunked" and not hasattr(F, "linear_cross_entropy"):
            continue
        if p.name == "fused_ce-native" and not native_available():
            continue
        if p.module is not None and peer_status()[p.module.replace("_", "-")].startswith("un"):
            continue
        names.append(p.name)
    return names


def provider(name: str) -> Provider:
    return next(p for p in ALL_PROVIDERS if p.name == name)


def configure_compile() -> None:
    """Give each compiled case its own graph: no recompile limit fallback to eager, and no
    automatic promotion of the class dim to dynamic when a second class count shows up."""
    config = torch._dynamo.config
    if hasattr(config, "recompile_limit"):
        config.recompile_limit = 256
    else:  # older torch
        config.cache_size_limit = 256
    config.automatic_dynamic_shapes = False


# ----------------------------------------------------------------------------- ceilings


def time_best(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Fastest of ``repeats`` runs of ``fn``, in seconds (device events on CUDA, the host
    clock on CPU): a ceiling is what the device can do, so other load must not lower it."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(times)


class Ceilings:
    """Copy bandwidth and matmul rate of this device, measured once per session.

    Copy: ``dst.copy_(src)`` of 1 GiB (GPU) or 256 MiB (CPU) of fp32, counting bytes read plus
    bytes written. Matmul: a square product of random bf16 (GPU, 8192³) or fp32 (CPU, 2048³;
    GPU fp32 8192³ when an fp32 linear case asks) operands, ``2·n³`` FLOPs. Each is the fastest
    of its repeats.
    """

    def __init__(self) -> None:
        self.copy_gbps = self._copy_gbps()
        self._matmul: dict[torch.dtype, float] = {}

    @staticmethod
    def _copy_gbps() -> float:
        numel = (1 << 28) if CUDA else (1 << 26)
        src = torch.randn(numel, device=DEVICE)
        dst = torch.empty_like(src)
        seconds = time_best(lambda: dst.copy_(src), repeats=10)
        return 2 * numel * 4 / seconds / 1e9

    def matmul_tflops(self, dtype: torch.dtype) -> float:
        if dtype not in self._matmul:
            n = 8192 if CUDA else 2048
            gen = torch.Generator(device=DEVICE).manual_seed(0)
            a = torch.randn(n, n, generator=gen, device=DEVICE).to(dtype)
            b = torch.randn(n, n, generator=gen, device=DEVICE).to(dtype)
            seconds = time_best(lambda: a @ b, repeats=10 if CUDA else 5)
            self._matmul[dtype] = 2 * n**3 / seconds / 1e12
        return self._matmul[dtype]

    def as_dict(self) -> dict[str, float]:
        info = {"copy_gbps": round(self.copy_gbps, 2)}
        for dtype, tflops in self._matmul.items():
            info[f"matmul_tflops_{str(dtype).removeprefix('torch.')}"] = round(tflops, 3)
        return info


# ----------------------------------------------------------------------------- machine info


def cache_bytes() -> int:
    """Last-level cache: the GPU's L2, or the CPU's largest cache (32 MiB when unreadable)."""
    if CUDA:
        return torch.cuda.get_device_properties(0).L2_cache_size
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        with contextlib.suppress(ValueError):
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]])
    return max(sizes, default=32 << 20)


def git_commit() -> str:
    """``FUSED_CE_COMMIT`` if set (a copy without .git), else ``git rev-parse HEAD`` (+dirty)."""
    if os.environ.get("FUSED_CE_COMMIT"):
        return os.environ["FUSED_CE_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def device_info(commit: str) -> dict[str, object]:
    """What the machine info of every results JSON carries besides pytest-benchmark's own;
    ``commit`` is read when the run starts (the checkout may move while it runs)."""
    info: dict[str, object] = {
        "device": torch.cuda.get_device_name(0) if CUDA else "cpu",
        "torch": torch.__version__,
        "fused_ce": fused_ce.__version__,
        "commit": commit,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cache_bytes": cache_bytes(),
        "peers": peer_status(),
        # What a user's call runs here: the provider the report judges.
        "auto_backend": resolve("auto", torch.empty(0, device=DEVICE)),
    }
    try:
        info["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        info["triton"] = "absent"
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_bytes"] = props.total_memory
        info["multiprocessors"] = props.multi_processor_count
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------- measuring


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def peak_extra_bytes(fn: Callable[[], object]) -> tuple[int, str]:
    """Peak memory ``fn`` allocates above what was live when it started
    (``fused_ce._memory.peak_bytes``), and how it was read."""
    method = (
        "torch.cuda.max_memory_allocated"
        if CUDA
        else "torch.profiler profile_memory (tensor allocations)"
    )
    return peak_bytes(fn, "cuda" if CUDA else "cpu"), method


def run_case(benchmark, case: Case, provider_name: str, ceilings: Ceilings) -> None:
    """Time ``provider_name`` on ``case`` with pytest-benchmark and fill ``extra_info``.

    Each timed call runs on the next of ``P`` input sets (P sized so the sets span
    ``CACHE_SPAN`` times the last-level cache: every call reads its inputs from memory); a round
    is one pass over the sets and ends with a device synchronize, and pytest-benchmark reports
    time per call. Forward+backward clears the leaves' gradients first, as a training step does.
    """
    benchmark.group = case.group
    chosen = provider(provider_name)
    if not chosen.supports(case):
        pytest.skip(f"{provider_name}: {chosen.why_not}")
    fn = chosen.build(case)
    pool: list[InputSet] = []

    def step(inputs: InputSet) -> None:
        inputs.clear_grads()
        loss = fn(*inputs.args)
        if case.backward:
            loss.backward()

    def timed_call() -> None:
        i = next(cursor)
        step(pool[i])
        if i == len(pool) - 1:
            _sync()

    try:
        pool.append(make_inputs(case, DEVICE, seed=0))
        set_bytes = pool[0].nbytes()
        # A set larger than the cache evicts itself; smaller ones rotate.
        fitting = math.ceil(CACHE_SPAN * cache_bytes() / set_bytes)
        n_sets = 1 if set_bytes >= cache_bytes() else min(MAX_INPUT_SETS, fitting)
        pool += [make_inputs(case, DEVICE, seed=i) for i in range(1, n_sets)]
        cursor: Iterator[int] = itertools.cycle(range(n_sets))
        # Warm-up call: compiles (torch.compile, Triton) and loads what is loaded lazily.
        step(pool[0])
        _sync()
        pool[0].clear_grads()
        gc.collect()
        # Second call: peak memory, and a first estimate of the time per call; a fast case
        # then sizes its rounds on one timed pass over the sets.
        start = time.perf_counter()
        peak_extra, peak_method = peak_extra_bytes(lambda: step(pool[0]))
        pass_seconds = (time.perf_counter() - start) * n_sets
        if pass_seconds < SLOW_CALL_SECONDS:
            start = time.perf_counter()
            for _ in range(n_sets):
                timed_call()
            pass_seconds = time.perf_counter() - start
        slow = pass_seconds > SLOW_CALL_SECONDS
        fitting = round(TARGET_SECONDS / pass_seconds)
        rounds = max(SLOW_ROUNDS if slow else MIN_ROUNDS, min(MAX_ROUNDS, fitting))
        benchmark.pedantic(
            timed_call, rounds=rounds, iterations=n_sets, warmup_rounds=0 if slow else 1
        )
    except torch.OutOfMemoryError as exc:
        pytest.skip(f"out of memory: {str(exc).splitlines()[0][:160]}")
    finally:
        # Free this case's inputs before the next case allocates (a failed case's traceback
        # would otherwise keep them alive through its frame).
        pool.clear()
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()

    info = benchmark.extra_info
    info.update(
        family=case.family,
        workload=case.workload,
        shape=list(case.shape),
        dtype=case.dtype_name,
        provider=provider_name,
        calls_per_round=n_sets,
        rounds=rounds,
        bytes_min=case.bytes_min(),
        lower_bound_bytes=case.lower_bound_bytes(),
        copy_gbps=round(ceilings.copy_gbps, 2),
        peak_mem_bytes=set_bytes + peak_extra,
        peak_mem_method=peak_method + ", plus the inputs' bytes",
    )
    info["pass"] = case.pass_name
    info["ratio"] = round(info["peak_mem_bytes"] / info["lower_bound_bytes"], 3)
    stats = getattr(benchmark, "stats", None)
    fastest = stats.stats.min if stats is not None else None
    if fastest:
        # The fastest round is the time (other load only ever adds to it); the spread of the
        # median above it says whether that minimum can be trusted (bench/report.py).
        info["min_s"] = fastest
        info["median_s"] = stats.stats.median
        info["spread"] = round(stats.stats.median / fastest - 1, 4)
        info["gbps"] = round(case.bytes_min() / fastest / 1e9, 3)
        info["frac_copy_bw"] = round(info["gbps"] / ceilings.copy_gbps, 4)
        flops = case.flops()
        if flops is not None:
            matmul = ceilings.matmul_tflops(case.dtype)
            info.update(
                flops=flops,
                tflops=round(flops / fastest / 1e12, 3),
                matmul_tflops=round(matmul, 3),
                frac_matmul=round(flops / fastest / 1e12 / matmul, 4),
            )
