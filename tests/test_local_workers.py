"""The local STT's worker processes (pocketsphinx finals run outside the server's process, since pocketsphinx holds
the GIL) end with their server, also when it is killed without its shutdown: none is left holding memory."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from conftest import start_server


def _children(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.add(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_workers_end_when_the_server_is_killed(tmp_path):
    server = start_server(tmp_path, STT_BACKEND="local")  # not lazy: the workers start with the server
    workers = _children(server.proc.pid)
    assert workers, "no worker process started"
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"{len(left)} of {len(workers)} worker processes outlived their killed server"
