"""Workloads: counts, labels, splits and determinism against numbers computed independently
(binomial coefficients, Python's own bit counting)."""

from math import comb

import pytest
import torch

from fused_ce.app import data


def test_bit_patterns_are_every_number_in_binary():
    patterns = data.bit_patterns(10)
    assert patterns.shape == (1024, 10)
    assert patterns.dtype == torch.float32
    for i in (0, 1, 5, 693, 1023):
        assert "".join(str(int(b)) for b in patterns[i]) == format(i, "010b")
    assert len({tuple(row.tolist()) for row in patterns}) == 1024


def test_majority_bits_counts_and_labels():
    workload = data.majority_bits(10, all_patterns=True)
    inputs, labels = workload.full.inputs, workload.full.targets
    assert labels.dtype == torch.float32
    assert int(labels.sum()) == 386 == sum(comb(10, k) for k in range(6, 11))
    for i in range(1024):
        ones = bin(i).count("1")
        assert labels[i] == (1.0 if ones > 5 else 0.0), (i, ones)
    # A tie (5 ones) is negative; 6 ones is positive.
    assert labels[0b1111100000] == 0 and labels[0b1111110000] == 1
    assert workload.binary and workload.bit_inputs and workload.n_classes == 2
    assert workload.train is workload.full and workload.test is workload.full
    assert torch.equal(inputs, data.bit_patterns(10))


def test_majority_bits_with_odd_bits():
    labels = data.majority_bits(3, all_patterns=True).full.targets
    assert labels.tolist() == [0, 0, 0, 1, 0, 1, 1, 1]


def test_splits_partition_the_patterns_deterministically():
    workload = data.majority_bits(10, seed=3)
    sizes = (len(workload.train), len(workload.val), len(workload.test))
    assert sizes == (716, 154, 154)
    rows = torch.cat([workload.train.inputs, workload.val.inputs, workload.test.inputs])
    assert len({tuple(r.tolist()) for r in rows}) == 1024
    labels = torch.cat([workload.train.targets, workload.val.targets, workload.test.targets])
    assert int(labels.sum()) == 386
    again = data.majority_bits(10, seed=3)
    assert torch.equal(again.test.inputs, workload.test.inputs)
    other = data.majority_bits(10, seed=4)
    assert not torch.equal(other.test.inputs, workload.test.inputs)


def test_split_indices_rejects_bad_fractions():
    with pytest.raises(ValueError, match="fractions"):
        data.split_indices(10, (0.5, 0.5, 0.5), seed=0)


def test_popcount_counts_and_labels():
    workload = data.popcount(10, all_patterns=True)
    targets = workload.full.targets
    assert targets.dtype == torch.int64 and workload.n_classes == 11
    assert targets.tolist() == [bin(i).count("1") for i in range(1024)]
    assert torch.bincount(targets).tolist() == [comb(10, k) for k in range(11)]
    assert not workload.binary


def test_gaussian_clusters_shapes_balance_and_separation():
    workload = data.gaussian_clusters(5, 3, 40, center_scale=20.0, seed=1)
    full = workload.full
    assert full.inputs.shape == (200, 3) and workload.n_features == 3
    assert torch.bincount(full.targets).tolist() == [40] * 5
    assert (len(workload.train), len(workload.val), len(workload.test)) == (140, 30, 30)
    # Unit-variance samples around their class mean.
    for c in range(5):
        members = full.inputs[full.targets == c]
        spread = (members - members.mean(dim=0)).std(dim=0)
        assert torch.all((spread > 0.6) & (spread < 1.5)), spread
    again = data.gaussian_clusters(5, 3, 40, center_scale=20.0, seed=1)
    assert torch.equal(again.full.inputs, full.inputs)


def test_feature_statistics_normalise_to_zero_mean_unit_std():
    inputs = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 4.0], [1.0, 1.0, 6.0], [0.0, 1.0, 8.0]])
    mean, std = data.feature_statistics(inputs)
    torch.testing.assert_close(mean, torch.tensor([0.5, 1.0, 5.0]))
    # The constant column gets sigma = 1, not 0.
    torch.testing.assert_close(std, torch.tensor([0.5, 1.0, 5.0**0.5]))
    normalised = (inputs - mean) / std
    torch.testing.assert_close(normalised[:, 0], torch.tensor([-1.0, 1.0, 1.0, -1.0]))
    assert torch.all(normalised[:, 1] == 0)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: data.majority_bits(0), "n_bits"),
        (lambda: data.gaussian_clusters(0), "n_classes"),
        (lambda: data.gaussian_clusters(3, 2, 10, center_scale=-1.0), "center_scale"),
    ],
)
def test_bad_workload_arguments_name_the_argument(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()
