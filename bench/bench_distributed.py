"""Vocab-parallel cross-entropy timed on a real process group, beside the single-process op.

    python bench/bench_distributed.py                       # CPU: 2 gloo ranks, 1 thread each
    python bench/bench_distributed.py --world 4 --device cuda  # NCCL, one GPU per rank

Each workload (softmax CE on ``N x C`` logits; the linear head ``N x D`` by ``C x D``) runs
forward + backward with ``reduction='mean'``:

* ``single, T threads``: ``fused_ce.cross_entropy`` / ``linear_cross_entropy`` on the whole
  logits (head) in this process, with T = 1 and T = world threads (the same cores the ranks
  use);
* ``vocab-parallel, world ranks``: ``fused_ce.distributed`` on each rank's ``C / world``
  classes, timed on rank 0 between barriers (so it includes waiting for the slowest rank and
  the collectives).

The best of ``--repeats`` calls after a warm-up is reported, with the bytes the forward's two
all-gathers (the fixed-size header, then the statistics) move per rank. On a shared machine
the figures are noisy: compare columns of one run only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _inputs(args, device: str, start: int = 0, size: int | None = None):
    """The workload's tensors (the class slice ``[start, start + size)`` when given)."""
    size = args.classes if size is None else size
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, args.classes, (args.rows,), generator=gen).to(device)
    if args.workload == "ce":
        logits = torch.randn(args.rows, args.classes, generator=gen)[:, start : start + size]
        return (logits.contiguous().to(device).requires_grad_(), target)
    x = torch.randn(args.rows, args.features, generator=gen) / args.features**0.5
    w = torch.randn(args.classes, args.features, generator=gen)[start : start + size]
    return (x.to(device).requires_grad_(), w.contiguous().to(device).requires_grad_(), target)


def _call(args, tensors, distributed: bool):
    import fused_ce
    from fused_ce import distributed as fd

    if args.workload == "ce":
        fn = fd.vocab_parallel_cross_entropy if distributed else fused_ce.cross_entropy
        return fn(*tensors, backend=args.backend)
    fn = fd.vocab_parallel_linear_cross_entropy if distributed else fused_ce.linear_cross_entropy
    return fn(*tensors, backend=args.backend)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(args, tensors, device: str, distributed: bool) -> float:
    best = float("inf")
    for repeat in range(args.repeats + 1):
        for t in tensors:
            t.grad = None
        if distributed:
            dist.barrier()
        _sync(device)
        begin = time.perf_counter()
        _call(args, tensors, distributed).backward()
        _sync(device)
        if distributed:
            dist.barrier()
        if repeat:  # the first call warms up
            best = min(best, time.perf_counter() - begin)
    return best


def _rank(rank: int, args, init: str, out: str) -> None:
    torch.set_num_threads(1)
    device = f"cuda:{rank}" if args.device == "cuda" else "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if args.device == "cuda" else "gloo",
        init_method=f"file://{init}",
        rank=rank,
        world_size=args.world,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        from fused_ce.distributed import shard_range

        start, size = shard_range(args.classes)
        seconds = _time(args, _inputs(args, device, start, size), device, distributed=True)
        if rank == 0:
            with open(out, "w") as file:
                json.dump({"seconds": seconds}, file)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("ce", "linear", "both"), default="both")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=32768)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", default=None, help="fused_ce backend (default: auto)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        parser.error(f"--device cuda needs {args.world} GPUs, found {torch.cuda.device_count()}")

    import torch.multiprocessing as mp

    workloads = ("ce", "linear") if args.workload == "both" else (args.workload,)
    device = "cuda:0" if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {args.device}, {args.rows} rows x {args.classes} classes")
    print("| workload | provider | ms (fwd+bwd, best) |")
    print("| --- | --- | --- |")
    for workload in workloads:
        args.workload = workload
        shape = f"{args.rows} x {args.classes}"
        if workload == "linear":
            shape = f"{args.rows} x {args.features} x {args.classes}"
        threads = (1, args.world) if args.device == "cpu" else (torch.get_num_threads(),)
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            seconds = _time(args, _inputs(args, device), device, distributed=False)
            print(f"| {workload} {shape} | single, {n_threads} threads | {seconds * 1e3:.1f} |")
        with tempfile.TemporaryDirectory() as workdir:
            out = os.path.join(workdir, "result.json")
            mp.start_processes(
                _rank,
                args=(args, os.path.join(workdir, "init"), out),
                nprocs=args.world,
                start_method="spawn",
            )
            with open(out) as file:
                seconds = json.load(file)["seconds"]
        print(
            f"| {workload} {shape} | vocab-parallel, {args.world} ranks "
            f"({args.device}) | {seconds * 1e3:.1f} |"
        )
    # Per rank: the 512-byte header, then 3 fp32 statistics per row (padded to 8 bytes).
    statistics = -(-args.rows * 3 * 4 // 8) * 8
    print(
        f"\nforward exchange: two all_gathers per rank, a 512-byte header and {statistics} "
        f"bytes of statistics ({args.rows} rows)"
    )


if __name__ == "__main__":
    main()
