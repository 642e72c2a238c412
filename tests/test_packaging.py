"""The project as a package: `pip install .` builds a wheel with every module and the `omi-server` command, and the
installed command serves and streams from outside the checkout.

The wheel is built and installed for real, into a fresh venv, but without downloading the dependencies again (5 GB
of PyTorch and the rest): the fresh venv sees the project venv's site-packages through a `.pth` file, and `pip check`
confirms that what is there satisfies the wheel's pinned requirements. The server then runs from a directory with no
checkout in it, so only the installed modules can be imported.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from conftest import REPO, SAMPLE_WAV
from server_process import ServerProcess, free_port, stop_server


def test_every_top_level_module_is_in_the_wheel_list():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules = sorted(p.stem for p in REPO.glob("*.py"))
    assert sorted(config["py-modules"]) == modules
    packages = sorted(p.parent.name for p in REPO.glob("*/__init__.py") if p.parent.name != "tests")
    assert sorted(config["packages"]) == packages


def test_dependencies_are_the_requirements_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["dependencies"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        assert not line or re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+\-]+", line), line


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the project installed from a wheel built from the checkout; returns its bin directory."""
    root = tmp_path_factory.mktemp("pkg")
    # Built from a copy: an in-tree build leaves build/ and *.egg-info in the checkout, and build/lib keeps deleted
    # modules that a later wheel would ship.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                                 "data", "node_modules", ".hypothesis", "out"))
    wheels = root / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next(wheels.glob("omi_unified_server-*.whl"))
    venv = root / "venv"
    # No pip or setuptools of its own (the venv's bundled setuptools would shadow the pinned one): the project venv's
    # pip installs into it with --python.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    (Path(site) / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", python]
    install = subprocess.run([*pip, "install", "--no-deps", "-q", str(wheel)], capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stderr
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120)
    assert "omi-unified-server" not in check.stdout, check.stdout  # its own pins are all satisfied
    return venv / "bin"


def test_installed_command_serves_and_streams_outside_the_checkout(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYANNOTE_METRICS_ENABLED="false", DATA_DIR=str(tmp_path / "data"))
    where = subprocess.run([str(installed / "python"), "-c", "import server, omi_cli; print(server.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert not where.stdout.strip().startswith(str(REPO)), where.stdout  # the installed copy, not the checkout
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(installed / "omi-server"), "serve", "--port", str(port)], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(port, proc, log_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, server.log_tail()
            try:
                if httpx.get(f"{server.http}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"not ready:\n{server.log_tail()}")
        page = httpx.get(f"{server.http}/")  # the page's files are package data of `web`, found from the install
        assert page.status_code == 200 and "<title>Omi audio server</title>" in page.text, page.text[:200]
        assert httpx.get(f"{server.http}/web/audio-worklet.js").status_code == 200
        done = subprocess.run([str(installed / "omi-server"), "stream", str(SAMPLE_WAV), "--fast", "--url",
                               server.http], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, done.stderr
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        assert lines and all(re.match(r"\[\d\d:\d\d\.\d\] SPEAKER_\d+: ", line) for line in lines), lines
        assert sum(len(line.split()) - 2 for line in lines) > 20, lines
    finally:
        stop_server(server)
