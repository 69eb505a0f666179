"""Every Triton kernel, in the variants its launcher passes, compiles for sm_90 and sm_80 with no
GPU present, and computes no pointer offset in 32 bits (see tests/_gpu_compile.py).

The interpreter hides both classes of bug: it accepts code the GPU compiler rejects (the fp64
``tl.dot`` accumulator), and its int64 numpy arithmetic does not overflow where the compiled
kernel's i32 does (``2 * saved_stride`` beyond 2^30 rows). The compile runs in a subprocess:
this test process interprets the kernels (``TRITON_INTERPRET=1``), the check needs them
compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_kernels_compile_for_cuda_targets_without_i32_offsets():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS.parent), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, str(TESTS / "_gpu_compile.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.stdout, done.stderr[-4000:]
    report = json.loads(done.stdout)
    # The detector finds the pre-fix address of 'saved' and not the fixed one.
    assert report["probes"] == {"i32_probe": 1, "i64_probe": 0}, report["probes"]
    assert report["targets"] == ["sm_90", "sm_80"]
    assert set(report["kernels"]) == {
        "ce_forward_kernel",
        "ce_backward_kernel",
        "bce_kernel",
        "lce_forward_kernel",
        "lce_backward_input_kernel",
        "lce_backward_weight_kernel",
        "distill_forward_kernel",
        "distill_backward_kernel",
    }
    for name, entry in report["kernels"].items():
        assert entry["variants"] >= 4, name  # one per dtype at least
        assert "cubin" in entry["stages"], (name, entry["stages"])
    # Every bool flag of every kernel is compiled both ways.
    assert not report["uncovered"], report["uncovered"]
    assert not report["failures"], json.dumps(report["failures"][:5], indent=1)
    assert done.returncode == 0, done.stderr[-4000:]
