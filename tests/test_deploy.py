"""deploy/k8s: every manifest validates against Kubernetes' own schemas (kubernetes-validate, offline, strict), the GPU
overlay too once merged into the Deployment, and the manifests agree with the server: each env var they set is a
setting, the probes are routes the app serves, the grace period covers the shutdown drain."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import REPO

from config import Settings

K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"
# Environment variables read by libraries rather than by config.py (each said so in README / .env.template).
LIBRARY_ENV = {"HF_HUB_OFFLINE"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _resources() -> dict[str, dict[str, Any]]:
    kustomization = _docs(K8S / "base" / "kustomization.yaml")[0]
    out = {}
    for name in kustomization["resources"]:
        for doc in _docs(K8S / "base" / name):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def _merge(base: dict, patch: dict) -> dict:
    """Kustomize's strategic merge for what the GPU patch uses: maps merge, containers merge by name, env by name."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif key in ("containers", "env") and isinstance(value, list):
            merged = {item["name"]: item for item in out.get(key, [])}
            for item in value:
                merged[item["name"]] = _merge(merged[item["name"]], item) if item["name"] in merged else item
            out[key] = list(merged.values())
        else:
            out[key] = copy.deepcopy(value)
    return out


def _gpu_deployment() -> dict[str, Any]:
    overlay = _docs(K8S / "overlays" / "gpu" / "kustomization.yaml")[0]
    assert overlay["resources"] == ["../../base"]
    patch = _docs(K8S / "overlays" / "gpu" / overlay["patches"][0]["path"])[0]
    return _merge(_resources()["Deployment/omi-server"], patch)


@pytest.mark.parametrize("name", sorted(_resources()) + ["gpu Deployment", "example Secret"])
def test_manifest_validates_strictly(name):
    if name == "gpu Deployment":
        doc = _gpu_deployment()
    elif name == "example Secret":
        doc = _docs(K8S / "base" / "secret.example.yaml")[0]
    else:
        doc = _resources()[name]
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises ValidationError with the path


def test_a_broken_manifest_is_caught():
    """The validation above can fail: a typo'd field and a wrong type are refused."""
    doc = copy.deepcopy(_resources()["Deployment/omi-server"])
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    doc = copy.deepcopy(_resources()["Deployment/omi-server"])
    doc["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_env_var_is_a_setting():
    settings = {name.upper() for name in Settings.model_fields}
    resources = _resources()
    names = set(resources["ConfigMap/omi-server-config"]["data"])
    for deployment in (resources["Deployment/omi-server"], _gpu_deployment()):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            names |= {e["name"] for e in container.get("env", [])}
    names |= set(_docs(K8S / "base" / "secret.example.yaml")[0]["stringData"])
    assert names - settings <= LIBRARY_ENV, names - settings - LIBRARY_ENV
    documented = (REPO / ".env.template").read_text() + (REPO / "README.md").read_text()
    assert all(name in documented for name in LIBRARY_ENV)


def test_probes_grace_and_gpu_agree_with_the_server(tmp_path):
    from server import create_app

    app = create_app(Settings(_env_file=None, data_dir=tmp_path, stt_backend="local", lazy_models=True))
    paths = {getattr(route, "path", None) for route in app.routes}
    deployment = _resources()["Deployment/omi-server"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready" in paths
    assert container["livenessProbe"]["httpGet"]["path"] == "/health" in paths
    config = _resources()["ConfigMap/omi-server-config"]["data"]
    grace = float(config.get("SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default))
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > grace + pre_stop
    assert "--ws-max-size" in container["args"]
    hpa = _resources()["HorizontalPodAutoscaler/omi-server"]
    streams = next(m for m in hpa["spec"]["metrics"] if m["type"] == "Pods")
    assert streams["pods"]["metric"]["name"] == "omi_active_streams"
    assert float(streams["pods"]["target"]["averageValue"]) < float(config["MAX_STREAMS"])
    gpu = _gpu_deployment()["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {e["name"]: e.get("value") for e in gpu["env"]}["MODEL_DEVICE"] == "cuda"
    assert {e["name"] for e in gpu["env"]} >= {e["name"] for e in container["env"]}  # the patch kept the base env
