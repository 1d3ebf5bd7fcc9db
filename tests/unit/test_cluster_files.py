"""cluster/: the `ray up` YAMLs pass Ray's own schema check, the KubeRay manifests have the fields
KubeRay needs, and cluster/local.sh is valid bash. Nothing here starts Ray or reaches a cloud."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def prepared(name: str) -> dict[str, Any]:
    """What `ray up` checks: the file merged with the provider's defaults, then Ray's JSON schema.

    prepare_config only fills in defaults (defaults.yaml, setup commands, min/max workers): it
    needs no credentials and no network for AWS or GCP; the provider is first contacted later, in
    `ray up`'s bootstrap step.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load(name)))
    validate_config(config)
    return config


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_file_passes_rays_schema_check(name):
    config = prepared(name)
    assert config["provider"]["type"] == name.removesuffix(".yaml")
    assert config["head_node_type"] == "head"


def test_schema_check_rejects_a_typo():
    """The check is not vacuous: a misspelled key fails it."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("aws.yaml")
    config["available_node_types"]["gpu"]["min_worker"] = 0
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_layout_cpu_head_and_autoscaling_spot_gpu_workers(name):
    config = prepared(name)
    head = config["available_node_types"]["head"]
    assert head["resources"].get("orderlab_head") == 1 and "GPU" not in head["resources"]
    gpu = config["available_node_types"]["gpu"]
    assert gpu["resources"]["GPU"] >= 1
    assert gpu["min_workers"] == 0 and gpu["max_workers"] > 0
    node = gpu["node_config"]
    if name == "aws.yaml":
        assert node["InstanceMarketOptions"]["MarketType"] == "spot"
    else:
        assert {"preemptible": True} in node["scheduling"]


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_every_node_gets_orderlab_its_data_and_the_token(name):
    config = prepared(name)
    setup = "\n".join(config["setup_commands"])
    assert "pip install" in setup and "~/orderlab" in setup
    assert "ORDERLAB_DATA" in setup
    assert config["file_mounts"]["~/orderlab"] == "."
    assert "~/orderlab-data" in config["file_mounts"]
    assert "~/.ray/auth_token" in config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in "\n".join(config[key])
    assert "--dashboard-host=127.0.0.1" in "\n".join(config["head_start_ray_commands"])


def cluster_spec_checks(spec: dict[str, Any]) -> None:
    """The RayCluster fields KubeRay needs, plus orderlab's layout and token auth."""
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert "orderlab_head" in yaml.safe_load(head["rayStartParams"]["resources"])
    (head_container,) = head["template"]["spec"]["containers"]
    assert head_container["image"] and "nvidia.com/gpu" not in head_container["resources"]["limits"]
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["groupName"] and gpu["minReplicas"] == 0 and gpu["maxReplicas"] > 0
    (worker_container,) = gpu["template"]["spec"]["containers"]
    assert worker_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for group in (head, gpu):
        assert all(isinstance(value, str) for value in group["rayStartParams"].values())


def test_kuberay_raycluster():
    manifest = load("kuberay/raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    cluster_spec_checks(manifest["spec"])


def test_kuberay_rayjob_runs_a_sweep_and_deletes_its_cluster():
    manifest = load("kuberay/rayjob.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith("python -m orderlab sweep ")
    assert "--set storage=gs://" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster_spec_checks(spec["rayClusterSpec"])


def test_local_sh_is_valid_bash_and_prints_usage():
    script = CLUSTER / "local.sh"
    assert script.stat().st_mode & 0o111, "cluster/local.sh must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    usage = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2
    assert "local.sh up [NUM_EXTRA_NODES]" in usage.stdout + usage.stderr
