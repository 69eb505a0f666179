"""Run a test case in a child Python process.

A CUDA device-side assert (``torch._assert_async`` failing on the GPU: an out-of-range class
index) leaves the process's CUDA context unusable: every later CUDA call in it fails. On a
GPU, a pytest worker that ran such a case failed all of its later CUDA tests (42 failures in
one run on an H200). Cases that expect the assert therefore run it in a child, which fails,
and the test checks how it failed."""

from __future__ import annotations

import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def run_in_child(module: str, function: str, *args: object) -> subprocess.CompletedProcess:
    """``tests/<module>.py``'s ``function(*args)`` in a child Python (the tests and the
    project on its path, this environment otherwise), then a CUDA synchronize when CUDA is
    there, so an asynchronous device error surfaces in the child. Returns the finished
    process (its output captured as text)."""
    code = (
        f"import torch, {module}\n"
        f"{module}.{function}(*{args!r})\n"
        "if torch.cuda.is_available(): torch.cuda.synchronize()\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )


def expect_child_failure(module: str, function: str, *args: object, message: str) -> None:
    """Run ``function(*args)`` as :func:`run_in_child` does and assert that it failed with
    ``message`` in its error output (for a CUDA device-side assert: ``"device-side assert"``)."""
    done = run_in_child(module, function, *args)
    assert done.returncode != 0, f"{function}{args}: expected a failure, the call succeeded"
    assert message in done.stderr, f"{function}{args}: {message!r} not in:\n{done.stderr[-3000:]}"
