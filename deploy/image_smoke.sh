#!/usr/bin/env bash
# `make image-test`: the built image serves. Inside the image (a buildah working container: `podman run` cannot
# start containers on machines that refuse setrlimit, `buildah run --isolation chroot` can), as the image's user,
# with the image's /data volume as the only writable place it needs:
#   1. the native pieces import (torch, torchaudio, PyAV, soundfile, webrtcvad, pocketsphinx, onnxruntime, ...)
#      and the process runs as uid 10001;
#   2. `uvicorn server:app` starts on a free loopback port (the container shares the host's network), /ready turns
#      200 once the models are loaded, /health answers;
#   3. ../shared/data/sample.wav (or SAMPLE) streams through /v4/listen with the project's CLI (host venv) and
#      transcribed words come back;
#   4. the server stops on SIGTERM (its graceful shutdown), and it wrote nothing outside /data (podman diff of the
#      working container: a read-only root filesystem, as deploy/k8s runs it, would have refused any such write);
# then the working container is removed.
# Environment: IMAGE (default omi-server:latest), STORAGE_DRIVER (default overlay, as image_build.sh), SAMPLE,
# READY_TIMEOUT (default 300 s: models load on a cold, busy CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-omi-server:latest}
STORAGE_DRIVER=${STORAGE_DRIVER:-overlay}
SAMPLE=${SAMPLE:-../shared/data/sample.wav}
READY_TIMEOUT=${READY_TIMEOUT:-300}
BUILDAH=(buildah --storage-driver "$STORAGE_DRIVER")
HOST_PY=${HOST_PY:-.venv/bin/python}

command -v buildah >/dev/null || { echo "image_smoke: SKIP: buildah is not installed (make image installs it)"; exit 0; }
[ -f "$SAMPLE" ] || { echo "image_smoke: SKIP: no sample audio at $SAMPLE"; exit 0; }
podman --storage-driver "$STORAGE_DRIVER" image exists "$IMAGE" || { echo "image_smoke: no image $IMAGE: make image" >&2; exit 1; }

PORT=$("$HOST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
LOG=$(mktemp /var/tmp/omi-smoke-server.XXXXXX.log)
CTR=""
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 40); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    [ -n "$CTR" ] && "${BUILDAH[@]}" rm "$CTR" >/dev/null 2>&1 || true
}
trap cleanup EXIT

CTR=$("${BUILDAH[@]}" from --pull-never "$IMAGE")
RUN=("${BUILDAH[@]}" run --isolation chroot --network host "$CTR" --)

echo "image_smoke: imports and user"
"${RUN[@]}" python -c '
import os, sys
import av, ctranslate2, faster_whisper, lc3, numpy, onnxruntime, pocketsphinx, resemblyzer, silero_vad, soundfile
import speechbrain, torch, torchaudio, webrtcvad
from pyannote.audio import Model
import server
assert os.getuid() == 10001, os.getuid()
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda build", torch.version.cuda, "uid", os.getuid())
'

echo "image_smoke: server on 127.0.0.1:$PORT (log $LOG)"
t0=$(date +%s)
"${RUN[@]}" uvicorn server:app --host 127.0.0.1 --port "$PORT" --ws-max-size 1048576 >"$LOG" 2>&1 &
SERVER_PID=$!
until curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "image_smoke: FAIL: the server exited" >&2; tail -30 "$LOG" >&2; exit 1; fi
    if [ $(( $(date +%s) - t0 )) -gt "$READY_TIMEOUT" ]; then
        echo "image_smoke: FAIL: not ready in $READY_TIMEOUT s" >&2; tail -30 "$LOG" >&2; exit 1
    fi
    sleep 2
done
echo "image_smoke: ready in $(( $(date +%s) - t0 )) s; /health: $(curl -fsS "http://127.0.0.1:$PORT/health")"

echo "image_smoke: streaming $SAMPLE"
OUT=$("$HOST_PY" -m omi_cli stream "$SAMPLE" --fast --plain --url "http://127.0.0.1:$PORT" --max-wait 240)
echo "$OUT" | tail -5
WORDS=$(echo "$OUT" | grep -oE '[A-Za-z]{2,}' | wc -l)
if [ "$WORDS" -lt 5 ]; then
    echo "image_smoke: FAIL: $WORDS words came back" >&2; tail -30 "$LOG" >&2; exit 1
fi

kill -TERM "$SERVER_PID"
for _ in $(seq 1 40); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
if kill -0 "$SERVER_PID" 2>/dev/null; then echo "image_smoke: FAIL: no exit 40 s after SIGTERM" >&2; exit 1; fi
wait "$SERVER_PID" || true
SERVER_PID=""
# Volumes (/data) are not part of the container's diff: anything listed was written to the root filesystem.
OUTSIDE=$(podman --storage-driver "$STORAGE_DRIVER" diff "$CTR" | awk '$1 != "C" {print $2}')
if [ -n "$OUTSIDE" ]; then
    echo "image_smoke: FAIL: written outside /data (a read-only root filesystem refuses these):" $OUTSIDE >&2; exit 1
fi
echo "image_smoke: PASS ($WORDS words transcribed)"
rm -f "$LOG"
