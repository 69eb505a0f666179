"""The ``fused-ce`` command: smoke runs with few epochs, ``check``, and bad input (a message
naming the argument, exit status 2, no traceback)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_ce._backend import native_available, triton_runs_on
from fused_ce.app.cli import main

CUDA = torch.cuda.is_available()

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def restore_threads():
    """``fused-ce train`` sets one intra-op thread on CPU; keep that out of other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 400 and height >= 250, (path, width, height)


@pytest.mark.parametrize(
    ("task", "extra", "plots"),
    [
        ("majority-bits", [], ["history", "weights", "probability_vs_ones", "sigmoid"]),
        (
            "popcount",
            ["--hidden", "4", "--optimizer", "sgd", "--fused-linear"],
            ["history", "weights", "confusion"],
        ),
        (
            "clusters",
            ["--samples-per-class", "30", "--classes", "3"],
            ["history", "weights", "confusion", "clusters"],
        ),
    ],
)
def test_train_smoke(tmp_path, capsys, task, extra, plots):
    out = tmp_path / task
    argv = ["train", task, "--epochs", "3", "--val-every", "2", "--out", str(out), *extra]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "test accuracy:" in stdout
    assert f"plots: {out / 'history.png'}" in stdout
    for name in plots:
        _assert_png(out / f"{name}.png")
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == task and config["epochs"] == 3
    records = (out / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 3 + 2
    assert (out / "checkpoint.pt").stat().st_size > 0


def test_majority_bits_prints_test_and_all_pattern_accuracy(tmp_path, capsys):
    argv = ["train", "majority-bits", "--epochs", "40", "--batch-size", "1024", "--lr", "0.1"]
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "test accuracy: 100.00% (154/154 patterns)" in stdout
    assert "all 1024 patterns: 100.00% (1024/1024)" in stdout
    assert "[[638, 0], [0, 386]]" in stdout


def test_check_passes_on_every_backend_here(capsys):
    assert main(["check"]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert lines[0].split() == [
        "op",
        "case",
        "device",
        "dtype",
        "backend",
        "loss",
        "abs",
        "err",
        "limit",
        "grad",
        "abs",
        "err",
        "limit",
        "ok",
    ]
    end = lines.index(lines[1], 2)  # the rule under the last row
    rows = lines[2:end]
    assert "abs err: largest |fused - torch in float64|" in lines[end + 1]
    for row in rows:
        loss_error, loss_limit, grad_error, grad_limit = map(float, row.split()[-5:-1])
        assert loss_error <= loss_limit and grad_error <= grad_limit, row
    backends = {row.split()[-6] for row in rows}
    ops = {row.split()[0] for row in rows}
    assert ops == {
        "softmax_cross_entropy",
        "sigmoid_binary_cross_entropy",
        "linear_cross_entropy",
        "linear_binary_cross_entropy_with_logits",
    }
    expected = {"torch", "triton"} if triton_runs_on("cuda" if CUDA else "cpu") else {"torch"}
    if native_available():
        expected.add("native")
    assert expected <= backends
    assert "backend='auto' runs " in stdout
    assert all(row.endswith("ok") for row in rows)
    assert f"{len(rows)}/{len(rows)} within tolerance" in stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: COMMAND"),
        (["fly"], "invalid choice: 'fly'"),
        (["train"], "required: TASK"),
        (["train", "mnist"], "invalid choice: 'mnist'"),
        (["train", "majority-bits", "--epochs", "-5"], "argument --epochs: expected a positive"),
        (["train", "majority-bits", "--epochs", "ten"], "argument --epochs"),
        (["train", "popcount", "--batch-size", "0"], "argument --batch-size"),
        (["train", "popcount", "--lr", "-0.1"], "argument --lr"),
        (["train", "popcount", "--lr", "nan"], "argument --lr"),
        (["train", "majority-bits", "--loss", "mse"], "argument --loss: invalid choice: 'mse'"),
        (
            ["train", "majority-bits", "--device", "tpu"],
            "argument --device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'",
        ),
        (["train", "majority-bits", "--device", "meta"], "argument --device: expected 'auto'"),
        (
            ["train", "clusters", "--samples-per-class", "1"],
            "argument --samples-per-class: 4 samples split 70/15/15 leave 1 for testing",
        ),
        (["train", "majority-bits", "--bits", "3"], "argument --bits: 8 samples split"),
        (["train", "majority-bits", "--bits", "40"], "argument --bits: at most 20"),
        (["train", "clusters", "--bits", "8"], "unrecognized arguments: --bits"),
        (["train", "popcount", "--loss", "torch", "--backend", "torch"], "argument --backend"),
        (["train", "popcount", "--loss", "torch", "--fused-linear"], "argument --fused-linear"),
        (["check", "--dtype", "int8"], "argument --dtype"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_unusable_cuda_device_is_a_clear_error(capsys):
    """Plain ``cuda`` where there is no CUDA; a device index past the last one where there is."""
    device = f"cuda:{torch.cuda.device_count()}" if CUDA else "cuda"
    assert main(["train", "majority-bits", "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"argument --device: {device!r}" in err and "Traceback" not in err
    if not CUDA:
        assert "CUDA is not available" in err
        assert main(["check", "--device", "cuda"]) == 2
        assert "argument --device: CUDA is not available" in capsys.readouterr().err


def test_unwritable_out_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["train", "majority-bits", "--out", str(blocker / "run")]) == 2
    assert "argument --out: cannot create" in capsys.readouterr().err


def test_out_that_exists_but_cannot_be_written_fails_before_training(tmp_path, capsys):
    """A read-only directory; as root (who writes anywhere a mode allows) /sys, which no one
    can create files in. Checked before training: no run, one line, status 2."""
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    out = read_only if not os.access(read_only, os.W_OK) else Path("/sys")
    assert main(["train", "majority-bits", "--epochs", "100000", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(
        f"fused-ce train majority-bits: error: argument --out: cannot write in {str(out)!r}: "
    )
    assert captured.err.count("\n") == 1


def test_train_without_matplotlib_reports_results_and_how_to_plot(tmp_path, capsys, monkeypatch):
    """A plain ``pip install .`` has no matplotlib (the ``train`` extra): the run still trains,
    saves and prints its results, then says how to get the plots. ``None`` in sys.modules makes
    every ``import matplotlib...`` raise ModuleNotFoundError, as on such an install."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = ["train", "majority-bits", "--epochs", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "test accuracy:" in stdout and "all 1024 patterns:" in stdout
    assert stdout.splitlines()[-1] == (
        "plots: not drawn, matplotlib is not installed "
        "(pip install 'fused_ce[train]', then run again)"
    )
    assert (tmp_path / "checkpoint.pt").stat().st_size > 0
    assert (tmp_path / "test.json").exists()
    assert not list(tmp_path.glob("*.png"))


def test_help_and_version_exit_0(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    stdout = capsys.readouterr().out
    for task in ("majority-bits", "popcount", "clusters"):
        assert f"\n    {task}" in stdout
    assert "fused-ce train TASK --help" in stdout
    assert main(["train", "clusters", "--help"]) == 0
    assert "--samples-per-class" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert "fused-ce 0.1.0" in capsys.readouterr().out


def test_console_script_rejects_bad_input_without_traceback():
    """The installed ``fused-ce`` script (``python -m fused_ce.app.cli`` without PATH)."""
    script = Path(sys.executable).with_name("fused-ce")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fused_ce.app.cli"]
    done = subprocess.run(
        [*command, "train", "majority-bits", "--epochs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "argument --epochs: expected a positive integer, got 0" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
