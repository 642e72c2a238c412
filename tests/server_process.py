"""A real `uvicorn server:app` process on a free loopback port: started, waited for (/ready), stopped.

Shared by the tests (`conftest.start_server`) and the load benchmark (`bench/loadlib.py`), which must not import
pytest fixtures. The server's environment is this process's, without the settings a developer's shell might carry
into a run (Deepgram, auth, STT, VAD, Firebase and limit settings), plus a fresh `DATA_DIR` and what the caller
passes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
WS_MAX_SIZE = 1024 * 1024  # as `make run` and the image start uvicorn
SCRUBBED_ENV_PREFIXES = ("DEEPGRAM", "ADMIN_KEY", "STT_", "VAD_", "FIREBASE", "MAX_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


def start_server(workdir: Path, env: dict[str, str] | None = None, *, cwd: Path = REPO,
                 timeout_s: float = 120.0, extra_args: Sequence[str] = ()) -> ServerProcess:
    """Runs `python -m uvicorn server:app` with the app from `cwd` and `DATA_DIR` under `workdir`; returns once /ready
    is 200. Raises RuntimeError (with the log's tail) if it exits or is not ready in `timeout_s`.

    The process runs in `workdir` (the app found with `--app-dir`): the settings read `.env` from the working
    directory, and a developer's `.env` in the checkout must not change what the tests test. `extra_args` go to
    uvicorn after the defaults (a later `--host` wins)."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED_ENV_PREFIXES)}
    # Local STT partials (on by default) are off unless a test asks: the tests written for finals wait for a segment,
    # then close; tests/test_local_partials.py streams with them on.
    full_env.update({"DATA_DIR": str(workdir / "data"), "PYANNOTE_METRICS_ENABLED": "false",
                     "LOCAL_PARTIAL_INTERVAL_S": "0", **(env or {})})
    log_path = workdir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "server:app", "--app-dir", str(Path(cwd).resolve()),
             "--host", "127.0.0.1", "--port", str(port), "--ws-max-size", str(WS_MAX_SIZE), *extra_args],
            cwd=workdir, env=full_env, stdout=log, stderr=subprocess.STDOUT,
        )
    server = ServerProcess(port, proc, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.http}/ready", timeout=2).status_code == 200:
                return server
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout_s:.0f} s:\n{server.log_tail()}")


def stop_server(server: ServerProcess, timeout_s: float = 20.0) -> None:
    """SIGTERM (the server drains its streams first), then SIGKILL after `timeout_s`."""
    server.proc.terminate()
    try:
        server.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=10)
