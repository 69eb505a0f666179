#!/usr/bin/env bash
# One command on a CUDA machine (H100 / H200, no package registry), from the repository root:
#
#   bash bench/gpu_run.sh OUTDIR
#
# 1. installs the peers' wheels from .whl/ (liger-kernel, cut-cross-entropy; pure Python) with
#    --no-deps into a scratch folder, when .whl/ holds any;
# 2. runs the test suite on CUDA (capped at TESTS_CAP_S seconds; over 8 workers when
#    pytest-xdist is installed) -> tests.log, junit.xml; then bench/determinism.py (60 s cap)
#    -> determinism.json;
# 3. runs the benchmark suite with its ceilings (a soft budget so it ends normally and writes
#    its JSON, plus a hard cap) -> bench.log, bench.json;
# 4. renders bench.md, ce_time.png and frac_bw.png from the JSON.
#
# Every step runs even if an earlier one failed; the exit codes are summarised at the end, and
# the script exits with the first non-zero one. Total wall time stays under TOTAL_S (480 s).
# fused_ce is used from the checkout through PYTHONPATH: nothing is installed. A copy without
# .git can name its commit: FUSED_CE_COMMIT=<sha> bash bench/gpu_run.sh OUTDIR.
set -u

OUTDIR=${1:?usage: bash bench/gpu_run.sh OUTDIR}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-480}
TESTS_CAP_S=${TESTS_CAP_S:-150}
REPORT_RESERVE_S=45
START=$(date +%s)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

elapsed() { echo $(($(date +%s) - START)); }

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fused_ce_peers .whl/*.whl
    rc_peers=$?
    export PYTHONPATH=/tmp/fused_ce_peers${PYTHONPATH:+:$PYTHONPATH}
else
    rc_peers="no wheels in .whl/"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -z "${FUSED_CE_COMMIT:-}" ]; then
    FUSED_CE_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    export FUSED_CE_COMMIT
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu \
    --format=csv 2>&1 | head -3

echo "== tests on CUDA (cap ${TESTS_CAP_S} s)"
# pytest-xdist, where present, spreads the suite over the machine's cores (one GPU is shared).
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-8}")
timeout -k 10 "$TESTS_CAP_S" "$PY" -m pytest tests "${xdist[@]}" -q -rf --maxfail=50 \
    -p no:cacheprovider --junitxml="$OUTDIR/junit.xml" >"$OUTDIR/tests.log" 2>&1
rc_tests=$?
[ "$rc_tests" = 124 ] && echo "tests: stopped at the ${TESTS_CAP_S} s cap" | tee -a "$OUTDIR/tests.log"
tail -n 3 "$OUTDIR/tests.log"

echo "== determinism and batch invariance (cap 60 s) -> determinism.json"
# docs/determinism.md's statements at V 32768 on the GPU, and what batch_invariant costs.
timeout -k 5 60 "$PY" bench/determinism.py --device cuda --out "$OUTDIR/determinism.json" \
    >"$OUTDIR/determinism.log" 2>&1
echo "determinism: exit $? ($(grep -c '"run_to_run": true' "$OUTDIR/determinism.log") ops bitwise run to run)"

# The benchmarks get what is left, less a reserve for the report; the soft budget stops
# starting new cases 60 s before the hard cap, so the JSON is written.
bench_cap=$((TOTAL_S - $(elapsed) - REPORT_RESERVE_S))
bench_budget=$((bench_cap - 60))
echo "== benchmarks (budget ${bench_budget} s, cap ${bench_cap} s) at $(elapsed) s"
timeout -k 10 "$bench_cap" "$PY" -m pytest bench --benchmark-only -q -p no:cacheprovider \
    --bench-budget-s="$bench_budget" --benchmark-json="$OUTDIR/bench.json" \
    --benchmark-columns=median,rounds,iterations >"$OUTDIR/bench.log" 2>&1
rc_bench=$?
[ "$rc_bench" = 124 ] && echo "bench: stopped at the ${bench_cap} s cap" | tee -a "$OUTDIR/bench.log"
tail -n 2 "$OUTDIR/bench.log"

echo "== report at $(elapsed) s"
if [ -f "$OUTDIR/bench.json" ]; then
    timeout -k 5 40 "$PY" bench/report.py "$OUTDIR/bench.json" --out "$OUTDIR"
    rc_report=$?
else
    rc_report="no bench.json"
fi

echo "== summary after $(elapsed) s: peers=$rc_peers tests=$rc_tests bench=$rc_bench report=$rc_report"
echo "tests: $(grep -E '(passed|failed|error)' "$OUTDIR/tests.log" | tail -n 1)"
echo "bench: $(grep -cE 'skipped|SKIPPED' "$OUTDIR/bench.log") skip lines; $(tail -n 1 "$OUTDIR/bench.log")"
if [ -f "$OUTDIR/bench.md" ]; then
    sed -n '/^## Goals/,/^## Results/p' "$OUTDIR/bench.md" | head -n 80
fi
for rc in "$rc_tests" "$rc_bench" "$rc_report"; do
    case $rc in
    0) ;;
    *[!0-9]*) exit 1 ;;
    *) exit "$rc" ;;
    esac
done
exit 0
