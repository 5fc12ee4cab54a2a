"""The examples in examples/ are checked as far as this machine allows: the Kubernetes manifest
against the Kubernetes schemas (offline), the systemd unit with systemd-analyze, the compose
files for the sidecar rules they exist to show."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

EXAMPLES = Path(__file__).parent.parent / "examples"
K8S_VERSION = "1.31"  # native sidecars are on by default from 1.29


def k8s_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLES / "kubernetes" / "ndovu-proxy.yaml").read_text()) if d]


def test_kubernetes_manifest_is_valid_against_the_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    for doc in k8s_docs():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_sidecar_follows_the_rules() -> None:
    deployment = next(d for d in k8s_docs() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [proxy] = pod["initContainers"]
    assert proxy["restartPolicy"] == "Always"  # a native sidecar
    env = {e["name"]: e for e in proxy["env"]}
    assert "NDOVU_CLIENT_SECRET" not in env  # the secret comes as a file
    secret_file = env["NDOVU_CLIENT_SECRET_FILE"]["value"]
    [mount] = proxy["volumeMounts"]
    assert secret_file.startswith(mount["mountPath"] + "/") and mount["readOnly"]
    assert env["NDOVU_PROXY_LISTEN"]["value"].startswith("127.0.0.1:")
    for probe in ("startupProbe", "readinessProbe"):
        assert proxy[probe]["httpGet"]["port"] == "admin"
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    sc = proxy["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["allowPrivilegeEscalation"]
    assert proxy["resources"]["requests"] and proxy["resources"]["limits"]
    assert pod["terminationGracePeriodSeconds"] > 20  # longer than the default shutdown_timeout


def test_compose_files_show_the_shared_network_namespace() -> None:
    main = yaml.safe_load((EXAMPLES / "compose" / "docker-compose.yaml").read_text())
    assert main["services"]["app"]["network_mode"] == "service:ndovu-proxy"
    assert "NDOVU_CLIENT_SECRET" not in main["services"]["ndovu-proxy"]["environment"]
    test = yaml.safe_load((EXAMPLES / "compose" / "docker-compose.test.yaml").read_text())
    services = test["services"]
    assert services["ndovu-mock"]["entrypoint"][:2] == ["ndovu-proxy", "mock-upstream"]
    assert services["ndovu-proxy"]["environment"]["NDOVU_UPSTREAM_URL"] == "http://127.0.0.1:8081"
    assert services["tests"]["network_mode"] == "service:ndovu-mock"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing (Debian package systemd)")
    unit = (EXAMPLES / "systemd" / "ndovu-proxy.service").read_text()
    assert "ExecStart=/opt/ndovu-proxy/bin/ndovu-proxy serve" in unit
    here = Path(sys.executable).parent / "ndovu-proxy"  # the same command, installed here
    path = tmp_path / "ndovu-proxy.service"
    path.write_text(unit.replace("/opt/ndovu-proxy/bin/ndovu-proxy", str(here)))
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_kubernetes_manifest_holds_no_secret_to_overwrite_the_real_one() -> None:
    # `kubectl apply -f` of the example must never replace the credentials with placeholders
    assert [d["kind"] for d in k8s_docs() if d["kind"] == "Secret"] == []
    assert "kubectl create secret generic ndovu-credentials" in (EXAMPLES / "kubernetes" / "ndovu-proxy.yaml").read_text()


def _loopback_namespace() -> str | None:
    """Why a private network namespace with only loopback cannot be had here, or None."""
    for tool in ("unshare", "ip", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    probe = subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, text=True, timeout=10)
    return None if probe.returncode == 0 else f"unshare -rn is not allowed here: {probe.stderr.strip()}"


def test_the_readmes_fake_api_block_works_when_pasted() -> None:
    """The README's "test your app against the fake API" lines, as a user pastes them, in a
    network namespace of their own (only loopback: its fixed ports are free, nothing leaves)."""
    why = _loopback_namespace()
    if why is not None:
        pytest.skip(why)
    readme = (EXAMPLES.parent / "README.md").read_text()
    block = readme.split("<!-- fake-api-block -->", 1)[1].split("```", 2)[1].strip()
    bindir = str(Path(sys.executable).parent)
    script = "ip link set lo up\n" + block.replace(".venv/bin/", bindir + "/") + "\nstatus=$?\nkill $(jobs -p)\nwait\nexit $status\n"
    result = subprocess.run(["unshare", "-rn", "bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"products"' in result.stdout, (result.stdout[-1000:], result.stderr[-2000:])
