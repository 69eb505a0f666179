"""Check the C++ launcher's parameter packing against what Triton compiled, with no GPU.

Run as a script with ``TRITON_INTERPRET`` unset (tests/test_cuda_launch.py does that). Every
variant the launchers of ``fused_ce.launch`` produce (recorded as tests/_gpu_compile.py records
them) is compiled for sm_90; for each, the parameters ``fused_ce.cuda_launch.kernel_params``
derives from the compiled signature, laid out by the C++ packer
(``fused_ce_native::cuda_param_layout``), must match the ``.entry`` parameters of the PTX
Triton generated: their number, each one's size and kind (pointer, integer, float), and each
one's byte offset with every parameter at its natural alignment (as the driver reads them).

Prints one JSON report; exits 1 on any mismatch.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import torch

# The PTX scalar types -> (size in bytes, kind as the packer's type characters say it).
_PTX = {
    "u64": (8, "int"),
    "b64": (8, "int"),
    "s64": (8, "int"),
    "f64": (8, "float"),
    "u32": (4, "int"),
    "b32": (4, "int"),
    "s32": (4, "int"),
    "f32": (4, "float"),
    "u16": (2, "int"),
    "b16": (2, "int"),
    "s16": (2, "int"),
    "u8": (1, "int"),
    "b8": (1, "int"),
    "s8": (1, "int"),
}
_KINDS = {"O": "pointer", "f": "float", "d": "float"}
_PARAM = re.compile(r"\.param\s+\.(\w+)((?:\s+\.ptr)?)[^,)]*?\s+([\w$]+_param_\d+)")


def ptx_params(ptx: str, name: str) -> list[tuple[int, str]]:
    """(size, kind) of each parameter of the ``.entry name`` in ``ptx``, in order."""
    start = ptx.index(f".entry {name}(")
    body = ptx[start : ptx.index(")", start)]
    params = []
    for ptx_type, ptr, _ in _PARAM.findall(body):
        size, kind = _PTX[ptx_type]
        params.append((size, "pointer" if ptr.strip() else kind))
    return params


def natural_offsets(sizes: list[int]) -> list[int]:
    offsets, offset = [], 0
    for size in sizes:
        offset = (offset + size - 1) // size * size
        offsets.append(offset)
        offset += size
    return offsets


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("run with TRITON_INTERPRET unset: the kernels must be compiled", file=sys.stderr)
        return 2
    import triton
    from _gpu_compile import record_launches
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import fused_ce
    from fused_ce.cuda_launch import kernel_params

    if not fused_ce.native.available():
        print(f"native extension unavailable: {fused_ce.native.unavailable_reason()}")
        return 2
    layout_op = torch.ops.fused_ce_native.cuda_param_layout
    started = time.perf_counter()
    report = {"triton": triton.__version__, "target": "sm_90", "kernels": {}, "mismatches": []}
    for name, (kernel, variants) in record_launches().items():
        checked = 0
        for signature, constexprs, attrs, options in variants:
            source = ASTSource(kernel, signature, constexprs, attrs)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            types = "".join(kind for _, kind in kernel_params(compiled))
            packed = layout_op(types)
            sizes, offsets = packed[1:-1:2], packed[0:-1:2]
            expected = ptx_params(compiled.asm["ptx"], compiled.metadata.name)
            ours = [(size, _KINDS.get(t, "int")) for size, t in zip(sizes, types, strict=True)]
            if ours != expected or offsets != natural_offsets([s for s, _ in expected]):
                report["mismatches"].append(
                    {"kernel": name, "types": types, "packed": packed, "ptx": expected}
                )
            checked += 1
        report["kernels"][name] = {"variants": checked}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))
    return 1 if report["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
