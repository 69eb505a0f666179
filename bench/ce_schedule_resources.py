"""Registers and spills of the scalar-loss CE forward under each schedule, for sm_90, on a
machine without a GPU (issue 22; read in docs/perf-notes.md).

    env -u TRITON_INTERPRET PYTHONPATH=. python bench/ce_schedule_resources.py

Records the launches ``fused_ce.launch.cross_entropy.forward`` makes for a mean's gradient
under each ``scalar_schedule`` at the LLM class counts (the recorder of tests/_gpu_compile.py:
nothing runs), compiles each variant with ``triton.compile`` for sm_90, and prints the
resource usage that ``cuobjdump --dump-resource-usage`` (shipped with Triton) reads from the
cubin: registers per thread and the stack (spilled bytes per thread). Register use decides how
many programs an SM holds, hence how many rows are in flight and whether a row kept on chip
spills.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import _gpu_compile  # noqa: E402  (tests/ is not a package)

from fused_ce._common import CEOptions  # noqa: E402
from fused_ce.launch import cross_entropy as launch_ce  # noqa: E402

CLASSES = (1 << 14, 1 << 15, 1 << 17)


def _calls():
    for schedule in launch_ce.SCALAR_SCHEDULES:
        for n_classes in CLASSES:
            for dtype in (torch.bfloat16, torch.float32):
                launch_ce.scalar_schedule = schedule
                logits = torch.zeros(1, n_classes, 1, dtype=dtype)
                launch_ce.forward(
                    logits,
                    torch.zeros(1, 1, dtype=torch.int64),
                    None,
                    CEOptions(),
                    grad_scale=torch.ones(()),
                    grad_logits=torch.empty_like(logits),
                )
                yield
    launch_ce.scalar_schedule = "loop"


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the kernels must be compiled")
    _gpu_compile.LAUNCH_CALLS = {"ce": _calls}
    kernel, variants = _gpu_compile.record_launches()["ce_forward_kernel"]
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    shown = ("ROW_ON_CHIP", "REVERSE_SECOND_READ", "BLOCK_R", "BLOCK_C")
    for signature, constexprs, attrs, options in variants:
        flags = {kernel.arg_names[k[0]]: v for k, v in constexprs.items()}
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs),
            target=GPUTarget("cuda", 90, 32),
            options=options,
        )
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run(
                [str(cuobjdump), "--dump-resource-usage", cubin.name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        resources = next(line.strip() for line in usage.splitlines() if "REG:" in line)
        picked = " ".join(f"{name}={flags[name]}" for name in shown)
        print(f"{signature['logits_ptr']} {picked} num_warps={options['num_warps']}: {resources}")


if __name__ == "__main__":
    main()
