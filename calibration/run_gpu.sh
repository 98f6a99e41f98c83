#!/usr/bin/env bash
# Measure a calibration grid on this machine's GPUs; installs nothing from the network.
# GRID (default calibration/grids/h100.yaml, one GPU) names it; GRID=calibration/grids/multi-gpu.yaml
# runs FSDP and DDP under torchrun on 2, 4 and 8 GPUs (one record per rank).
# Writes calibration/data/<grid name>.jsonl (and a copy under $OUT when the device runner sets it).
# Resumable: a rerun skips what is recorded. Finishes within 8 minutes: no config starts after
# BUDGET_S seconds (default 400), and each is cut at the grid's 60 s timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-400}
GRID=${GRID:-calibration/grids/h100.yaml}

# The device image lacks pydantic (and maybe more): install the wheels carried in .whl/ (see README).
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

missing=$("$PY" -c "
import importlib.util as u
need = ['pydantic', 'yaml', 'typer', 'rich', 'torch', 'transformers', 'peft']
print(' '.join(m for m in need if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
  echo "run_gpu.sh: missing Python modules: $missing -- put their wheels in .whl/ (calibration/README.md)" >&2
  exit 2
fi
"$PY" -c "import pynvml" 2> /dev/null || echo "run_gpu.sh: no pynvml: records will lack NVML device bytes" >&2
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
name=$("$PY" -c "from memplan.calibration import grid; print(grid.load('$GRID').name)") || exit 2

timeout 470 "$PY" -m memplan calibrate run --grid "$GRID" --budget-s "$BUDGET_S" "$@"
rc=$?
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "calibration/data/$name.jsonl" "$OUT/" 2> /dev/null || true
fi
exit $rc
