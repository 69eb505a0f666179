"""Time the CE kernels alone for several tile shapes on a CUDA device.

    python bench/ce_tile_sweep.py [OUT.json]

Replaces ``fused_ce.launch.cross_entropy.tile`` by each ``(BLOCK_R, BLOCK_C, num_warps)`` and
times ``launch.cross_entropy.forward`` / ``backward`` with ``triton.testing.do_bench`` at bf16
shapes (class-index targets, no options), next to a device-to-device copy measured in the same
run. Bandwidth counts the logits read (forward) and the logits read plus the gradient written
(backward). Results of a run at commit 4e9b062 (an earlier launch signature) are in
``bench/results/h200/ce_tile_sweep.json`` and read in docs/perf-notes.md.
"""

from __future__ import annotations

import functools
import json
import sys

import torch
import triton
import triton.testing

import fused_ce.launch.cross_entropy as launch
from fused_ce._common import CEOptions

SHAPES = [(8192, 32768), (16384, 131072)]
TILES = [
    None,  # the launcher's own choice
    (1, 4096, 8),
    (1, 8192, 8),
    (1, 8192, 16),
    (1, 16384, 16),
    (2, 8192, 16),
    (1, 16384, 32),
    (4, 2048, 8),
    (1, 32768, 32),
]


def _copy_ms(n_bytes: int, device: str) -> float:
    src = torch.empty(n_bytes, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return triton.testing.do_bench(functools.partial(dst.copy_, src))


def main(out_path: str | None) -> None:
    device = "cuda"
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rows": [],
    }
    copy_bytes = 1 << 30
    result["copy_TBps_rw"] = 2 * copy_bytes / _copy_ms(copy_bytes, device) / 1e9
    default_tile = launch.tile
    for n_rows, n_classes in SHAPES:
        torch.manual_seed(0)
        logits = torch.randn(n_rows, n_classes, device=device, dtype=torch.bfloat16).unsqueeze(-1)
        target = torch.randint(0, n_classes, (n_rows, 1), device=device)
        grad_loss = torch.full((n_rows,), 1.0 / n_rows, device=device)
        grad_logits = torch.empty_like(logits)
        n_bytes = logits.numel() * logits.element_size()
        for tile in TILES:
            launch.tile = default_tile if tile is None else (lambda r, c, tile=tile: tile)
            _, _, saved, _, _ = launch.forward(logits, target, None, CEOptions())
            fwd = triton.testing.do_bench(
                functools.partial(launch.forward, logits, target, None, CEOptions())
            )
            bwd = triton.testing.do_bench(
                functools.partial(
                    launch.backward,
                    *(grad_loss, None, logits, target, None, saved, CEOptions(), grad_logits, None),
                )
            )
            row = {
                "N": n_rows,
                "C": n_classes,
                "cfg": tile or "default",
                "fwd_ms": fwd,
                "bwd_ms": bwd,
                "fwd_TBps": n_bytes / fwd / 1e9,
                "bwd_TBps": 2 * n_bytes / bwd / 1e9,
            }
            result["rows"].append(row)
            print(row, flush=True)
    launch.tile = default_tile
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
