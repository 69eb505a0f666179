#!/usr/bin/env bash
# Issue 22's deciding cases on a CUDA machine (H100 / H200, no package registry), from the
# repository root; writes bench/results/h200/issue22.json (or OUT) and a log beside it:
#
#   bash bench/issue22_run.sh [OUT.json]
#
# Installs nothing into the environment: the peers' wheels in .whl/ (liger-kernel,
# cut-cross-entropy; pure Python) go --no-deps into a scratch folder on PYTHONPATH, as
# bench/gpu_run.sh does, and fused_ce is used from the checkout. The Python part stops starting
# cases after BUDGET_S (300 s) and always writes its JSON; a hard cap of BUDGET_S + 150 s
# bounds the run. FUSED_CE_COMMIT=<sha> names the commit of a copy without .git.
set -u
OUT=${1:-bench/results/h200/issue22.json}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-300}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fused_ce_peers .whl/*.whl
    export PYTHONPATH=/tmp/fused_ce_peers${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -z "${FUSED_CE_COMMIT:-}" ]; then
    FUSED_CE_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    export FUSED_CE_COMMIT
fi
mkdir -p "$(dirname "$OUT")"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | head -2
timeout -k 10 $((BUDGET_S + 150)) "$PY" bench/issue22.py "$OUT" --budget-s "$BUDGET_S" \
    2>&1 | tee "${OUT%.json}.log"
exit "${PIPESTATUS[0]}"
