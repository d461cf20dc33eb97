#!/usr/bin/env bash
# One-command GPU check of the kernel layer (issue #12): GPU tests + the four target ratios.
#
#   bench/gpu_check.sh            # on a GPU machine: compiled-kernel tests, then the targets
#   bench/gpu_check.sh --dry-run  # on CPU: imports, shapes, interpreter smoke, target lines
#
# Runs from the working tree; the project need not be installed (a PYTHONPATH shim maps the
# adaptsim.* names to the top-level folders, as pyproject's package-dir does). Needs only
# torch, triton, pytest (and optionally peft for the PEFT column). No network. Budget: about
# 2 min of tests + 2 min of benchmark (each step has a hard timeout); prints one line per target.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1

SHIM="$(mktemp -d)"
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/adaptsim"
for pkg in cl strategies federated kernels; do ln -s "$ROOT/$pkg" "$SHIM/adaptsim/$pkg"; done
export PYTHONPATH="$SHIM:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
# --noconftest: tests/conftest.py imports adaptsim.cl (datasets, torchvision), which the kernel
# tests do not need; the GPU machine may not have those extras.
PYTEST=("$PY" -m pytest -q -x --noconftest -p no:cacheprovider -o addopts="" -W ignore::pytest.PytestUnknownMarkWarning)

status=0
if [[ $DRY == 1 ]]; then
  echo "== dry run (CPU): imports and shapes"
  "$PY" -c "import adaptsim.kernels, triton, torch; print('imports ok: torch', torch.__version__, 'triton', triton.__version__)" || status=1
  TRITON_INTERPRET=1 timeout 300 "${PYTEST[@]}" tests/test_kernels.py -k "float32 and (topk or adapter_sample) and relu" || status=1
  timeout 120 "${PYTEST[@]}" tests/test_kernels_gpu.py -rs || status=1
  timeout 120 "$PY" bench/gpu_targets.py --dry-run --out "${TMPDIR:-/tmp}/gpu_targets_dry.json" || status=1
  exit $status
fi

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device (use --dry-run)'; print(torch.cuda.get_device_name())" || exit 1
echo "== GPU tests (compiled kernels; ADAPTSIM_AUTOTUNE=0: default tiles, no tuning runs)"
ADAPTSIM_AUTOTUNE=0 timeout 140 "${PYTEST[@]}" tests/test_kernels_gpu.py || status=1
echo "== targets (bf16; autotuned unless ADAPTSIM_AUTOTUNE=0 is exported; lines print as measured)"
timeout 150 "$PY" bench/gpu_targets.py || status=1
# Optional, not in the 5-minute budget: the CPU kernel suites compiled on the GPU:
#   ADAPTSIM_AUTOTUNE=0 python -m pytest --noconftest -q tests/test_kernels.py tests/test_kernels_fused.py
exit $status
