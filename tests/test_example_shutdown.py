"""The Kubernetes example's shutdown: a readiness delay before the listener closes, and a grace
period that covers it and the drain."""

from __future__ import annotations

from pathlib import Path

import yaml

from proxy import config
from tests.test_examples import k8s_docs


def test_kubernetes_example_sets_a_shutdown_delay_within_the_grace_period(tmp_path: Path) -> None:
    docs = k8s_docs()
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    [proxy] = pod["initContainers"]
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    [mount] = proxy["volumeMounts"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    # the file NDOVU_PROXY_CONFIG names is the ConfigMap's key, projected into the mount
    [source] = [s["configMap"] for s in volume["projected"]["sources"] if "configMap" in s]
    assert source["name"] == configmap["metadata"]["name"]
    [item] = source["items"]
    assert env["NDOVU_PROXY_CONFIG"] == f"{mount['mountPath']}/{item['path']}"
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"][item["key"]])
    settings = config.load({"config": str(path)}, {"NDOVU_CLIENT_ID": "id", "NDOVU_CLIENT_SECRET": "s"})
    assert settings.shutdown_delay >= 5
    margin = 5
    assert pod["terminationGracePeriodSeconds"] >= settings.shutdown_delay + settings.shutdown_timeout + margin
    assert yaml.safe_load(configmap["data"][item["key"]]).keys() <= set(config.DEFAULTS)
