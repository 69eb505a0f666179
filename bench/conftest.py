"""Benchmark suite set-up: `pytest bench --benchmark-only`.

Collects ``bench_*.py`` (the project's ``testpaths`` is ``tests/``, so ``pytest`` alone never
runs these), measures the device's copy bandwidth and matmul rate once per session, orders the
cases so that a time budget drops the least important ones, and adds the device, versions,
commit and ceilings to the machine info of the results JSON.

Options: ``--bench-full-cpu`` adds the slow CPU shapes (linear 8192 x 512 x 32768);
``--bench-budget-s S`` skips the cases that would start after S seconds, so that a capped run
still ends normally and writes its JSON. The cases left out, and why, go to the terminal
summary and to the machine info, where bench/report.py reads them.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from benchlib import CUDA, PRIORITY, Ceilings, configure_compile, device_info, git_commit
from report import deselection_text

_session: dict[str, object] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fused_ce benchmarks")
    group.addoption(
        "--bench-full-cpu",
        action="store_true",
        help="on CPU, also run the slow shapes (linear 8192 x 512 x 32768: minutes)",
    )
    group.addoption(
        "--bench-budget-s",
        type=float,
        default=0.0,
        help="skip cases that would start after this many seconds (0: no budget)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "full_cpu: a slow CPU shape, run with --bench-full-cpu")
    configure_compile()
    _session["start"] = time.monotonic()
    _session["loadavg_start"] = _loadavg()
    _session["commit"] = git_commit()


def _loadavg() -> list[float]:
    # Other processes on the machine inflate CPU timings: the results record the load.
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(trylast=True)  # after -k/-m: count only the cases those selected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not CUDA and not config.getoption("--bench-full-cpu"):
        deselected = [item for item in items if item.get_closest_marker("full_cpu")]
        _session["deselected"] = [_case_name(item) for item in deselected]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if not item.get_closest_marker("full_cpu")]

    def priority(item: pytest.Item) -> tuple[int, bool, bool]:
        # Providers by PRIORITY; within one, forward+backward and bf16 first (the goals' cases).
        params = item.callspec.params if hasattr(item, "callspec") else {}
        case = params.get("case")
        return (
            PRIORITY.get(params.get("provider"), 0),
            not getattr(case, "backward", True),
            getattr(case, "dtype", None) is not torch.bfloat16,
        )

    items.sort(key=priority)  # stable: file and parameter order within a key


def _case_name(item: pytest.Item) -> dict[str, str]:
    """The case (its pytest-benchmark group, as the report names a row) and the provider."""
    params = item.callspec.params
    return {"case": params["case"].group, "provider": params["provider"]}


FULL_CPU_REASON = "slow on a CPU (minutes per case); --bench-full-cpu runs them"


def pytest_terminal_summary(terminalreporter) -> None:
    # pytest only counts the deselected cases: say which, and why.
    text = deselection_text({"runs": _session.get("deselected", []), "reason": FULL_CPU_REASON})
    if text:
        terminalreporter.write_line(f"fused_ce benchmarks: {text}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    budget = item.config.getoption("--bench-budget-s")
    if budget and time.monotonic() - _session["start"] > budget:
        pytest.skip(f"benchmark time budget of {budget:.0f} s spent")


@pytest.fixture(scope="session")
def ceilings() -> Ceilings:
    """Copy-bandwidth and matmul ceilings, measured once in this run."""
    measured = Ceilings()
    _session["ceilings"] = measured
    return measured


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    info = device_info(str(_session.get("commit", "unknown")))
    measured = _session.get("ceilings")
    info["ceilings"] = measured.as_dict() if isinstance(measured, Ceilings) else {}
    info["full_cpu"] = bool(config.getoption("--bench-full-cpu"))
    info["command"] = " ".join(["pytest", *config.invocation_params.args])
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    info["loadavg_1_5_15_start"] = _session.get("loadavg_start", [])
    info["loadavg_1_5_15_end"] = _loadavg()
    info["duration_s"] = round(time.monotonic() - _session["start"], 1)
    info["deselected"] = {"runs": _session.get("deselected", []), "reason": FULL_CPU_REASON}
    machine_info["fused_ce"] = info


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    # Keep the results small enough to commit: the per-round times are summarised in stats.
    for bench in output_json.get("benchmarks", []):
        bench.get("stats", {}).pop("data", None)
