"""The native CPU backend: C++ kernels from ``csrc/`` (see docs/native.md).

The kernels come in one library per CPU capability (``avx512``, ``avx2``, ``default``); the
best one this CPU runs (``torch.backends.cpu.get_cpu_capability()``) is loaded on first use,
which registers the ``torch.ops.fused_ce_native`` ops, then the autograd library, built once:
the C++ autograd of the scalar-loss ops (``ce_scalar``, ``bce_scalar``), which calls the
loaded kernels through their ops. The libraries come from one of two places, tried in order:

* built at install: ``setup.py`` compiled them into this folder (``_C_<capability>``,
  ``_C_autograd``), where torch and a C++ compiler were there at install time;
* compiled on first use: the sources shipped in the package (``csrc/`` here; the checkout's
  ``csrc/`` in a source tree) built by ``torch.utils.cpp_extension.load`` into a cache
  (``$FUSED_CE_CACHE_DIR``, default ``~/.cache/fused_ce``) keyed by the torch and Python
  versions and a hash of the sources and flags, one folder per capability. The first process
  prints a one-line notice on stderr and compiles (about a minute); later ones load the
  cache. Processes that start at once wait for the one that builds (cpp_extension's lock).

Otherwise the backend is unavailable, ``backend="native"`` raises saying why, and the first
look (``backend="auto"`` on a CPU tensor) warns once with the reason and its remedy;
``FUSED_CE_DISABLE_NATIVE=1`` turns the backend off without a warning.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from . import _build

_PREFERENCE = {
    "AVX512": ("avx512", "avx2", "default"),
    "AVX2": ("avx2", "default"),
}

_FOLDER = Path(__file__).parent
BUILT_AT_INSTALL = "built at install"
COMPILED_ON_FIRST_USE = "compiled on first use"


class _Loaded(NamedTuple):
    capability: str | None  # None: unavailable
    origin: str  # BUILT_AT_INSTALL or COMPILED_ON_FIRST_USE (with its cache folder), or ""
    reason: str  # why unavailable, "" when available


def _installed(name: str) -> Path | None:
    """The library ``_C_<name>`` that ``setup.py`` built into this folder, if any."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _FOLDER / f"_C_{name}{suffix}"
        if path.exists():
            return path
    return None


def source_folder() -> Path | None:
    """The C++ sources: shipped in the package (wheel, sdist install) or the checkout's."""
    for folder in (_FOLDER / "csrc", _FOLDER.parent.parent / "csrc"):
        if (folder / _build.KERNEL_SOURCE).is_file():
            return folder
    return None


def cache_folder() -> Path:
    """Where first-use builds go: ``$FUSED_CE_CACHE_DIR``, else ``fused_ce`` in the user's
    cache folder (``$XDG_CACHE_HOME``, default ``~/.cache``)."""
    if os.environ.get("FUSED_CE_CACHE_DIR"):
        return Path(os.environ["FUSED_CE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fused_ce"


def _build_key(sources: Path) -> str:
    """The cache folder's name: torch and Python versions, and a hash of every source and
    flag, so a change of any of them builds anew instead of loading a stale library."""
    digest = hashlib.sha256()
    for path in sorted(sources.glob("*.cpp")) + sorted(sources.glob("*.h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    flags = (
        _build.CAPABILITIES,
        _build.KERNEL_COMPILE_ARGS,
        _build.KERNEL_LINK_ARGS,
        _build.AUTOGRAD_COMPILE_ARGS,
        _build.AUTOGRAD_LINK_ARGS,
    )
    digest.update(repr(flags).encode())
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"torch-{torch.__version__}-{python}-{digest.hexdigest()[:16]}"


class _CompileError(Exception):
    """Why the first-use build cannot run or failed (the message is the reason)."""


def _compile_on_first_use(capability: str) -> Path:
    """Build (or find in the cache) and load ``capability``'s kernels and the autograd
    library; returns the cache folder. Raises :class:`_CompileError` saying why not."""
    sources = source_folder()
    if sources is None:
        raise _CompileError("the C++ sources are not in this installation")
    compiler = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(compiler) is None:
        raise _CompileError(f"no C++ compiler ({compiler!r}) is on the PATH to compile them")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise _CompileError("compiling them needs the ninja build tool (pip install ninja)")
    root = cache_folder() / _build_key(sources)
    builds = (
        (
            root / capability,
            f"fused_ce_native_{capability}",
            (_build.KERNEL_SOURCE,),
            _build.kernel_compile_args(capability),
            _build.KERNEL_LINK_ARGS,
        ),
        (
            root / "autograd",
            "fused_ce_native_autograd",
            _build.AUTOGRAD_SOURCES,
            _build.AUTOGRAD_COMPILE_ARGS,
            _build.AUTOGRAD_LINK_ARGS,
        ),
    )
    if not all((build[0] / f"{build[1]}{cpp_extension.LIB_EXT}").exists() for build in builds):
        print(
            f"fused_ce: compiling the native CPU kernels ({capability}) for torch "
            f"{torch.__version__} into {root}; once, about a minute",
            file=sys.stderr,
            flush=True,
        )
    for folder, name, names, compile_args, link_args in builds:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # Loads the library into the process (kernels first: they define the schemas).
            # Builds under a lock file in `folder`: a process that finds it taken waits.
            cpp_extension.load(
                name=name,
                sources=[str(sources / source) for source in names],
                extra_cflags=compile_args,
                extra_ldflags=link_args,
                extra_include_paths=[str(sources)],
                build_directory=str(folder),
                is_python_module=False,
                verbose=False,
            )
        except (RuntimeError, OSError, ImportError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise _CompileError(
                f"compiling them on first use failed in {folder} ({first})"
            ) from error
    return root


def _load_installed(name: str) -> None:
    """Load ``setup.py``'s libraries: the kernels first (they define the ops' schemas), then
    the capability-independent C++ autograd of the scalar-loss ops."""
    autograd = _installed("autograd")
    if autograd is None:
        raise OSError("its autograd library (_C_autograd) is not built")
    torch.ops.load_library(str(_installed(name)))
    torch.ops.load_library(str(autograd))


@functools.cache
def _load() -> _Loaded:
    """Find, build if need be, and load the libraries; runs once per process."""
    if os.environ.get("FUSED_CE_DISABLE_NATIVE", "0") == "1":
        return _Loaded(None, "", "it is disabled by FUSED_CE_DISABLE_NATIVE=1")
    cpu = torch.backends.cpu.get_cpu_capability()
    preference = _PREFERENCE.get(cpu, ("default",))
    installed = next((name for name in preference if _installed(name) is not None), None)
    not_installed = "they were not built at install"
    loaded = None
    if installed is not None:
        try:
            _load_installed(installed)
            loaded = _Loaded(installed, BUILT_AT_INSTALL, "")
        except OSError as error:
            # E.g. built against another torch: the sources can still be compiled for this one.
            not_installed = f"the libraries built at install do not load ({error})"
    if loaded is None:
        try:
            root = _compile_on_first_use(preference[0])
        except _CompileError as error:
            return _unavailable(
                f"{not_installed} and {error}; the torch path serves CPU tensors, 3-5x slower "
                f"(docs/native.md says how to get them)"
            )
        loaded = _Loaded(preference[0], f"{COMPILED_ON_FIRST_USE} ({root})", "")
    # The one native op that returns a tensor needs a fake kernel: fake tensors (the fake
    # kernels of the fused_ce:: ops under torch.compile) reach it through _outputs.
    torch.library.register_fake("fused_ce_native::empty_output")(_empty_output_fake)
    return loaded


def _unavailable(reason: str) -> _Loaded:
    warnings.warn(f"fused_ce: the native CPU kernels are unavailable: {reason}", stacklevel=3)
    return _Loaded(None, "", reason)


def _empty_output_fake(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def available() -> bool:
    """Whether the native kernels can run here (loads them on the first call, compiling them
    first when nothing was built at install)."""
    return _load().capability is not None


def capability() -> str | None:
    """The CPU capability whose build is loaded (``"avx512"``, ``"avx2"``, ``"default"``), or
    None when the backend is unavailable."""
    return _load().capability


def origin() -> str:
    """Where the loaded libraries come from: ``"built at install"``, or ``"compiled on first
    use (<cache folder>)"``; "" when the backend is unavailable."""
    return _load().origin


def unavailable_reason() -> str:
    """Why the backend is unavailable ("" when it is available)."""
    return _load().reason


def ops():
    """``torch.ops.fused_ce_native``, loading the library first; raises if unavailable."""
    loaded = _load()
    if loaded.capability is None:
        raise RuntimeError(f"backend='native' is unavailable: {loaded.reason}")
    return torch.ops.fused_ce_native


def op(name: str):
    """The overload ``torch.ops.fused_ce_native.<name>.default``, looked up once (the
    per-call path of the scalar losses calls it directly)."""
    overload = _OPS.get(name)
    if overload is None:
        overload = getattr(ops(), name).default
        _OPS[name] = overload
    return overload


_OPS: dict = {}
