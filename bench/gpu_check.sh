#!/usr/bin/env bash
# The GPU check (issue 16): on a machine with an NVIDIA GPU, the load benchmark with the models on the GPU, in process
# (MODEL_POOL=local) and on Ray Serve (MODEL_POOL=ray), and the streams one GPU carried in real time. Bounded to about
# 7 minutes: two pools x three steps x (20 s of speech + warm-up + drain), one server per pool.
#
#   bash bench/gpu_check.sh [STEPS]      # STEPS: comma-separated stream counts, default 100,200,300
#
# Writes bench/out/gpu_<pool>.json and prints a summary; record it in bench/RESULTS.md ("GPU check").
# Not run in this repository's sessions so far: no GPU was lent (see bench/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-100,200,300}"
PY=.venv/bin/python
command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: this check needs a GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { echo "torch sees no CUDA device" >&2; exit 2; }
mkdir -p bench/out
export PYANNOTE_METRICS_ENABLED=false
for pool in local ray; do
  echo "== MODEL_POOL=$pool MODEL_DEVICE=cuda, streams $STEPS"
  timeout 240 "$PY" bench/load.py --streams "$STEPS" --duration 20 --warmup 3 --codec pcm16 --reuse-server \
    --idle-streams 0 --batch-seconds 0 --server-env MODEL_DEVICE=cuda --server-env MODEL_POOL="$pool" \
    --server-env MAX_STREAMS=1000 --json "bench/out/gpu_$pool.json" \
    || echo "MODEL_POOL=$pool: the benchmark failed or ran out of its 240 s" >&2
done
"$PY" - <<'PYEOF'
import json
from pathlib import Path

for pool in ("local", "ray"):
    path = Path(f"bench/out/gpu_{pool}.json")
    if not path.exists():
        print(f"{pool}: no result")
        continue
    carried = 0
    for step in json.loads(path.read_text())["steps"]:
        ok = step.get("meets_criterion") and step.get("realtime")
        print(f"{pool}: {step['n']} streams: real time {step.get('realtime')}, p95 {step['p95_s'] * 1000:.0f} ms, "
              f"server {step['server_cores_used']:.2f} cores, {step['reason']}")
        if ok:
            carried = max(carried, step["n"])
    print(f"{pool}: streams per GPU in real time (largest step that kept up): {carried}")
PYEOF
