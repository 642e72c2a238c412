"""compose.yml, Dockerfile.unified and .dockerignore, checked offline and fast (the image itself is built and served
by `make image` / `make image-test`, deploy/image_smoke.sh: minutes and podman, not part of this suite).

compose.yml validates against the Compose specification's JSON schema (tests/compose_spec.json: the compose-spec
schema as docker-compose 1.29.2 ships it, Apache-2.0; strict, a typo'd key is refused), and agrees with the server:
each variable it sets is a config.py setting with a valid value, PostgreSQL's URL names the postgres service and its
credentials, the ports, volume and health checks match the image. The image: two stages, non-root 10001, the same
command as deploy/k8s, a HEALTHCHECK. The build context lets in every module and package pyproject.toml ships and
keeps out the tree's tests, virtual environment, data and secrets."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import REPO

from config import Settings

COMPOSE = REPO / "compose.yml"
DOCKERFILE = REPO / "Dockerfile.unified"
SCHEMA = json.loads((Path(__file__).parent / "compose_spec.json").read_text())
# Read by libraries or by compose itself, not by config.py.
NOT_SETTINGS = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set (the defaults)."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", value)


def _errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft201909Validator(SCHEMA)  # its $schema spells the draft's URL as 2021 did
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.read_text().splitlines()
                                          if not ln.lstrip().startswith("#")))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in text.splitlines() if ln.strip()]


def test_compose_validates_against_the_compose_schema():
    assert _errors(_compose()) == []


def test_the_schema_is_strict():
    doc = _compose()
    bad = copy.deepcopy(doc)
    bad["services"]["server"]["helthcheck"] = bad["services"]["server"].pop("healthcheck")
    assert any("helthcheck" in e for e in _errors(bad))
    bad = copy.deepcopy(doc)
    bad["services"]["server-gpu"]["deploy"]["resources"]["reservations"]["device"] = {}
    assert _errors(bad)


def test_services_and_profiles():
    services = _compose()["services"]
    assert set(services) == {"server", "server-gpu", "postgres"}
    assert "profiles" not in services["server"] and "profiles" not in services["postgres"]
    assert services["server-gpu"]["profiles"] == ["gpu"]
    devices = services["server-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert services["server-gpu"]["environment"]["MODEL_DEVICE"] == "cuda"
    for name in ("server", "server-gpu"):
        svc = services[name]
        assert svc["build"] == {"context": ".", "dockerfile": "Dockerfile.unified"}
        assert svc["env_file"] == ".env"
        assert svc["depends_on"] == {"postgres": {"condition": "service_healthy"}}
        assert [_interpolate(p).split(":")[-1] for p in svc["ports"]] == ["8080"]
        assert "data:/data" in svc["volumes"]
        assert "127.0.0.1:8080/ready" in " ".join(svc["healthcheck"]["test"])
    host_ports = [_interpolate(services[n]["ports"][0]).split(":")[0] for n in ("server", "server-gpu")]
    assert len(set(host_ports)) == 2, "the two servers cannot share a host port"
    assert services["postgres"]["image"] == "postgres:16"
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


@pytest.mark.parametrize("service", ["server", "server-gpu"])
def test_server_environment_is_settings(service: str):
    services = _compose()["services"]
    env = {k: _interpolate(str(v)) for k, v in services[service]["environment"].items()}
    fields = {name.upper() for name in Settings.model_fields}
    assert set(env) - fields - NOT_SETTINGS == set()
    settings = Settings(_env_file=None, **{k.lower(): v for k, v in env.items()})
    assert settings.database_choice == "postgres"
    assert str(settings.data_dir) == "/data"
    # The URL reaches the postgres service with its own user, password and database.
    pg = {k: _interpolate(str(v)) for k, v in services["postgres"]["environment"].items()}
    url = settings.postgres_url.get_secret_value()
    assert url == f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"


def test_dockerfile_two_stages_non_root_healthcheck_and_the_k8s_command():
    steps = _dockerfile()
    froms = [args for op, args in steps if op == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS builder")
    runtime = steps[[i for i, (op, _) in enumerate(steps) if op == "FROM"][1]:]
    ops = dict(runtime)
    assert ops["USER"] == "10001:10001"
    assert not [args for op, args in runtime if op == "RUN" and "gcc" in args]  # the compiler stays in the builder
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime
    assert ops["VOLUME"] == '["/data"]' and ops["EXPOSE"] == "8080"
    assert "127.0.0.1:8080/health" in ops["HEALTHCHECK"]
    deployment = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert json.loads(ops["CMD"]) == container["args"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
    # Where the libraries write (HOME, caches) is under /data, the one writable mount besides MODEL_CACHE_DIR.
    env = dict(re.findall(r"(\w+)=(\S+)", ops["ENV"]))
    for key in ("DATA_DIR", "MODEL_CACHE_DIR", "HOME", "XDG_CACHE_HOME", "HF_HOME", "TORCH_HOME",
                "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "MPLCONFIGDIR", "NUMBA_CACHE_DIR"):
        assert env[key].startswith("/data"), key


def _ignored(path: str, rules: list[str]) -> bool:
    """Docker's .dockerignore: the last rule matching the path or one of its parent directories decides."""
    parts = path.split("/")
    ignored = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        regex = re.compile("".join({"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(tok, re.escape(tok))
                                   for tok in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pattern)))
        if any(regex.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_package_and_drops_the_rest():
    rules = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    needed = ["pyproject.toml", "requirements.txt", "README.md", "web/static/index.html"]
    needed += [f"{m}.py" for m in setuptools["py-modules"]]
    needed += [f"{p}/__init__.py" for p in setuptools["packages"]]
    needed += [str(f.relative_to(REPO)) for p in setuptools["packages"] for f in (REPO / p).rglob("*.py")
               if "__pycache__" not in f.parts]
    assert [p for p in needed if _ignored(p, rules)] == []
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_compose.py", "tests/js/page.test.js", "bench/load.py",
                 "data/omi.sqlite3", ".env", "build/lib/server.py", "node_modules/x/index.js",
                 "omi_unified_server.egg-info/PKG-INFO", "streaming/__pycache__/stt.cpython-311.pyc",
                 "web/node_modules/x.js", "deploy/k8s/base/deployment.yaml", "Dockerfile.unified"):
        assert _ignored(path, rules), path
