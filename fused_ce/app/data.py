"""Workloads: the lecture's majority-bits problem, popcount and Gaussian clusters. Every
generator is deterministic under its ``seed``.

The classification workloads come as a :class:`Workload`: train, validation and test
:class:`Split` s of raw (unnormalised) inputs, plus ``full``, every sample. Normalisation
``(x - mu) / sigma`` is part of the model (see :func:`feature_statistics`), so checkpoints carry
it and the misclassified patterns can be reported as the bits they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


@dataclass(frozen=True)
class Split:
    """Inputs ``(n, n_features)`` float32 and targets ``(n,)``: float32 0/1 labels for binary
    workloads, int64 class indices otherwise."""

    inputs: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.inputs.to(device), self.targets.to(device))


@dataclass(frozen=True)
class Workload:
    """A classification problem and its splits.

    ``n_classes`` is 2 for a binary workload (one sigmoid output, float targets) and the number
    of softmax outputs otherwise. ``bit_inputs`` says the inputs are 0/1 patterns, which the test
    report prints as bit strings.
    """

    name: str
    train: Split
    val: Split
    test: Split
    full: Split
    n_features: int
    n_classes: int
    binary: bool
    bit_inputs: bool

    def to(self, device: torch.device | str) -> Workload:
        return Workload(
            self.name,
            self.train.to(device),
            self.val.to(device),
            self.test.to(device),
            self.full.to(device),
            self.n_features,
            self.n_classes,
            self.binary,
            self.bit_inputs,
        )


def bit_patterns(n_bits: int) -> Tensor:
    """All ``2**n_bits`` patterns as a float32 ``(2**n_bits, n_bits)`` tensor of 0s and 1s; row
    ``i`` is ``i`` in binary, most significant bit first."""
    _check_positive("n_bits", n_bits)
    if n_bits > 24:
        raise ValueError(f"n_bits: at most 24 (2**n_bits rows are materialised), got {n_bits}")
    index = torch.arange(2**n_bits)
    shifts = torch.arange(n_bits - 1, -1, -1)
    return ((index[:, None] >> shifts) & 1).to(torch.float32)


def split_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Train, validation and test sizes of ``n`` items: validation and test get
    ``round(fraction * n)`` items each, train the rest."""
    n_val = round(fractions[1] * n)
    n_test = round(fractions[2] * n)
    return n - n_val - n_test, n_val, n_test


def split_indices(
    n: int, fractions: tuple[float, float, float], seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """A seeded permutation of ``range(n)`` cut into train/validation/test index sets of
    :func:`split_sizes`."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"fractions: expected three non-negative numbers summing to 1, got {fractions}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train, n_val, _ = split_sizes(n, fractions)
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


def _workload(
    name: str,
    inputs: Tensor,
    targets: Tensor,
    *,
    n_classes: int,
    binary: bool,
    bit_inputs: bool,
    seed: int,
    fractions: tuple[float, float, float],
    all_patterns: bool,
) -> Workload:
    full = Split(inputs, targets)
    if all_patterns:
        train = val = test = full
    else:
        train, val, test = (
            Split(inputs[i], targets[i]) for i in split_indices(len(full), fractions, seed)
        )
    return Workload(name, train, val, test, full, inputs.shape[1], n_classes, binary, bit_inputs)


def majority_bits(
    n_bits: int = 10,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    all_patterns: bool = False,
) -> Workload:
    """The lecture's problem: is the majority of ``n_bits`` bits 1?

    Inputs are all ``2**n_bits`` patterns (:func:`bit_patterns`); the label is 1 when ones
    outnumber zeros, so a tie is 0 (for 10 bits, 386 of the 1024 patterns are positive).
    ``all_patterns=True`` trains, validates and tests on every pattern; otherwise the patterns are
    split by ``fractions`` under ``seed``.
    """
    inputs = bit_patterns(n_bits)
    targets = (2 * inputs.sum(dim=1) > n_bits).to(torch.float32)
    return _workload(
        "majority-bits",
        inputs,
        targets,
        n_classes=2,
        binary=True,
        bit_inputs=True,
        seed=seed,
        fractions=fractions,
        all_patterns=all_patterns,
    )


def popcount(
    n_bits: int = 10,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    all_patterns: bool = False,
) -> Workload:
    """The majority-bits inputs with the number of ones as the class: ``n_bits + 1`` classes
    (``C(n_bits, k)`` patterns in class ``k``). Splits as in :func:`majority_bits`."""
    inputs = bit_patterns(n_bits)
    targets = inputs.sum(dim=1).to(torch.int64)
    return _workload(
        "popcount",
        inputs,
        targets,
        n_classes=n_bits + 1,
        binary=False,
        bit_inputs=True,
        seed=seed,
        fractions=fractions,
        all_patterns=all_patterns,
    )


def gaussian_clusters(
    n_classes: int = 4,
    n_features: int = 2,
    samples_per_class: int = 250,
    *,
    center_scale: float = 3.0,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> Workload:
    """``n_classes`` Gaussian blobs in ``n_features`` dimensions.

    Centres are drawn from ``N(0, center_scale**2 I)``, samples from ``N(centre, I)``: the
    larger ``center_scale``, the less the classes overlap (and the closer the Bayes accuracy
    is to 1). Samples are shuffled and split by ``fractions`` under ``seed``.
    """
    _check_positive("n_classes", n_classes)
    _check_positive("n_features", n_features)
    _check_positive("samples_per_class", samples_per_class)
    if not center_scale > 0:
        raise ValueError(f"center_scale: expected a positive number, got {center_scale}")
    gen = torch.Generator().manual_seed(seed)
    centers = center_scale * torch.randn(n_classes, n_features, generator=gen)
    targets = torch.arange(n_classes).repeat_interleave(samples_per_class)
    inputs = centers[targets] + torch.randn(len(targets), n_features, generator=gen)
    return _workload(
        "clusters",
        inputs,
        targets,
        n_classes=n_classes,
        binary=False,
        bit_inputs=False,
        seed=seed,
        fractions=fractions,
        all_patterns=False,
    )


def feature_statistics(inputs: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and (population) standard deviation of ``(n, d)`` inputs, for the
    lecture's normalisation ``(x - mu) / sigma``. A constant feature gets ``sigma = 1`` so it maps
    to 0 instead of NaN."""
    mean = inputs.mean(dim=0)
    std = inputs.std(dim=0, correction=0)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
