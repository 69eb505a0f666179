"""The pipeline's visualisation step: PNG plots of a training run (matplotlib, no screen).

matplotlib is imported inside the functions, so ``import fused_ce`` stays cheap and works
without the ``train`` extra. Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no
global backend switch), which needs no display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .data import Workload
    from .train import Classifier, RunResult


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, ncols)


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


def plot_history(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss and accuracy per epoch: train (every epoch) and validation (where measured)."""
    figure, (loss_ax, acc_ax) = _figure(10, 3.8, ncols=2)
    epochs = [r["epoch"] for r in history]
    validated = [r for r in history if "val_loss" in r]
    val_epochs = [r["epoch"] for r in validated]
    loss_ax.plot(epochs, [r["train_loss"] for r in history], label="train")
    loss_ax.plot(val_epochs, [r["val_loss"] for r in validated], "o-", ms=2, label="validation")
    loss_ax.set(xlabel="epoch", ylabel="loss (cross-entropy)", yscale="log", title="loss")
    acc_ax.plot(epochs, [r["train_accuracy"] for r in history], label="train")
    acc_ax.plot(val_epochs, [r["val_accuracy"] for r in validated], "o-", ms=2, label="validation")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def raw_input_weights(model: Classifier) -> tuple[torch.Tensor, torch.Tensor]:
    """The head of a model without hidden layer, folded through the normalisation, as weights
    ``(outputs, d)`` and bias ``(outputs,)`` on the raw inputs:
    ``W (x - mu) / sigma + b = (W / sigma) x + (b - W mu / sigma)``."""
    if model.spec["hidden"]:
        raise ValueError("model: raw-input weights exist only for a model without hidden layer")
    weight = model.head.weight.detach().cpu().double()
    bias = model.head.bias.detach().cpu().double()
    mean = model.standardize.mean.cpu().double()
    std = model.standardize.std.cpu().double()
    return weight / std, bias - weight @ (mean / std)


def plot_weights(model: Classifier, path: str | Path) -> Path:
    """The learned weights and bias.

    Without hidden layer they are shown on the raw inputs (:func:`raw_input_weights`): for the
    single sigmoid neuron a bar per input bit plus the bias, and the threshold ``-b / mean(w)``
    in ones; for a softmax head a heat map with one row per class. With a hidden layer, the
    head's weights over the hidden units.
    """
    if model.spec["hidden"]:
        weight = model.head.weight.detach().cpu().double()
        bias = model.head.bias.detach().cpu().double()
        columns, where = "hidden unit", "the hidden units"
    else:
        weight, bias = raw_input_weights(model)
        columns, where = "input", "the raw inputs"
    if model.binary:
        figure, ax = _figure(7, 3.8)
        values = torch.cat([weight[0], bias]).tolist()
        labels = [f"w{j + 1}" for j in range(weight.shape[1])] + ["bias"]
        colors = ["tab:blue"] * weight.shape[1] + ["tab:orange"]
        ax.bar(labels, values, color=colors)
        ax.axhline(0, color="black", lw=0.8)
        title = f"learned weights and bias (on {where})"
        if not model.spec["hidden"]:
            threshold = -float(bias[0]) / float(weight.mean())
            title += f"\nfires above -b / mean(w) = {threshold:.2f} ones"
        ax.set(ylabel="value", title=title)
        ax.grid(axis="y", alpha=0.3)
        return _save(figure, path)
    figure, ax = _figure(8, 5)
    table = torch.cat([weight, bias[:, None]], dim=1)
    limit = float(table.abs().max()) or 1.0
    image = ax.imshow(table.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(table.shape[1]))
    ax.set_xticklabels([str(j + 1) for j in range(weight.shape[1])] + ["bias"])
    ax.set(xlabel=columns, ylabel="class", title=f"learned weights and bias (on {where})")
    figure.colorbar(image, ax=ax)
    return _save(figure, path)


def plot_probability_vs_ones(model: Classifier, workload: Workload, path: str | Path) -> Path:
    """Binary bit workloads: the predicted probability ``sigmoid(net)`` of every pattern against
    its count of ones, with the 0.5 threshold; markers show the true label."""
    if not (model.binary and workload.bit_inputs):
        raise ValueError("model: needs a binary model on a bit workload (majority bits)")
    _, probability = model.predict(workload.full.inputs)
    ones = workload.full.inputs.sum(dim=1).cpu()
    labels = workload.full.targets.cpu()
    probability = probability.cpu()
    # A small deterministic jitter separates the many patterns that share a count of ones.
    jitter = (torch.arange(len(ones)) % 17 - 8) / 40
    figure, ax = _figure(7, 4)
    for label, color in ((0, "tab:blue"), (1, "tab:red")):
        chosen = labels == label
        ax.scatter(
            (ones + jitter)[chosen].numpy(),
            probability[chosen].numpy(),
            s=6,
            alpha=0.5,
            color=color,
            label=f"label {label}",
        )
    ax.axhline(0.5, color="gray", ls="--", lw=1, label="threshold 0.5")
    ax.set(
        xlabel="number of ones in the pattern",
        ylabel="predicted probability of 1",
        title=f"all {len(ones)} patterns",
        xticks=range(workload.n_features + 1),
    )
    ax.legend(loc="center right")
    ax.grid(alpha=0.3)
    return _save(figure, path)


def plot_confusion(confusion: Sequence[Sequence[int]], path: str | Path, title: str) -> Path:
    """A confusion matrix (rows: true class, columns: predicted) with counts in the cells."""
    figure, ax = _figure(6, 5)
    matrix = torch.tensor(confusion, dtype=torch.float64)
    image = ax.imshow(matrix.numpy(), cmap="Blues")
    n = matrix.shape[0]
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    figure.colorbar(image, ax=ax)
    return _save(figure, path)


def plot_clusters(model: Classifier, workload: Workload, path: str | Path) -> Path:
    """Two-dimensional clusters: samples coloured by class over the model's decision regions,
    misclassified samples circled."""
    if workload.n_features != 2:
        raise ValueError(f"workload: needs 2 features to draw, got {workload.n_features}")
    inputs = workload.full.inputs.cpu()
    targets = workload.full.targets.cpu()
    low, high = inputs.min(dim=0).values - 1, inputs.max(dim=0).values + 1
    gx, gy = torch.meshgrid(
        torch.linspace(float(low[0]), float(high[0]), 200),
        torch.linspace(float(low[1]), float(high[1]), 200),
        indexing="xy",
    )
    grid = torch.stack([gx.flatten(), gy.flatten()], dim=1)
    device = workload.full.inputs.device
    regions, _ = model.predict(grid.to(device))
    predicted, _ = model.predict(workload.full.inputs)
    predicted = predicted.cpu()
    figure, ax = _figure(6, 5)
    ax.contourf(
        gx.numpy(),
        gy.numpy(),
        regions.cpu().view(gx.shape).numpy(),
        levels=[k - 0.5 for k in range(workload.n_classes + 1)],
        cmap="tab10",
        vmin=0,
        vmax=9,
        alpha=0.25,
    )
    ax.scatter(*inputs.T.numpy(), c=targets.numpy(), cmap="tab10", vmin=0, vmax=9, s=6)
    wrong = predicted != targets
    ax.scatter(*inputs[wrong].T.numpy(), s=40, facecolors="none", edgecolors="black", lw=0.8)
    ax.set(xlabel="x1", ylabel="x2", title=f"decision regions, {int(wrong.sum())} misclassified")
    return _save(figure, path)


def plot_sigmoid(path: str | Path) -> Path:
    """The lecture's sigmoid ``o = 1 / (1 + e^-x)`` and its derivative ``o (1 - o)`` on
    ``[-10, 10]``; the derivative peaks at 0.25 at ``x = 0``."""
    x = torch.linspace(-10, 10, 401, dtype=torch.float64)
    o = torch.sigmoid(x)
    figure, ax = _figure(7, 4)
    ax.plot(x.numpy(), o.numpy(), label="sigmoid o = 1 / (1 + exp(-x))")
    ax.plot(x.numpy(), (o * (1 - o)).numpy(), label="derivative o (1 - o)")
    ax.plot([0], [0.25], "ko")
    ax.annotate("max 0.25 at x = 0", (0, 0.25), xytext=(1.0, 0.32))
    ax.set(xlabel="x (net input)", ylabel="value", title="sigmoid and its derivative")
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")
    return _save(figure, path)


def plot_run(result: RunResult, out_dir: str | Path) -> list[Path]:
    """Every plot that fits the run's task, as PNGs in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, workload, task = result.model, result.workload, result.config.task
    paths = [
        plot_history(result.history, out / "history.png", title=f"{task} ({result.config.loss})"),
        plot_weights(model, out / "weights.png"),
    ]
    if model.binary and workload.bit_inputs:
        paths.append(plot_probability_vs_ones(model, workload, out / "probability_vs_ones.png"))
        paths.append(plot_sigmoid(out / "sigmoid.png"))
    else:
        title = f"{task}: {result.all_samples.n_samples} samples (all splits)"
        paths.append(plot_confusion(result.all_samples.confusion, out / "confusion.png", title))
    if task == "clusters" and workload.n_features == 2:
        paths.append(plot_clusters(model, workload, out / "clusters.png"))
    return paths
