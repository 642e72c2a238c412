# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# npm ci's record of what it installed (tests/js: the JavaScript client test)
JS_STAMP := tests/js/node_modules/.package-lock.json
HOST ?= 127.0.0.1
PORT ?= 8080
# The largest WebSocket message uvicorn takes (a larger one closes the stream, 1009) before the app sees it: audio
# frames are at most MAX_FRAME_BYTES (64 KiB) and commands 256 KiB; uvicorn's own default is 16 MiB per message.
WS_MAX_SIZE ?= 1048576
export PYANNOTE_METRICS_ENABLED := false

.PHONY: run test lint browser bench bench-vad clean image image-test

$(STAMP): requirements.txt requirements-dev.txt requirements-ray.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/uvicorn server:app --host $(HOST) --port $(PORT) --ws-max-size $(WS_MAX_SIZE)

test: lint browser $(JS_STAMP)
	$(VENV)/bin/pytest -q

# tests/test_deepgram_compat.py runs tests/js/deepgram_live.mjs with @deepgram/sdk from npm, pinned by the lockfile;
# without node and npm that test skips and says why.
$(JS_STAMP): tests/js/package.json tests/js/package-lock.json
	@if command -v node >/dev/null && command -v npm >/dev/null; then cd tests/js && npm ci --no-audit --no-fund; \
	else echo "node/npm missing: the @deepgram/sdk test in tests/test_deepgram_compat.py will skip"; fi

# tests/test_page.py drives the page at / in Debian's chromium through chromium-driver (selenium, headless): installed
# here when missing, as root with apt; where apt cannot be used the test skips and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
		echo "chromium and chromium-driver are missing and apt-get cannot install them here (needs root on Debian):" \
		     "tests/test_page.py will skip"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint Dockerfile.unified

# Capacity: concurrent real-time streams, CPU and memory per stream, our latency, batch speed (bench/RESULTS.md).
bench: $(STAMP)
	$(PY) bench/load.py --streams 25,50,75,100,125,150,175 --duration 40 --json bench/results.json --plot bench/load.png

bench-vad: $(STAMP)
	$(PY) bench/vad_der.py

# The container image (Dockerfile.unified) with podman, no Docker engine or registry: deploy/image_build.sh (README
# "Container image"). image-test: the server inside it answers /ready and /health and transcribes sample.wav.
image:
	deploy/image_build.sh

image-test: $(STAMP)
	deploy/image_smoke.sh

clean:
	rm -rf $(VENV)
