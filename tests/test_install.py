"""How the package installs and starts: the native kernels compiled on first use where nothing
was built at install (the real path, once, into a temporary cache, by two processes at once),
what ``fused-ce check`` says about the backends, and a cheap ``import fused_ce``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from fused_ce import _backend, native
from fused_ce.app import check

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _installed_without_libraries(tmp_path: Path) -> Path:
    """The package as a wheel built without the libraries installs it (the sources shipped as
    ``fused_ce/native/csrc/``, see setup.py), in a folder to put on PYTHONPATH."""
    package = tmp_path / "site"
    shutil.copytree(
        ROOT / "fused_ce",
        package / "fused_ce",
        ignore=shutil.ignore_patterns("__pycache__", "_C_*"),
    )
    shutil.copytree(ROOT / "csrc", package / "fused_ce" / "native" / "csrc")
    return package


FIRST_USE = """
    import warnings
    warnings.simplefilter("error")  # an unavailable backend warns: fail on it
    import torch, torch.nn.functional as F
    import fused_ce
    from fused_ce import native
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (16,), generator=gen)
    loss = fused_ce.cross_entropy(x, y, label_smoothing=0.1, backend="native")
    (grad,) = torch.autograd.grad(loss, x)
    expected = F.cross_entropy(x, y, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, x)[0], rtol=1e-12, atol=1e-15)
    t = torch.rand(16, 7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        fused_ce.binary_cross_entropy_with_logits(x.detach(), t, backend="native"),
        F.binary_cross_entropy_with_logits(x.detach(), t), rtol=1e-12, atol=0)
    print(native.capability(), native.origin(), sep="|")
"""


def test_native_kernels_compile_on_first_use(tmp_path):
    """An installation without the libraries built at install (a plain `pip install .`, with
    build isolation) but with the sources shipped as the wheel ships them: the first process
    compiles into the cache with a one-line notice, a second started at the same moment waits
    for it, a later one loads the cache silently; all three run the native kernels."""
    package = _installed_without_libraries(tmp_path)
    cache = tmp_path / "cache"
    env = {
        **os.environ,
        "PYTHONPATH": str(package),
        "FUSED_CE_CACHE_DIR": str(cache),
        "TRITON_INTERPRET": "0",
    }
    env.pop("FUSED_CE_DISABLE_NATIVE", None)
    first, second = (_run(FIRST_USE, env, tmp_path) for _ in range(2))
    outputs = [process.communicate(timeout=1200) for process in (first, second)]
    for process, (stdout, stderr) in zip((first, second), outputs, strict=True):
        assert process.returncode == 0, stderr
        capability, origin = stdout.strip().split("|")
        assert capability == native.capability()
        assert origin.startswith(f"compiled on first use ({cache}")
    notices = [line for _, stderr in outputs for line in stderr.splitlines()]
    assert any(line.startswith("fused_ce: compiling the native CPU kernels") for line in notices)
    third = _run(FIRST_USE, env, tmp_path)
    stdout, stderr = third.communicate(timeout=600)
    assert third.returncode == 0, stderr
    assert "compiling" not in stderr
    assert stdout.strip().split("|")[1].startswith("compiled on first use")


@pytest.mark.parametrize(
    "setting, why",
    [
        ({"CXX": "no-such-compiler"}, "no C++ compiler ('no-such-compiler') is on the PATH"),
        ({"FUSED_CE_CACHE_DIR": "{tmp}/a-file/cache"}, "compiling them on first use failed in"),
    ],
    ids=["no-compiler", "cache-not-writable"],
)
def test_when_nothing_can_be_built_the_torch_path_serves_with_a_warning(tmp_path, setting, why):
    """No libraries built at install and no way to compile them: unavailable, with a warning
    that says why, and `auto` runs the torch path (never an exception)."""
    package = _installed_without_libraries(tmp_path)
    (tmp_path / "a-file").write_text("")
    script = """
        import warnings
        import torch
        from fused_ce._backend import resolve
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert resolve("auto", torch.empty(0)) == "torch"
        print(*[str(w.message) for w in caught], sep="\\n")
    """
    env = {
        **os.environ,
        "PYTHONPATH": str(package),
        "FUSED_CE_CACHE_DIR": str(tmp_path / "cache"),
        "TRITON_INTERPRET": "0",
        **{key: value.format(tmp=tmp_path) for key, value in setting.items()},
    }
    env.pop("FUSED_CE_DISABLE_NATIVE", None)
    process = _run(script, env, tmp_path)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "the native CPU kernels are unavailable: they were not built at install" in stdout, (
        stdout + stderr
    )
    assert why in stdout
    assert "torch path serves" in stdout
    assert not (tmp_path / "cache").exists()


def test_check_says_where_the_native_kernels_come_from():
    if native.available():
        assert check.native_note() == (f"native kernels: {native.capability()}, {native.origin()}")
        assert native.origin() == "built at install"  # this checkout: setup.py build_ext
    else:
        assert check.native_note().startswith("native kernels: unavailable: ")


def test_check_names_what_triton_lacks(monkeypatch):
    """A CUDA torch with Triton on a machine without a GPU: what is missing is the GPU, not
    the package."""
    monkeypatch.setattr(_backend, "HAS_TRITON", True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    note = check.triton_note(checked=False)
    assert "Triton is installed, but there is no CUDA GPU here" in note
    assert "CUDA 12.8 build" in note
    assert "triton package" not in note
    monkeypatch.setattr(_backend, "HAS_TRITON", False)
    assert "the triton package is not installed" in check.triton_note(checked=False)
    assert check.triton_note(checked=True) is None


def test_import_does_not_load_the_compiler_stack():
    """`import fused_ce` adds little to `import torch`: in particular not torch._dynamo (about
    as long as torch itself), sympy or triton, which torch.compile and the kernels load when
    used."""
    script = """
        import sys
        import fused_ce, fused_ce.nn, fused_ce.functional
        heavy = [m for m in ("torch._dynamo", "torch._inductor", "sympy", "triton")
                 if m in sys.modules]
        print(",".join(heavy))
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stdout, stderr = _run(script, env, ROOT).communicate(timeout=300)
    assert stdout.strip() == "", f"import fused_ce imported {stdout.strip()}; {stderr}"


def test_native_available_is_a_compile_time_constant():
    """The mark that keeps native_available out of the traced graph is still the one
    torch.compiler.assume_constant_result sets, and compile folds it without a graph break."""
    marked = torch.compiler.assume_constant_result(lambda: None)
    assert {k for k in vars(marked)} <= {k for k in vars(_backend.native_available)}

    def fn(x):
        return x + 1 if _backend.native_available() else x - 1

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    x = torch.zeros(3)
    expected = x + 1 if native.available() else x - 1
    torch.testing.assert_close(compiled(x), expected)


def test_wheel_ships_the_sources(tmp_path):
    """A wheel built without the libraries (as a plain `pip install .` builds it) carries
    csrc/ as fused_ce/native/csrc/ and the flags module: what the first-use build needs."""
    tree = tmp_path / "tree"
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    shutil.copytree(
        ROOT / "fused_ce", tree / "fused_ce", ignore=shutil.ignore_patterns("__pycache__", "_C_*")
    )
    env = {**os.environ, "FUSED_CE_NO_NATIVE": "1"}
    command = [sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "-q"]
    command += ["--no-build-isolation", "-w", str(tmp_path / "dist")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("fused_ce-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    sources = {f"fused_ce/native/csrc/{p.name}" for p in (ROOT / "csrc").iterdir()}
    assert sources <= names, sources - names
    assert "fused_ce/native/_build.py" in names
    assert not any("/_C_" in name for name in names)


def test_a_failed_native_compile_does_not_fail_the_install(tmp_path):
    """A compiler that fails to compile (here the real one for its version queries, failing
    every `-c`) leaves the build without the libraries and says so, instead of failing it:
    torch's ninja build raises an error that setuptools' `optional=True` alone lets through."""
    real = os.environ.get("CXX", "c++").split()[0]
    compiler = tmp_path / "failing-c++"
    compiler.write_text(
        '#!/bin/sh\ncase " $* " in *" -c "*) echo "this compiler fails" >&2; exit 1;; esac\n'
        f'exec {shutil.which(real)} "$@"\n'
    )
    compiler.chmod(0o755)
    env = {**os.environ, "CXX": str(compiler)}
    env.pop("FUSED_CE_NO_NATIVE", None)
    command = [sys.executable, "setup.py", "-q", "build_ext"]
    command += ["--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "temp")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("default", "autograd"):
        assert f"building fused_ce.native._C_{name} failed" in done.stderr, done.stderr[-3000:]
    assert not list((tmp_path / "lib").rglob("_C_*"))
