"""The lecture's pipeline as a library: data, model, prediction (and, in :mod:`fused_ce.app.plots`,
visualisation).

The loss is a plain function taken from a flag: ``loss="torch"`` trains with
``torch.nn.functional.binary_cross_entropy_with_logits`` / ``cross_entropy``, ``loss="fused"``
with ``fused_ce``'s functions of the same names and signatures. Nothing else in the loop
changes, which is the whole swap-in story: a seed gives the same loss curve either way.

:func:`run` trains one :class:`TrainConfig`, validates every ``val_every`` epochs, tests
(accuracy, confusion matrix, misclassified samples) on the test split and on every sample, and,
given an output directory, writes ``config.json``, ``metrics.jsonl`` (one JSON object per line),
``test.json`` and ``checkpoint.pt`` (state_dict + config, see :func:`load_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._backend import BACKENDS
from ..functional import binary_cross_entropy_with_logits, cross_entropy
from ..linear import linear_binary_cross_entropy_with_logits, linear_cross_entropy
from . import data
from .data import _check_positive

TASKS = ("majority-bits", "popcount", "clusters")
LOSSES = ("fused", "torch")
OPTIMIZERS = ("adam", "sgd")

LossFunction = Callable[[Tensor, Tensor], Tensor]
Objective = Callable[["Classifier", Tensor, Tensor], tuple[Tensor, Tensor]]

# Learning rates that reach the documented accuracies with the default epochs and batch size
# (docs/training.md), per task and optimizer.
DEFAULT_LR = {
    ("majority-bits", "adam"): 0.01,
    ("majority-bits", "sgd"): 0.5,
    ("popcount", "adam"): 0.05,
    ("popcount", "sgd"): 0.5,
    ("clusters", "adam"): 0.05,
    ("clusters", "sgd"): 0.5,
}
DEFAULT_EPOCHS = {"majority-bits": 2000, "popcount": 2000, "clusters": 300}


@dataclass
class TrainConfig:
    """Everything a run depends on; saved beside the checkpoint.

    ``lr=None`` and ``epochs=None`` take the task's defaults (:data:`DEFAULT_LR`,
    :data:`DEFAULT_EPOCHS`). ``hidden > 0`` puts a tanh hidden layer of that width before the
    head. ``backend`` is passed to the fused losses (``None``: ``auto``); ``fused_linear`` fuses
    the head into the loss (see :func:`make_objective`). The cluster fields
    (``n_classes``, ``n_features``, ``samples_per_class``) apply to ``task="clusters"`` only,
    ``n_bits`` and ``all_patterns`` to the bit tasks.
    """

    task: str = "majority-bits"
    epochs: int | None = None
    batch_size: int = 64
    lr: float | None = None
    optimizer: str = "adam"
    loss: str = "fused"
    backend: str | None = None
    device: str = "auto"
    seed: int = 0
    val_every: int = 10
    normalize: bool = True
    hidden: int = 0
    n_bits: int = 10
    all_patterns: bool = False
    n_classes: int = 4
    n_features: int = 2
    samples_per_class: int = 250
    fused_linear: bool = False

    def __post_init__(self) -> None:
        _check_choice("task", self.task, TASKS)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.backend is not None:
            _check_choice("backend", self.backend, BACKENDS)
        if self.epochs is None:
            self.epochs = DEFAULT_EPOCHS[self.task]
        if self.lr is None:
            self.lr = DEFAULT_LR[self.task, self.optimizer]
        for name in ("epochs", "batch_size", "val_every", "n_bits", "n_classes", "n_features"):
            _check_positive(name, getattr(self, name))
        _check_positive("samples_per_class", self.samples_per_class)
        if self.hidden < 0:
            raise ValueError(f"hidden: expected 0 (no hidden layer) or more, got {self.hidden}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr}")
        if self.fused_linear and self.loss != "fused":
            raise ValueError(
                "fused_linear: fuses the head into fused_ce's loss; needs loss='fused'"
            )
        if self.task == "clusters" or not self.all_patterns:
            self._check_splits()

    def _check_splits(self) -> None:
        """Validation and test sets need at least one sample per class on average: a smaller
        one (one sample, or none) cannot say how well the model classifies."""
        if self.task == "clusters":
            name, classes = "samples_per_class", self.n_classes
            size = self.samples_per_class * classes
        else:
            name, size = "n_bits", 2**self.n_bits
            classes = 2 if self.task == "majority-bits" else self.n_bits + 1
        _, n_val, n_test = data.split_sizes(size, data.DEFAULT_FRACTIONS)
        if min(n_val, n_test) < classes:
            raise ValueError(
                f"{name}: {size} samples split 70/15/15 leave {n_test} for testing and {n_val} "
                f"for validation, fewer than the {classes} classes; use more"
                + ("" if self.task == "clusters" else " or all_patterns")
            )


def _check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else must be ``cpu``, ``cuda`` or
    ``cuda:N``, usable here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available here")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)"
            )
    return resolved


def make_workload(config: TrainConfig) -> data.Workload:
    """The task's data, split under ``config.seed``."""
    if config.task == "majority-bits":
        return data.majority_bits(config.n_bits, seed=config.seed, all_patterns=config.all_patterns)
    if config.task == "popcount":
        return data.popcount(config.n_bits, seed=config.seed, all_patterns=config.all_patterns)
    return data.gaussian_clusters(
        config.n_classes, config.n_features, config.samples_per_class, seed=config.seed
    )


def loss_function(config: TrainConfig, binary: bool) -> LossFunction:
    """The flag-selected loss: torch's function or fused_ce's drop-in of the same signature."""
    if config.loss == "torch":
        if binary:
            return torch.nn.functional.binary_cross_entropy_with_logits
        return torch.nn.functional.cross_entropy
    fused = binary_cross_entropy_with_logits if binary else cross_entropy
    if config.backend is None:
        return fused
    return lambda input, target: fused(input, target, backend=config.backend)


def make_objective(config: TrainConfig, binary: bool) -> Objective:
    """``objective(model, inputs, targets) -> (loss, logits)``, the logits detached (for the
    accuracy).

    By default the model computes the logits and :func:`loss_function` the loss. With
    ``config.fused_linear`` the head and the loss are one fused op
    (:func:`fused_ce.linear_cross_entropy` or
    :func:`fused_ce.linear_binary_cross_entropy_with_logits` on the model's features and head
    parameters); the logits for the accuracy are then recomputed without gradient, which costs
    nothing at these widths.
    """
    if not config.fused_linear:
        loss_fn = loss_function(config, binary)

        def objective(model: Classifier, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
            logits = model(inputs)
            return loss_fn(logits, targets), logits.detach()

        return objective

    def fused_linear_objective(
        model: Classifier, inputs: Tensor, targets: Tensor
    ) -> tuple[Tensor, Tensor]:
        features = model.features(inputs)
        weight, bias = model.head.weight, model.head.bias
        if binary:
            loss = linear_binary_cross_entropy_with_logits(
                features, weight, targets[:, None], linear_bias=bias, backend=config.backend
            )
        else:
            loss = linear_cross_entropy(
                features, weight, targets, linear_bias=bias, backend=config.backend
            )
        with torch.no_grad():
            logits = model.head(features)
        return loss, logits.squeeze(-1) if binary else logits

    return fused_linear_objective


class Standardize(nn.Module):
    """The lecture's normalisation ``(x - mu) / sigma`` with ``mu``, ``sigma`` as buffers, so a
    checkpoint carries the statistics of the data the model was trained on. Identity until
    :meth:`fit` is called."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def fit(self, inputs: Tensor) -> None:
        mean, std = data.feature_statistics(inputs)
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``Standardize -> [Linear(d, hidden) -> tanh] -> Linear`` head.

    Binary (``n_classes == 2``, ``binary=True``): one output, the logit of class 1, shape
    ``(N,)`` — the lecture's single sigmoid neuron when ``hidden == 0`` (``d`` weights + bias).
    Otherwise ``n_classes`` softmax logits, shape ``(N, n_classes)``.
    """

    def __init__(self, n_features: int, n_classes: int, hidden: int = 0, binary: bool = False):
        super().__init__()
        self.spec = {
            "n_features": n_features,
            "n_classes": n_classes,
            "hidden": hidden,
            "binary": binary,
        }
        self.binary = binary
        self.standardize = Standardize(n_features)
        self.body: nn.Module = (
            nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh()) if hidden else nn.Identity()
        )
        self.head = nn.Linear(hidden or n_features, 1 if binary else n_classes)

    def features(self, x: Tensor) -> Tensor:
        """What the head sees: ``(N, hidden or d)``."""
        return self.body(self.standardize(x))

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(self.features(x))
        return logits.squeeze(-1) if self.binary else logits

    @torch.no_grad()
    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(classes, probabilities)``: for binary, ``round(sigmoid(logit))`` (0 at exactly 0.5)
        and ``sigmoid(logit)`` ``(N,)``; otherwise the argmax and the softmax ``(N, C)``."""
        logits = self(x)
        if self.binary:
            return (logits > 0).long(), torch.sigmoid(logits)
        return logits.argmax(dim=1), torch.softmax(logits, dim=1)


def build_model(config: TrainConfig, workload: data.Workload) -> Classifier:
    """A :class:`Classifier` for the workload; normalisation fitted on the training inputs."""
    model = Classifier(workload.n_features, workload.n_classes, config.hidden, workload.binary)
    if config.normalize:
        model.standardize.fit(workload.train.inputs)
    return model


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr)
    return torch.optim.Adam(model.parameters(), lr=config.lr)


@torch.no_grad()
def validate(model: Classifier, objective: Objective, split: data.Split) -> dict[str, float]:
    """Mean loss and accuracy on a split (one forward pass; model left in eval mode)."""
    model.eval()
    loss, logits = objective(model, split.inputs, split.targets)
    predicted = (logits > 0).long() if model.binary else logits.argmax(dim=1)
    accuracy = (predicted == split.targets.long()).float().mean()
    loss_value, accuracy_value = torch.stack([loss.float(), accuracy]).tolist()
    return {"loss": loss_value, "accuracy": accuracy_value}


@dataclass
class EvaluationReport:
    """:func:`validate` plus the confusion matrix (rows: true class, columns: predicted) and
    every misclassified sample: its input (a bit string for bit workloads), target, prediction
    and the model's probability for class 1 (binary) or for its predicted class."""

    split: str
    n_samples: int
    loss: float
    accuracy: float
    confusion: list[list[int]]
    misclassified: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@torch.no_grad()
def evaluate(
    model: Classifier,
    objective: Objective,
    split: data.Split,
    workload: data.Workload,
    name: str = "test",
) -> EvaluationReport:
    """The lecture's test function: validation plus confusion matrix and misclassified list."""
    scores = validate(model, objective, split)
    predicted, probabilities = model.predict(split.inputs)
    truth = split.targets.long()
    n_classes = workload.n_classes
    confusion = torch.bincount(truth * n_classes + predicted, minlength=n_classes * n_classes)
    wrong = (predicted != truth).nonzero().flatten().cpu()
    if model.binary:
        shown = probabilities
    else:
        shown = probabilities.gather(1, predicted[:, None]).squeeze(1)
    inputs, truth, predicted, shown = (t.cpu() for t in (split.inputs, truth, predicted, shown))
    misclassified = []
    for i in wrong.tolist():
        row = inputs[i]
        misclassified.append(
            {
                "input": "".join(str(int(b)) for b in row.tolist())
                if workload.bit_inputs
                else [round(v, 4) for v in row.tolist()],
                "target": int(truth[i]),
                "predicted": int(predicted[i]),
                "probability": round(float(shown[i]), 6),
            }
        )
    return EvaluationReport(
        name,
        len(split),
        scores["loss"],
        scores["accuracy"],
        confusion.view(n_classes, n_classes).tolist(),
        misclassified,
    )


@dataclass
class RunResult:
    """What :func:`run` produced. ``history`` has one record per epoch (``train_loss`` and
    ``train_accuracy``, averaged over the epoch's batches before each update, and
    ``val_loss``/``val_accuracy`` every ``val_every`` epochs and at the last)."""

    config: TrainConfig
    model: Classifier
    workload: data.Workload
    history: list[dict[str, Any]]
    test: EvaluationReport
    all_samples: EvaluationReport
    device: str
    train_seconds: float
    out_dir: Path | None = None


def _progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar when asked for and installed (the ``train`` extra); otherwise None."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="epoch", leave=False, dynamic_ncols=True)


def train_epochs(
    model: Classifier,
    objective: Objective,
    workload: data.Workload,
    config: TrainConfig,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Mini-batch training for ``config.epochs`` epochs, shuffling under ``config.seed``.

    One host sync per epoch (the epoch's loss and accuracy), none per batch.
    """
    optimizer = _optimizer(config, model)
    train = workload.train
    n = len(train)
    device = train.inputs.device
    shuffle = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    bar = _progress_bar(config.epochs, config.task, progress)
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=shuffle).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        for begin in range(0, n, config.batch_size):
            batch = order[begin : begin + config.batch_size]
            inputs, targets = train.inputs[batch], train.targets[batch]
            loss, logits = objective(model, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                loss_sum += loss.float() * len(batch)
                predicted = (logits > 0).long() if model.binary else logits.argmax(dim=1)
                correct += (predicted == targets.long()).sum()
        mean_loss, n_correct = torch.stack([loss_sum / n, correct.float()]).tolist()
        record: dict[str, Any] = {
            "event": "epoch",
            "epoch": epoch,
            "train_loss": mean_loss,
            "train_accuracy": n_correct / n,
        }
        if epoch % config.val_every == 0 or epoch == config.epochs:
            scores = validate(model, objective, workload.val)
            record["val_loss"] = scores["loss"]
            record["val_accuracy"] = scores["accuracy"]
        record["seconds"] = round(time.perf_counter() - start, 4)
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if bar is not None:
            bar.update(1)
            if "val_loss" in record:
                bar.set_postfix(loss=f"{mean_loss:.4f}", val_acc=f"{record['val_accuracy']:.3f}")
    if bar is not None:
        bar.close()
    return history


def run(
    config: TrainConfig, out_dir: str | Path | None = None, progress: bool = False
) -> RunResult:
    """Train, validate and test one configuration; write its files under ``out_dir`` if given.

    Deterministic under ``config.seed`` on a given device: the model is initialised after
    ``torch.manual_seed(seed)`` and batches are shuffled by a generator seeded with it.
    """
    device = resolve_device(config.device)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    torch.manual_seed(config.seed)
    workload = make_workload(config)
    model = build_model(config, workload).to(device)
    workload = workload.to(device)
    objective = make_objective(config, workload.binary)

    log = (out / "metrics.jsonl").open("w") if out is not None else None
    try:

        def write(record: dict[str, Any]) -> None:
            if log is not None:
                log.write(json.dumps(record) + "\n")

        start = time.perf_counter()
        history = train_epochs(
            model, objective, workload, config, on_epoch=write, progress=progress
        )
        seconds = time.perf_counter() - start
        test_report = evaluate(model, objective, workload.test, workload, "test")
        all_report = evaluate(model, objective, workload.full, workload, "all")
        for report in (test_report, all_report):
            write(
                {
                    "event": "test",
                    "split": report.split,
                    "n_samples": report.n_samples,
                    "loss": report.loss,
                    "accuracy": report.accuracy,
                    "misclassified": len(report.misclassified),
                }
            )
    finally:
        if log is not None:
            log.close()

    result = RunResult(
        config, model, workload, history, test_report, all_report, str(device), seconds, out
    )
    if out is not None:
        save_checkpoint(out / "checkpoint.pt", model, config)
        reports = {"test": test_report.to_dict(), "all": all_report.to_dict()}
        (out / "test.json").write_text(json.dumps(reports, indent=2) + "\n")
    return result


def save_checkpoint(path: str | Path, model: Classifier, config: TrainConfig) -> None:
    """``torch.save`` of the model's state_dict (normalisation included), its architecture and
    the training config: everything :func:`load_checkpoint` needs."""
    torch.save(
        {
            "model": model.spec,
            "config": dataclasses.asdict(config),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        path,
    )


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Classifier, TrainConfig]:
    """Rebuild the model saved by :func:`save_checkpoint` (in eval mode) and its config.

    Loaded with ``weights_only=True``: a checkpoint holds tensors and plain values only.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    model = Classifier(**checkpoint["model"])
    model.load_state_dict(checkpoint["state_dict"])
    model.to(map_location).eval()
    return model, TrainConfig(**checkpoint["config"])
