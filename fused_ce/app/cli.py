"""The ``fused-ce`` console script.

``fused-ce train {majority-bits,popcount,clusters}`` runs the lecture's pipeline (data, model,
prediction, visualisation) with the fused losses or torch's (``--loss``) and writes its logs,
checkpoint and plots under ``--out``. ``fused-ce check`` compares every fused op with PyTorch.

Bad arguments print a message naming the argument and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import __version__
from .._backend import BACKENDS, resolve
from .train import (
    DEFAULT_EPOCHS,
    LOSSES,
    OPTIMIZERS,
    TASKS,
    RunResult,
    TrainConfig,
    resolve_device,
    run,
)

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
MAX_BITS = 20


def _fail(command: str, message: str) -> int:
    """A bad-argument exit: one line on stderr, status 2 (as argparse)."""
    print(f"{command}: error: {message}", file=sys.stderr)
    return 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _bits(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_BITS:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_BITS} (all 2^bits patterns are generated), got {value}"
        )
    return value


def _device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, usable on this machine; the message of any
    other name says what the command accepts, not every device type torch knows."""
    try:
        resolve_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("device: ")) from None
    return text


def _train_parser(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("training")
    group.add_argument(
        "--epochs",
        type=_positive_int,
        help=f"default: {DEFAULT_EPOCHS['popcount']}, {DEFAULT_EPOCHS['clusters']} for clusters",
    )
    group.add_argument("--batch-size", type=_positive_int, default=64, help="default: 64")
    group.add_argument(
        "--lr", type=_positive_float, help="learning rate (default: tuned per task and optimizer)"
    )
    group.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="default: adam")
    group.add_argument(
        "--loss",
        choices=LOSSES,
        default="fused",
        help="fused_ce's loss or torch.nn.functional's (default: fused)",
    )
    group.add_argument(
        "--backend",
        choices=BACKENDS,
        help="backend of the fused loss (default: auto: Triton on CUDA, the native C++ kernels "
        "on CPU when built, else torch)",
    )
    group.add_argument(
        "--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N (default: auto)"
    )
    group.add_argument("--seed", type=int, default=0, help="default: 0")
    group.add_argument(
        "--val-every", type=_positive_int, default=10, help="validate every K epochs (default: 10)"
    )
    group.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="standardise inputs (x - mu) / sigma with training-set statistics (default: on)",
    )
    group.add_argument(
        "--hidden",
        type=_non_negative_int,
        default=0,
        help="width of a tanh hidden layer (default: 0, no hidden layer)",
    )
    group.add_argument(
        "--fused-linear",
        action="store_true",
        help="fuse the model's last Linear layer into the loss (fused_ce.linear_cross_entropy / "
        "linear_binary_cross_entropy_with_logits; needs --loss fused)",
    )
    group.add_argument("--out", type=Path, help="output directory (default: runs/<task>)")
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    bits = argparse.ArgumentParser(add_help=False)
    bit_group = bits.add_argument_group("bit patterns")
    bit_group.add_argument("--bits", type=_bits, default=10, help="default: 10")
    bit_group.add_argument(
        "--all-patterns",
        action="store_true",
        help="train, validate and test on all 2^bits patterns (default: 70/15/15 split)",
    )
    clusters = argparse.ArgumentParser(add_help=False)
    cluster_group = clusters.add_argument_group("clusters")
    cluster_group.add_argument("--classes", type=_positive_int, default=4, help="default: 4")
    cluster_group.add_argument(
        "--features", type=_positive_int, default=2, help="dimensions (default: 2)"
    )
    cluster_group.add_argument(
        "--samples-per-class", type=_positive_int, default=250, help="default: 250"
    )

    descriptions = {
        "majority-bits": "One sigmoid neuron (10 inputs + bias) with binary cross-entropy: "
        "is the majority of the bits 1?",
        "popcount": "A softmax classifier with cross-entropy: how many bits are 1?",
        "clusters": "A softmax classifier with cross-entropy on Gaussian clusters.",
    }
    train = subparsers.add_parser(
        "train",
        help="train a model on a workload",
        description="Train, test and plot one of the tasks below.",
        epilog="Each task's options (epochs, loss, device, --out, ...):\n"
        "  fused-ce train TASK --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tasks = train.add_subparsers(dest="task", metavar="TASK", required=True, title="tasks")
    for task in TASKS:
        parents = [common, clusters if task == "clusters" else bits]
        tasks.add_parser(
            task,
            parents=parents,
            help=descriptions[task],
            description=f"{descriptions[task]} Default epochs: {DEFAULT_EPOCHS[task]}.",
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``fused-ce`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="fused-ce", description="fused_ce: fused sigmoid/softmax cross-entropy for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _train_parser(subparsers)
    check = subparsers.add_parser(
        "check",
        help="compare every fused op with PyTorch",
        description="Compare every fused op and its gradients with PyTorch's function in "
        "float64, on random inputs, for each backend available here.",
    )
    check.add_argument(
        "--device",
        choices=("all", "cpu", "cuda"),
        default="all",
        help="all: CPU and CUDA when present (default)",
    )
    check.add_argument(
        "--dtype",
        dest="dtypes",
        action="append",
        choices=tuple(DTYPES),
        help="repeatable (default: float32, plus bfloat16 on CUDA)",
    )
    check.add_argument("--seed", type=int, default=0, help="default: 0")
    return parser


# TrainConfig fields that come from a differently named option.
_OPTION_OF_FIELD = {"n_bits": "--bits", "n_classes": "--classes", "n_features": "--features"}


def _writable(directory: Path) -> str | None:
    """None when a file can be created in ``directory``; otherwise why not."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory):
            return None
    except OSError as error:
        return error.strerror or str(error)


def _plot(result: RunResult, out: Path) -> str:
    """The run's plots, or how to get them: matplotlib is the ``train`` extra, and a plain
    ``pip install`` of the library does not bring it."""
    try:
        from .plots import plot_run

        return ", ".join(str(p) for p in plot_run(result, out))
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("matplotlib"):
            raise
        return (
            "not drawn, matplotlib is not installed (pip install 'fused_ce[train]', then run again)"
        )


def _train(args: argparse.Namespace) -> int:
    command = f"fused-ce train {args.task}"
    if args.fused_linear and args.loss != "fused":
        return _fail(command, "argument --fused-linear: needs --loss fused")
    if args.backend is not None:
        if args.loss != "fused":
            return _fail(command, "argument --backend: applies to --loss fused only")
        try:
            resolve(args.backend, torch.empty(0, device=resolve_device(args.device)))
        except RuntimeError as error:
            return _fail(command, f"argument --backend: {error}")
    try:
        config = _config(args)
    except ValueError as error:
        field, _, message = str(error).partition(": ")
        option = _OPTION_OF_FIELD.get(field, "--" + field.replace("_", "-"))
        return _fail(command, f"argument {option}: {message}")
    out = args.out if args.out is not None else Path("runs") / args.task
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return _fail(command, f"argument --out: cannot create {str(out)!r}: {error.strerror}")
    reason = _writable(out)
    if reason is not None:
        return _fail(command, f"argument --out: cannot write in {str(out)!r}: {reason}")
    if resolve_device(args.device).type == "cpu":
        # Every op here is a few microseconds on a 10-to-100-wide model: OpenMP threads only
        # add synchronisation, which costs several times the run when other processes share the
        # cores.
        torch.set_num_threads(1)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    result = run(config, out, progress=progress)
    _report(result, out)
    print(f"plots: {_plot(result, out)}")
    return 0


def _config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        task=args.task,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        loss=args.loss,
        backend=args.backend,
        device=args.device,
        seed=args.seed,
        val_every=args.val_every,
        normalize=args.normalize,
        hidden=args.hidden,
        fused_linear=args.fused_linear,
        **(
            {
                "n_classes": args.classes,
                "n_features": args.features,
                "samples_per_class": args.samples_per_class,
            }
            if args.task == "clusters"
            else {"n_bits": args.bits, "all_patterns": args.all_patterns}
        ),
    )


def _report(result: RunResult, out: Path) -> None:
    """The run's results on stdout: accuracy on the test split and on every sample."""
    config, clusters = result.config, result.config.task == "clusters"
    test, every = result.test, result.all_samples
    noun = "samples" if clusters else "patterns"
    print(
        f"{config.task}: {config.epochs} epochs in {result.train_seconds:.1f} s on {result.device} "
        f"(loss {config.loss}{', fused linear' if config.fused_linear else ''}, "
        f"{config.optimizer}, lr {config.lr:g}, batch {config.batch_size})"
    )
    correct = round(test.accuracy * test.n_samples)
    print(f"test accuracy: {test.accuracy:.2%} ({correct}/{test.n_samples} {noun})")
    correct = round(every.accuracy * every.n_samples)
    print(f"all {every.n_samples} {noun}: {every.accuracy:.2%} ({correct}/{every.n_samples})")
    print(f"confusion matrix (rows: true class, columns: predicted): {every.confusion}")
    if every.misclassified:
        shown = ", ".join(
            f"{m['input']}->{m['predicted']} (target {m['target']})"
            for m in every.misclassified[:8]
        )
        more = len(every.misclassified) - 8
        print(f"misclassified: {shown}" + (f" and {more} more" if more > 0 else ""))
    print(f"logs and checkpoint: {out / 'metrics.jsonl'}, {out / 'checkpoint.pt'}")


def _check(args: argparse.Namespace) -> int:
    from .check import format_table, native_note, run_checks, triton_note

    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        return _fail("fused-ce check", "argument --device: CUDA is not available here")
    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and has_cuda:
        devices.append(torch.device("cuda"))
    names = args.dtypes or (["float32", "bfloat16"] if has_cuda else ["float32"])
    with warnings.catch_warnings():
        # The Triton interpreter evaluates masked-off lanes in numpy (log(0) of padding).
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\..*")
        results = run_checks(devices, [DTYPES[name] for name in dict.fromkeys(names)], args.seed)
    print(format_table(results))
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed}/{len(results)} within tolerance")
    triton = triton_note(checked="triton" in {r.backend for r in results})
    if triton is not None:
        print(f"({triton})")
    print(native_note())
    for device in devices:
        print(f"backend='auto' runs {resolve('auto', torch.empty(0, device=device))} on {device}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fused-ce`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse has printed usage and the message (status 2), or --help/--version (0).
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        if args.command == "check":
            return _check(args)
        return _train(args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (`fused-ce ... | head`): point it at devnull so the interpreter's
        # final flush does not raise again, as the Python docs recommend.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
