"""README.md's snippets run and its commands exist: every ```python block executes (on small
tensors named as the README names them), the ```diff block's import works, every `fused-ce ...`
command parses, every `make TARGET` is a Makefile target, every extra named in a pip command is
in pyproject.toml, and every script named exists. `make test` itself is what CI runs."""

import contextlib
import re
import shlex
from pathlib import Path

import pytest
import torch

from fused_ce.app.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)


def _commands(program: str) -> list[str]:
    """``program ...`` in inline code spans and in shell blocks."""
    spans = re.findall(rf"`({re.escape(program)}(?: [^`]*)?)`", README)
    lines = [line for block in _blocks("bash") for line in block.splitlines()]
    return sorted({*spans, *(line for line in lines if line.startswith(program))})


def _names() -> dict:
    """The tensors the snippets use, small and valid."""
    gen = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(4, 8, generator=gen),
        "w1": torch.randn(16, 8, generator=gen),
        "logits": torch.randn(4, 5, generator=gen),
        "target": torch.tensor([0, 4, -100, 2]),
        "w": torch.rand(5, generator=gen) + 0.5,
        "scores": torch.randn(4, 3, generator=gen),
        "labels": torch.rand(4, 3, generator=gen),
        "pw": torch.rand(3, generator=gen) + 0.5,
    }


@contextlib.contextmanager
def _one_rank_group(store: Path):
    """The default process group with this process as its only rank (gloo), for the
    vocab-parallel snippet: the group's names bound to a one-rank tensor-parallel split."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_snippet_runs(index, tmp_path):
    namespace = _names()
    block = _blocks("python")[index]
    group = contextlib.nullcontext()
    if "fused_ce.distributed" in block:
        group = _one_rank_group(tmp_path / "store")
        namespace |= {
            "tp_group": None,
            "local_logits": namespace["logits"],
            "h": namespace["x"],
            "local_head_weight": namespace["w1"],
            "lm_head": torch.nn.Linear(8, 16),
        }
    with group:
        exec(block, namespace)  # noqa: S102
    if "loss" in namespace:
        assert torch.isfinite(namespace["loss"]).all()


def test_diff_snippet_imports():
    added = [line[1:] for block in _blocks("diff") for line in block.splitlines()]
    imports = [line for line in added if line.startswith(("from ", "import "))]
    assert imports
    for line in imports:
        exec(line, {})  # noqa: S102


def test_fused_ce_commands_parse():
    commands = _commands("fused-ce")
    assert "fused-ce check" in commands
    parser = build_parser()
    for command in commands:
        words = shlex.split(command)[1:]
        if words in ([], ["train"]):
            continue  # the program and its subcommand, named in prose
        parser.parse_args(words)


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.MULTILINE))
    named = {shlex.split(c)[1] for c in _commands("make") if len(shlex.split(c)) > 1}
    assert {"test", "train", "bench"} <= named
    assert named <= targets


def test_pip_extras_and_scripts_exist():
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([\w-]+) = \[", section, flags=re.MULTILINE))
    assert {"dev", "train", "triton"} <= extras
    named = set(re.findall(r"\.\[([\w,]+)\]", README))
    named = {extra for group in named for extra in group.split(",")}
    assert named and named <= extras
    for command in _commands("bash"):
        assert (ROOT / shlex.split(command)[1]).is_file(), command
