"""The cluster files a user would apply: they parse and hold what `ray up` and KubeRay need."""
from __future__ import annotations

from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "cluster" / "configs"


def test_ray_up_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CONFIGS / "ray-cluster-gpu.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "head_start_ray_commands",
                "worker_start_ray_commands", "setup_commands"):
        assert key in config, key
    assert config["head_node_type"] in config["available_node_types"]
    gpus = [t["resources"].get("GPU", 0) for t in config["available_node_types"].values()]
    assert max(gpus) >= 1
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in starts and "--dashboard-host=127.0.0.1" in starts
    validate_config(prepare_config(config))  # raises on a schema error


def test_kuberay_manifest_is_a_raycluster_with_gpu_workers():
    docs = list(yaml.safe_load_all((CONFIGS / "kuberay-raycluster.yaml").read_text()))
    assert len(docs) == 1
    rc = docs[0]
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster" and rc["metadata"]["name"]
    spec = rc["spec"]
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"][0]["image"]
    workers = spec["workerGroupSpecs"]
    assert workers and all(w["groupName"] and "rayStartParams" in w for w in workers)
    for group in [head] + workers:
        container = group["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in env
    limits = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert workers[0]["minReplicas"] <= workers[0]["replicas"] <= workers[0]["maxReplicas"]
