#!/usr/bin/env bash
# The torch adapter on a CUDA GPU, in one command (issue 21):
#
#     benchmarks/gpu_check.sh [report.md]        (PYTHON=... to pick the interpreter)
#
# 1. the torch tests with CUDA tensors: the sync-free, GradScaler and fullgraph-compile tests
#    (tests/torch/test_torch_gpu_ready.py, DUALOPT_TORCH_DEVICE=cuda), then the fast/reference
#    equivalence, the compile tests and the non-finite reliability tests with cuda as torch's
#    default device (tests/torch/_cuda_default.py);
# 2. the step-cost benchmark on cuda against fused AdamW and the guarded (GradScaler) route.
# Writes one report (default gpu_check.md) and exits 0 with a message where torch sees no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${1:-gpu_check.md}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: torch sees no CUDA GPU here; nothing was run (this check needs a GPU machine)."
    exit 0
fi
tests_rc=0
row() {  # row <label> <pytest args...>: one table row from pytest's summary line
    local label=$1; shift
    local log; log=$(mktemp)
    "$PY" -m pytest -q -p no:cacheprovider "$@" >"$log" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || tests_rc=$rc
    echo "| $label | $(grep -E '(passed|failed|error)' "$log" | tail -1) |" >>"$OUT"
    grep -E '^(FAILED|ERROR)' "$log" | head -20 | sed 's/^/    /' >>"$OUT.failures"
    rm -f "$log"
}
: >"$OUT.failures"
{
    echo "# DualOpt torch GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    "$PY" -c 'import torch; print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")'
    echo
    echo "| tests (cuda) | result |"
    echo "|---|---|"
} >"$OUT"
DUALOPT_TORCH_DEVICE=cuda row "sync-free step, GradScaler, fullgraph compile" tests/torch/test_torch_gpu_ready.py
row "fast vs reference equivalence (default device cuda)" -p tests.torch._cuda_default \
    tests/torch/test_torch_equivalence.py
row "torch.compile tests (default device cuda)" -p tests.torch._cuda_default \
    tests/torch/test_torch_integration.py -k compil
row "non-finite reliability (default device cuda)" -p tests.torch._cuda_default \
    tests/torch/test_torch_nonfinite.py
if [ -s "$OUT.failures" ]; then { echo; echo "Failures:"; echo; cat "$OUT.failures"; } >>"$OUT"; fi
rm -f "$OUT.failures"
{
    echo
    echo '## step cost on cuda (benchmarks/step_cost_torch.py --device cuda)'
    echo
    echo '```'
    "$PY" benchmarks/step_cost_torch.py --device cuda --no-reference --sets 8x1024^2,vit-b 2>&1
    echo '```'
} >>"$OUT"
cat "$OUT"
echo "gpu_check: report written to $OUT"
exit $tests_rc
