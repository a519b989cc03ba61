#!/usr/bin/env bash
# The GPU check of issue #26 in one command (at most 8 minutes on a CUDA machine):
#
#   bash benchmarks/gpu_check.sh OUT [--dry-run] [--steps quickstart,dpsgd,bench]
#
# 1. Where flwr, ray, opacus or open_clip cannot be imported and gpu-bundle/ is here (built
#    on a machine with PyPI by benchmarks/gpu_bundle.py), installs the bundle offline into a
#    venv that reuses the machine's torch and timm (--system-site-packages).
# 2. Runs benchmarks/gpu_check.py: the quickstart with 3 clients packed on the GPU, one
#    round of DP-SGD, fl-sim bench's GPU rows; OUT/results.md is the table, OUT/logs/ the
#    logs. Caches and checkpoints go to a temporary folder, not OUT.
# Exit 0: every checked target met; 1: one was not (or a step failed); 3: install failed.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_check.sh OUT [--dry-run] [--steps ...]}"
shift
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$repo"
start=$(date +%s)
py="${PYTHON:-python3}"
if [[ -x "$repo/.venv/bin/python" && -z "${PYTHON:-}" && ! -e /dev/nvidia0 ]]; then
    py="$repo/.venv/bin/python"  # a development machine: its venv
fi
if [[ " $* " != *" --dry-run "* ]] && ! "$py" -c "import flwr, ray, opacus, open_clip" 2>/dev/null; then
    if [[ ! -f gpu-bundle/install.sh ]]; then
        echo "fl-sim's dependencies are missing and there is no gpu-bundle/ (python benchmarks/gpu_bundle.py builds it)" >&2
        exit 3
    fi
    echo "installing gpu-bundle/ into /tmp/fl-sim-gpu-venv ..."
    if ! bash gpu-bundle/install.sh /tmp/fl-sim-gpu-venv > "$out/install.log" 2>&1; then
        tail -30 "$out/install.log"
        exit 3
    fi
    tail -3 "$out/install.log"
    py=/tmp/fl-sim-gpu-venv/bin/python
fi
{ nvidia-smi; "$py" -m pip list 2>/dev/null; } > "$out/environment.txt" 2>&1
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
left=$(( ${GPU_CHECK_LIMIT_S:-470} - ($(date +%s) - start) ))
timeout --signal=TERM --kill-after=20 "$left" "$py" benchmarks/gpu_check.py "$out" \
    --budget-s $(( left - 25 )) "$@" 2>&1 | tee "$out/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check: exit $rc after $(( $(date +%s) - start )) s; table: $out/results.md"
exit "$rc"
