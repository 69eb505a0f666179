"""bench/report.py, the report `make bench` prints: the time of a case is its fastest round, a
case with too few rounds or a wide spread is marked unstable instead of reported, and the bound
columns and goals are printed."""

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402


def _record(provider: str, pass_name: str, fastest: float, median: float, rounds: int) -> dict:
    shape = [4096, 1000]
    bytes_min = 4096 * 1000 * 2 * (2 if pass_name == "fwd+bwd" else 1) + 12 * 4096
    return {
        "extra_info": {
            "family": "ce",
            "workload": "grid",
            "shape": shape,
            "dtype": "bfloat16",
            "provider": provider,
            "pass": pass_name,
            "bytes_min": bytes_min,
            "copy_gbps": 100.0,
            "peak_mem_bytes": 2 * bytes_min,
            "ratio": 2.0,
        },
        "stats": {"min": fastest, "median": median, "rounds": rounds},
    }


def test_report_prints_bounds_and_marks_unstable_rows(tmp_path, capsys):
    results = {
        "machine_info": {"fused_ce": {"device": "cpu", "torch_threads": 2}},
        "datetime": "2026-11-29T06:00:00",
        "benchmarks": [
            # Stable: 8.24 MB in 100 us are 82.41 GB/s, 82.4% of the 100 GB/s copy bound.
            _record("fused_ce-torch", "fwd", 1e-4, 1.2e-4, 10),
            _record("torch-eager", "fwd", 5e-5, 1.5e-4, 10),  # median 3x the fastest
            _record("fused_ce-torch", "fwd+bwd", 2e-4, 2e-4, 1),  # one round
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(results))
    report.main([str(path), "--out", str(tmp_path), "--print"])
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| grid |")]
    assert rows[0].startswith("| grid | 4096x1000 | bfloat16 | fwd | fused_ce-torch | 100.0 µs |")
    assert "| 82.41 | 82.4% |" in rows[0]
    assert "| torch-eager | unstable (median +200%) | - | - |" in rows[1]
    assert "| fwd+bwd | fused_ce-torch | unstable (1 round) | - | - |" in rows[2]
    assert "| 4096x1000 | bfloat16 | fwd+bwd | - | unstable (1 round) |" in printed
    assert "## Goals" in printed
    # Summary, results and goals: each unstable time marked where it would have been shown.
    assert printed.count("unstable (") == 5
    assert printed.split("\nwrote ")[0].strip() in (tmp_path / "bench.md").read_text()
