"""Turn a pytest-benchmark results JSON from this suite into a markdown report and PNG plots.

    python bench/report.py results.json --out DIR

writes ``DIR/bench.md`` (header with device, date, commit, versions, ceilings and command; a
summary table; one table per loss family; the issue's goals with the numbers that meet or miss
them), ``DIR/ce_time.png`` (CE time against C per provider) and ``DIR/frac_bw.png`` (fraction
of the copy-bandwidth bound per provider). With ``--print`` it also prints a digest for the
terminal: what ran and what did not (absent peers, deselected cases), the summary table, one
line per goal and where the full report is. Every number comes from the one JSON: one run, one
device.

The goals and the bound column are judged on the provider ``backend="auto"`` runs on the
benchmarked machine (recorded in the machine info; Triton on a GPU, the native kernels on a CPU
where they are built, else the torch path), the one a user's call gets.

A case's time is its fastest round. A case whose median round is more than
``UNSTABLE_SPREAD`` above that, or that ran fewer than ``MIN_ROUNDS`` rounds, is marked
unstable and left out of the results: its minimum says more about the machine's load than
about the op.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

PROVIDER_ORDER = (
    "fused_ce-triton",
    "fused_ce-triton-fused",
    "fused_ce-native",
    "fused_ce-torch",
    "torch-eager",
    "torch-compile",
    "torch-chunked",
    "liger",
    "cce",
)
FAMILY_TITLES = {
    "bce": "Sigmoid + BCE on logits",
    "ce": "Softmax + CE on logits",
    "linear_ce": "Fused linear + CE",
    "linear_bce": "Fused linear + BCE",
}
# The providers of backend="auto", in the order it prefers them (fused_ce/_backend.py).
AUTO_PREFERENCE = ("fused_ce-triton", "fused_ce-native", "fused_ce-torch")
# The peers of machine_info["fused_ce"]["peers"]: the provider each one is, and where it runs.
PEERS = {
    "liger-kernel": ("liger", "CUDA only"),
    "cut-cross-entropy": ("cce", "CUDA only"),
    "torch.nn.functional.linear_cross_entropy": ("torch-chunked", "torch >= 2.13"),
}
GOAL_FRACTION = 0.85
MAJORITY_SLACK = 1.2
UNSTABLE_SPREAD = 0.5
MIN_ROUNDS = 3


def load(path: Path) -> tuple[dict, list[dict]]:
    """The run's metadata and one flat record per benchmark: extra_info, the fastest round
    (``time_s``), the median one, the spread between them, and the rates of ``time_s``
    (recomputed, so files that stored the median's rates read the same way)."""
    data = json.loads(path.read_text())
    records = []
    for bench in data["benchmarks"]:
        record = dict(bench["extra_info"])
        if "provider" not in record:
            continue  # not one of this suite's records
        stats = bench["stats"]
        record.update(time_s=stats["min"], median_s=stats["median"], rounds=stats["rounds"])
        record["spread"] = stats["median"] / stats["min"] - 1 if stats["min"] else 0.0
        record["shape"] = tuple(record["shape"])
        if record.get("bytes_min") and record.get("copy_gbps") and stats["min"]:
            record["gbps"] = record["bytes_min"] / stats["min"] / 1e9
            record["frac_copy_bw"] = record["gbps"] / record["copy_gbps"]
        if record.get("flops") and record.get("matmul_tflops") and stats["min"]:
            record["tflops"] = record["flops"] / stats["min"] / 1e12
            record["frac_matmul"] = record["tflops"] / record["matmul_tflops"]
        records.append(record)
    return data, records


def stable(record: dict) -> bool:
    """Enough rounds, and the median round close to the fastest."""
    return record["rounds"] >= MIN_ROUNDS and record["spread"] <= UNSTABLE_SPREAD


def unstable_text(record: dict) -> str:
    if record["rounds"] < MIN_ROUNDS:
        return f"unstable ({record['rounds']} round{'s' * (record['rounds'] > 1)})"
    return f"unstable (median +{record['spread']:.0%})"


def card_name(device: str, threads: int | None) -> str:
    """Folder name for bench/results/: ``h100``, ``h200``, ``cpu-2core``..."""
    if device == "cpu":
        return f"cpu-{threads}core" if threads else "cpu"
    match = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", device.replace("NVIDIA", ""))
    return match.group(1).lower() if match else re.sub(r"\W+", "-", device.lower()).strip("-")


def fused_provider(data: dict, records: list[dict]) -> str:
    """The fused_ce provider the goals and the bound column are judged on: the one
    ``backend="auto"`` ran on the benchmarked machine (``auto_backend`` in the machine info);
    in results from before that was recorded, the first of auto's preferences that ran."""
    providers = {r["provider"] for r in records}
    auto = data["machine_info"].get("fused_ce", {}).get("auto_backend")
    if auto and f"fused_ce-{auto}" in providers:
        return f"fused_ce-{auto}"
    return next((p for p in AUTO_PREFERENCE if p in providers), "fused_ce-torch")


def absent_peers(info: dict) -> list[str]:
    """``"name (why)"`` for each peer that did not run: not installed, or not for this device."""
    absent = []
    cpu = info.get("device") == "cpu"
    for name, status in info.get("peers", {}).items():
        _, where = PEERS.get(name, (name, ""))
        reasons = []
        if cpu and where == "CUDA only":
            reasons.append(where)
        if status.startswith(("un", "ab")):
            reasons.append("not installed" if "ModuleNotFoundError" in status else status)
        if reasons:
            absent.append(f"{name} ({'; '.join(reasons)})")
    return absent


def deselected_runs(info: dict) -> dict:
    """The machine info's ``deselected``; for a CPU run from before it was recorded, a note on
    the slow shapes such a run leaves out unless ``--bench-full-cpu`` is given."""
    if "deselected" in info:
        return info["deselected"]
    if info.get("device") == "cpu" and info.get("full_cpu") is False:
        return {"note": "the slow CPU shapes were deselected (--bench-full-cpu runs them)"}
    return {}


def deselection_text(deselected: dict) -> str:
    """One line on the cases the suite left out (``deselected`` in the machine info: the runs,
    each a case and a provider, and the reason); empty when none were."""
    runs = deselected.get("runs", [])
    if not runs:
        return deselected.get("note", "")
    cases = sorted({run["case"] for run in runs})
    return f"{len(runs)} runs of {len(cases)} cases deselected ({'; '.join(cases)}): " + (
        deselected.get("reason", "?")
    )


def _key(r: dict) -> tuple:
    return (r["family"], r["workload"], r["shape"], r["dtype"], r["pass"])


def _provider_rank(name: str) -> int:
    return PROVIDER_ORDER.index(name) if name in PROVIDER_ORDER else len(PROVIDER_ORDER)


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def header(data: dict, records: list[dict]) -> list[str]:
    info = data["machine_info"].get("fused_ce", {})
    device = info.get("device", "?")
    card = card_name(device, info.get("torch_threads"))
    peers = info.get("peers", {})
    versions = [f"torch {info.get('torch')}", f"triton {info.get('triton')}"]
    versions.append(f"fused_ce {info.get('fused_ce')}")
    versions += [f"{name} {v}" for name, v in peers.items() if not v.startswith(("un", "ab"))]
    ceilings = info.get("ceilings", {})
    ceiling_text = [f"copy {ceilings.get('copy_gbps', '?')} GB/s (bytes read + written)"]
    ceiling_text += [
        f"matmul {k.removeprefix('matmul_tflops_')} {v} TFLOP/s"
        for k, v in ceilings.items()
        if k.startswith("matmul")
    ]
    cpu = data["machine_info"].get("cpu", {}).get("brand_raw", "")
    command = info.get("command", "?")
    if info.get("omp_wait_policy"):
        command = f"OMP_WAIT_POLICY={info['omp_wait_policy']} {command}"
    lines = [
        f"# fused_ce benchmarks: {device} ({card})",
        "",
        "| | |",
        "| --- | --- |",
        f"| device | {device}" + (f"; host CPU {cpu}" if cpu else "") + " |",
        f"| date (UTC) | {data.get('datetime', '?')[:19]} |",
        f"| commit | {info.get('commit', '?')} |",
        f"| versions | {', '.join(versions)} |",
        f"| ceilings (measured in this run) | {'; '.join(ceiling_text)} |",
        f"| command | `{command}` |",
        f"| torch threads | {info.get('torch_threads')} of {info.get('cpu_count')} CPUs |",
    ]
    if device == "cpu":
        lines.append(
            f"| load average (1, 5, 15 min) | start {info.get('loadavg_1_5_15_start')}, "
            f"end {info.get('loadavg_1_5_15_end')} |"
        )
    absent = absent_peers(info)
    if absent:
        lines.append(f"| peers not run | {'; '.join(absent)} |")
    deselected = deselection_text(deselected_runs(info))
    if deselected:
        lines.append(f"| deselected | {deselected} |")
    if info.get("duration_s") is not None:
        lines.append(f"| run time | {info['duration_s'] / 60:.1f} min (pytest session) |")
    lines.append(f"| records | {len(records)} |")
    return lines


def goals(records: list[dict], fused: str) -> tuple[list[str], list[str]]:
    """The issue's targets, judged on ``fused``'s numbers in this run (visible here, never
    asserted): the markdown section, and one line per goal with its count for the terminal."""
    by_key: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        by_key[_key(r)][r["provider"]] = r
    lines = [
        "## Goals",
        "",
        f'Judged on `{fused}`: what `backend="auto"` runs on this device.',
    ]
    brief = []

    def fraction_goal(title: str, family: str, passes: tuple[str, ...], dtypes: tuple) -> None:
        rows = []
        met = judged = 0
        for key, provs in sorted(by_key.items()):
            fam, workload, shape, dtype, pass_name = key
            if fam != family or workload != "grid" or pass_name not in passes or fused not in provs:
                continue
            if dtypes and dtype not in dtypes:
                continue
            record = provs[fused]
            frac = record.get("frac_copy_bw")
            ok = frac is not None and frac >= GOAL_FRACTION
            judged += stable(record)
            met += ok and stable(record)
            verdict = ("met" if ok else "missed") if stable(record) else unstable_text(record)
            shown = fmt_pct(frac) if stable(record) else "-"
            rows.append(
                f"| {'x'.join(map(str, shape))} | {dtype} | {pass_name} | {shown} | {verdict} |"
            )
        lines.extend(["", f"**{title}**", ""])
        if rows:
            lines.extend(
                ["| shape | dtype | pass | of bound | goal |", "| --- | --- | --- | --- | --- |"]
            )
            lines.extend(rows)
        else:
            lines.append("no records")
        brief.append(f"{title}: {met} of {judged} met" if rows else f"{title}: no records")

    fraction_goal(
        f"CE forward+backward on bf16 logits at >= {GOAL_FRACTION:.0%} of the bound "
        "(one read of the logits, one write of the gradient)",
        "ce",
        ("fwd+bwd",),
        ("bfloat16",),
    )
    fraction_goal(f"BCE at >= {GOAL_FRACTION:.0%} of its bound", "bce", ("fwd", "fwd+bwd"), ())

    title = "Ahead of torch.compile and Liger-Kernel wherever they ran"
    lines.extend(["", f"**{title}**", ""])
    rows = []
    unstable = 0
    for key, provs in sorted(by_key.items()):
        if fused not in provs:
            continue
        for peer in ("torch-compile", "liger", "cce"):
            if peer not in provs:
                continue
            if stable(provs[peer]) and stable(provs[fused]):
                rows.append((key, peer, provs[peer]["time_s"] / provs[fused]["time_s"]))
            else:
                unstable += 1
    behind = [row for row in rows if row[2] <= 1.0]
    ahead = f"{len(rows) - len(behind)} of {len(rows)} comparisons ahead"
    left_out = f"; {unstable} left out, a time in them unstable" if unstable else ""
    lines.append(f"{ahead} (ratio = peer time / fused_ce time; > 1 is ahead){left_out}.")
    brief.append(f"{title}: {ahead}{left_out}")
    if behind:
        lines += ["", "| case | peer | ratio |", "| --- | --- | --- |"]
        for key, peer, ratio in behind:
            fam, workload, shape, dtype, pass_name = key
            case = f"{fam} {workload} {'x'.join(map(str, shape))} {dtype} {pass_name}"
            lines.append(f"| {case} | {peer} | {ratio:.2f} |")

    title = f"Majority-bits step within {MAJORITY_SLACK} x torch's per-call time"
    lines.extend(
        [
            "",
            f"**{title}**",
            "",
            "| case | fused_ce | torch eager | ratio | goal |",
            "| --- | --- | --- | --- | --- |",
        ]
    )
    met = judged = 0
    for key, provs in sorted(by_key.items()):
        fam, workload, shape, dtype, pass_name = key
        if workload != "majority-bits" or fused not in provs or "torch-eager" not in provs:
            continue
        ours, eager = provs[fused], provs["torch-eager"]
        case = f"{fam} {'x'.join(map(str, shape))} {pass_name}"
        if not (stable(ours) and stable(eager)):
            texts = [
                fmt_time(r["time_s"]) if stable(r) else unstable_text(r) for r in (ours, eager)
            ]
            lines.append(f"| {case} | {texts[0]} | {texts[1]} | - | unstable |")
            continue
        ratio = ours["time_s"] / eager["time_s"]
        judged += 1
        met += ratio <= MAJORITY_SLACK
        lines.append(
            f"| {case} | {fmt_time(ours['time_s'])} | {fmt_time(eager['time_s'])} | "
            f"{ratio:.2f} | {'met' if ratio <= MAJORITY_SLACK else 'missed'} |"
        )
    brief.append(f"{title}: {met} of {judged} met")
    return lines, brief


def summary(records: list[dict], fused: str) -> list[str]:
    """Providers side by side: one row per case, each provider's time per call, and ``fused``'s
    fraction of the bound (bytes for the losses, FLOPs for the fused linear ops)."""
    providers = sorted({r["provider"] for r in records}, key=_provider_rank)
    by_key: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        by_key[_key(r)][r["provider"]] = r
    lines = [
        "## Summary",
        "",
        f"Time per call (fastest round); the last column is `{fused}`'s fraction of the bound "
        "(copy bandwidth for the losses, matmul rate for the fused linear ops): "
        f'`{fused}` is what `backend="auto"` runs on this device. Fastest time '
        "in bold; `unstable`: too few rounds, or a median round more than "
        f"{UNSTABLE_SPREAD:.0%} slower than the fastest (no result).",
        "",
        "| case | " + " | ".join(providers) + f" | {fused} of bound |",
        "| --- |" + " --: |" * (len(providers) + 1),
    ]
    order = list(FAMILY_TITLES)
    for key in sorted(by_key, key=lambda k: (order.index(k[0]), *k[1:])):
        provs = by_key[key]
        fastest = min((r["time_s"] for r in provs.values() if stable(r)), default=None)
        cells = []
        for name in providers:
            record = provs.get(name)
            if record is None:
                cells.append("-")
            elif not stable(record):
                cells.append(unstable_text(record))
            else:
                text = fmt_time(record["time_s"])
                cells.append(f"**{text}**" if record["time_s"] == fastest else text)
        ours = provs.get(fused, {})
        bound = (
            ours.get("frac_matmul" if key[0].startswith("linear") else "frac_copy_bw")
            if ours and stable(ours)
            else None
        )
        family, workload, shape, dtype, pass_name = key
        case = f"{family} {workload} {'x'.join(map(str, shape))} {dtype} {pass_name}"
        lines.append(f"| {case} | " + " | ".join(cells) + f" | {fmt_pct(bound)} |")
    return lines


def tables(records: list[dict]) -> list[str]:
    eager_time = {
        _key(r): r["time_s"] for r in records if r["provider"] == "torch-eager" and stable(r)
    }
    lines = [
        "## Results",
        "",
        "Time per call: the fastest of the rounds (`unstable` where too few rounds ran or the "
        f"median round was more than {UNSTABLE_SPREAD:.0%} slower: no result). "
        "GB/s = `bytes_min` / time; % copy = that over the measured copy "
        "bandwidth. TFLOP/s = matmul FLOPs / time (linear ops). Peak = memory live at the peak, "
        "inputs included; x bound = peak / (inputs + outputs + gradients). x eager = eager "
        "time / this time (> 1 is faster). docs/benchmarks.md defines each column.",
    ]
    families = sorted({r["family"] for r in records}, key=list(FAMILY_TITLES).index)
    for family in families:
        rows = sorted(
            (r for r in records if r["family"] == family),
            key=lambda r: (*_key(r), _provider_rank(r["provider"])),
        )
        linear = family.startswith("linear")
        head = "| workload | shape | dtype | pass | provider | time | GB/s | % copy |"
        rule = "| --- | --- | --- | --- | --- | --: | --: | --: |"
        if linear:
            head += " TFLOP/s | % matmul |"
            rule += " --: | --: |"
        head += " peak | x bound | x eager |"
        rule += " --: | --: | --: |"
        lines += ["", f"### {FAMILY_TITLES.get(family, family)}", "", head, rule]
        for r in rows:
            row = (
                f"| {r['workload']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | "
                f"{r['pass']} | {r['provider']} |"
            )
            if stable(r):
                eager = eager_time.get(_key(r))
                speedup = f"{eager / r['time_s']:.2f}" if eager else "-"
                row += (
                    f" {fmt_time(r['time_s'])} | {r.get('gbps', 0):.4g} | "
                    f"{fmt_pct(r.get('frac_copy_bw'))} |"
                )
                if linear:
                    row += f" {r.get('tflops', 0):.4g} | {fmt_pct(r.get('frac_matmul'))} |"
            else:
                speedup = "-"
                row += f" {unstable_text(r)} | - | - |" + (" - | - |" if linear else "")
            row += f" {fmt_bytes(r.get('peak_mem_bytes'))} | {r.get('ratio', '-')} | {speedup} |"
            lines.append(row)
    return lines


def plot(records: list[dict], device: str, out: Path) -> list[Path]:
    """``ce_time.png`` and ``frac_bw.png``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    records = [r for r in records if stable(r)]
    grid = [r for r in records if r["workload"] == "grid" and r["family"] == "ce"]
    panels = sorted({(r["shape"][0], r["dtype"], r["pass"]) for r in grid})
    if panels:
        cols = min(4, len(panels))
        rows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
        for ax, (n, dtype, pass_name) in zip(axes.flat, panels, strict=False):
            subset = [
                r for r in grid if (r["shape"][0], r["dtype"], r["pass"]) == (n, dtype, pass_name)
            ]
            for provider in sorted({r["provider"] for r in subset}, key=_provider_rank):
                points = sorted(
                    (r["shape"][1], r["time_s"] * 1e3) for r in subset if r["provider"] == provider
                )
                ax.plot(*zip(*points, strict=True), marker="o", label=provider)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"CE N={n} {dtype} {pass_name}", fontsize=9)
            ax.set_xlabel("classes C")
            ax.set_ylabel("ms per call")
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"fused_ce: CE time against C ({device})", fontsize=10)
        fig.tight_layout()
        path = out / "ce_time.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    bw = [r for r in records if r["workload"] == "grid" and r["family"] in ("ce", "bce")]
    panels = sorted({(r["family"], r["pass"]) for r in bw})
    if panels:
        fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.8 * len(panels)), squeeze=False)
        for ax, (family, pass_name) in zip(axes.flat, panels, strict=True):
            subset = [r for r in bw if (r["family"], r["pass"]) == (family, pass_name)]
            cases = sorted({(r["shape"], r["dtype"]) for r in subset})
            providers = sorted({r["provider"] for r in subset}, key=_provider_rank)
            width = 0.8 / len(providers)
            for i, provider in enumerate(providers):
                values = {
                    (r["shape"], r["dtype"]): r.get("frac_copy_bw", 0)
                    for r in subset
                    if r["provider"] == provider
                }
                xs = [j + i * width for j in range(len(cases))]
                ax.bar(xs, [values.get(c, 0) for c in cases], width, label=provider)
            ax.axhline(GOAL_FRACTION, color="k", linestyle="--", linewidth=0.8)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
            labels = [f"{'x'.join(map(str, s))}\n{d}" for s, d in cases]
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_ylabel("of copy bandwidth")
            ax.set_title(f"{family.upper()} {pass_name}: fraction of the bytes bound", fontsize=9)
            ax.legend(fontsize=7, ncol=len(providers))
        fig.suptitle(f"fused_ce: achieved / copy bandwidth ({device}); dashed: goal", fontsize=10)
        fig.tight_layout()
        path = out / "frac_bw.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def digest(data: dict, records: list[dict], fused: str, goal_lines: list[str]) -> list[str]:
    """What the terminal gets: what ran and what did not, the summary table, the goals' counts."""
    info = data["machine_info"].get("fused_ce", {})
    device = info.get("device", "?")
    card = card_name(device, info.get("torch_threads"))
    providers = sorted({r["provider"] for r in records}, key=_provider_rank)
    took = f" in {info['duration_s'] / 60:.1f} min" if info.get("duration_s") else ""
    lines = [
        f"fused_ce benchmarks on {device} ({card}): {len(records)} records{took}, of "
        f"{', '.join(providers)}",
        f"judged on {fused}: what backend='auto' runs here",
    ]
    absent = absent_peers(info)
    if absent:
        lines.append(f"peers not run: {'; '.join(absent)}")
    deselected = deselection_text(deselected_runs(info))
    if deselected:
        lines.append(deselected)
    unstable = sum(not stable(r) for r in records)
    if unstable:
        lines.append(
            f"unstable: {unstable} records (too few rounds or a median round more than "
            f"{UNSTABLE_SPREAD:.0%} above the fastest; no result)"
        )
    lines += ["", *summary(records, fused)[4:], "", "Goals:"]
    lines += [f"- {line}" for line in goal_lines]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="JSON written by --benchmark-json")
    parser.add_argument("--out", type=Path, required=True, help="folder for bench.md and PNGs")
    parser.add_argument(
        "--print",
        action="store_true",
        help="also print a digest: what ran, the summary table, the goals (make bench)",
    )
    args = parser.parse_args(argv)
    data, records = load(args.results)
    args.out.mkdir(parents=True, exist_ok=True)
    device = data["machine_info"].get("fused_ce", {}).get("device", "?")
    fused = fused_provider(data, records)
    written = plot(records, device, args.out)
    goal_sections, goal_lines = goals(records, fused)
    lines = header(data, records)
    lines += ["", *(f"![{p.stem}]({p.name})" for p in written)]
    lines += ["", *summary(records, fused), "", *tables(records), "", *goal_sections, ""]
    report = args.out / "bench.md"
    report.write_text("\n".join(lines))
    if args.print:
        print("\n".join(digest(data, records, fused, goal_lines)), end="\n\n")
    print(f"full report (all tables, goals, plots): {report}; {len(written)} plots")


if __name__ == "__main__":
    main()
