"""Training: the lecture's model reaches 100% on majority bits, fused and torch losses give the
same curves, the lecture's SGD update, the test report, checkpoints and logs.

On a CPU machine the conftest sets TRITON_INTERPRET=1, so the fused losses (backend ``auto``)
run the Triton kernels through the interpreter: these tests keep epochs and batch counts small.
"""

import json

import pytest
import torch

from fused_ce.app import train
from fused_ce.app.plots import raw_input_weights


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the CLI uses for these tiny models: OpenMP threads only add
    synchronisation there, and slow a run several times when other processes share the cores.
    Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_majority_bits_reaches_100_percent_on_all_patterns():
    """Full-batch Adam on the 70% training split: every one of the 1024 patterns right,
    including the 308 never trained on. The fused loss runs on the default backend."""
    config = train.TrainConfig(batch_size=1024, epochs=150, lr=0.1, val_every=50)
    result = train.run(config)
    assert len(result.workload.train) == 716
    assert result.all_samples.n_samples == 1024
    assert result.all_samples.accuracy == 1.0
    assert result.all_samples.misclassified == []
    assert result.all_samples.confusion == [[638, 0], [0, 386]]
    assert result.test.accuracy == 1.0
    # What the neuron learned is the majority rule: equal positive weights on every bit and a
    # threshold between 5 ones (a tie, label 0) and 6 ones.
    weight, bias = raw_input_weights(result.model)
    weight, bias = weight[0], float(bias[0])
    assert torch.all(weight > 0)
    assert float(weight.max() / weight.min()) < 1.2
    assert 5.0 < -bias / float(weight.mean()) < 6.0


def test_default_main_job_config_reaches_100_percent_on_all_patterns():
    """The README's promise for ``fused-ce train majority-bits`` with its defaults (2000 epochs,
    batch 64, Adam). Run with ``backend="torch"``: 24,000 steps through the Triton interpreter
    would take minutes, and the kernels' equivalence is covered by the op tests and by the
    curve test below."""
    result = train.run(train.TrainConfig(backend="torch", val_every=500))
    assert result.config.epochs == 2000 and result.config.batch_size == 64
    assert result.all_samples.accuracy == 1.0
    assert result.test.accuracy == 1.0


@pytest.mark.parametrize(
    ("task", "epochs", "fused_linear"),
    [
        ("majority-bits", 3, False),
        ("popcount", 2, False),
        ("clusters", 3, False),
        ("majority-bits", 2, True),
        ("popcount", 2, True),
    ],
)
def test_fused_and_torch_losses_give_the_same_curves(backend_device, task, epochs, fused_linear):
    """The swap-in story: the same seed, only the loss function differs (with
    ``fused_linear``, the head's Linear layer is fused into the loss as well)."""
    backend, device = backend_device
    common = {"task": task, "epochs": epochs, "val_every": 1, "device": device}
    if task == "clusters":
        common["samples_per_class"] = 60
    fused = train.run(
        train.TrainConfig(loss="fused", backend=backend, fused_linear=fused_linear, **common)
    )
    reference = train.run(train.TrainConfig(loss="torch", **common))
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
        ours = torch.tensor([r[key] for r in fused.history], dtype=torch.float64)
        theirs = torch.tensor([r[key] for r in reference.history], dtype=torch.float64)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=key)
    # Training moved the loss, so agreeing curves are not two constants.
    losses = [r["train_loss"] for r in reference.history]
    assert losses[-1] < losses[0]
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(fused.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_sgd_step_is_the_lecture_update():
    """One full-batch SGD step on raw bits: w <- w + lr * mean((t - o) x), b <- b + lr *
    mean(t - o), with o = sigmoid(w . x + b) (the notes' delta rule, averaged by 'mean')."""
    config = train.TrainConfig(
        optimizer="sgd", lr=0.7, epochs=1, batch_size=1024, normalize=False, all_patterns=True
    )
    workload = train.make_workload(config)
    torch.manual_seed(0)
    model = train.build_model(config, workload)
    w0 = model.head.weight.detach().double().clone()[0]
    b0 = model.head.bias.detach().double().clone()[0]
    train.train_epochs(model, train.make_objective(config, True), workload, config)
    x, t = workload.full.inputs.double(), workload.full.targets.double()
    o = torch.sigmoid(x @ w0 + b0)
    expected_w = w0 + 0.7 * ((t - o)[:, None] * x).mean(dim=0)
    expected_b = b0 + 0.7 * (t - o).mean()
    torch.testing.assert_close(model.head.weight.double()[0], expected_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.head.bias.double()[0], expected_b, rtol=0, atol=1e-6)


def test_normalisation_uses_training_statistics_and_folds_back():
    config = train.TrainConfig(task="popcount", epochs=1)
    workload = train.make_workload(config)
    model = train.build_model(config, workload)
    inputs = workload.train.inputs
    torch.testing.assert_close(model.standardize.mean, inputs.mean(dim=0))
    torch.testing.assert_close(model.standardize.std, inputs.std(dim=0, correction=0))
    normalised = model.standardize(inputs)
    torch.testing.assert_close(normalised.mean(dim=0), torch.zeros(10), atol=1e-6, rtol=0)
    torch.testing.assert_close(normalised.std(dim=0, correction=0), torch.ones(10))
    # The head folded through the normalisation gives the same logits on raw bits.
    weight, bias = raw_input_weights(model)
    full = workload.full.inputs
    torch.testing.assert_close(
        full.double() @ weight.T + bias, model(full).detach().double(), rtol=1e-5, atol=1e-5
    )
    plain = train.build_model(train.TrainConfig(normalize=False), workload)
    assert torch.equal(plain.standardize(full), full)


def test_test_report_matches_predictions_counted_independently():
    config = train.TrainConfig(task="popcount", epochs=1, lr=0.01)
    result = train.run(config)
    split = result.workload.test
    logits = result.model(split.inputs).detach()
    predicted = logits.argmax(dim=1)
    report = result.test
    assert report.n_samples == len(split) == 154
    assert report.accuracy == pytest.approx(float((predicted == split.targets).float().mean()))
    for true in range(11):
        for guess in range(11):
            count = int(((split.targets == true) & (predicted == guess)).sum())
            assert report.confusion[true][guess] == count
    wrong = (predicted != split.targets).nonzero().flatten().tolist()
    assert len(report.misclassified) == len(wrong) > 0
    first = report.misclassified[0]
    row = split.inputs[wrong[0]]
    assert first["input"] == "".join(str(int(b)) for b in row)
    assert first["target"] == int(split.targets[wrong[0]]) == first["input"].count("1")
    assert first["predicted"] == int(predicted[wrong[0]])
    probability = torch.softmax(logits[wrong[0]].double(), dim=0)[first["predicted"]]
    assert first["probability"] == pytest.approx(float(probability), abs=1e-5)
    loss = torch.nn.functional.cross_entropy(logits.double(), split.targets)
    assert report.loss == pytest.approx(float(loss), rel=1e-5)


def test_checkpoint_round_trip_and_logs(tmp_path):
    config = train.TrainConfig(task="popcount", epochs=4, val_every=2, hidden=8)
    result = train.run(config, out_dir=tmp_path)
    # Load onto the device it trained on (CUDA when present), so both models see one input.
    device = next(result.model.parameters()).device
    model, loaded = train.load_checkpoint(tmp_path / "checkpoint.pt", map_location=device)
    assert loaded == config
    assert not model.training
    state = result.model.state_dict()
    assert set(model.state_dict()) == set(state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    inputs = result.workload.full.inputs.to(device)
    assert torch.equal(model(inputs), result.model(inputs))

    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(
        json.dumps(config.__dict__)
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert ["val_loss" in r for r in epochs] == [False, True, False, True]
    assert epochs == result.history
    tests = [r for r in records if r["event"] == "test"]
    assert [(r["split"], r["n_samples"]) for r in tests] == [("test", 154), ("all", 1024)]
    assert tests[1]["accuracy"] == result.all_samples.accuracy
    report = json.loads((tmp_path / "test.json").read_text())
    assert report["all"]["confusion"] == result.all_samples.confusion


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"task": "mnist"}, "task"),
        ({"loss": "mse"}, "loss"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": -1}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"hidden": -2}, "hidden"),
        ({"backend": "cuda"}, "backend"),
        ({"loss": "torch", "fused_linear": True}, "fused_linear"),
    ],
)
def test_bad_config_names_the_argument(overrides, name):
    with pytest.raises(ValueError, match=name):
        train.TrainConfig(**overrides)


def test_resolve_device():
    assert train.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert train.resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="device"):
        train.resolve_device("tpu")
    with pytest.raises(ValueError, match="device"):
        train.resolve_device(f"cuda:{torch.cuda.device_count()}")
