"""cluster.yaml is a valid Ray cluster-launcher config (`ray up` validates the same way)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_follows_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json")
                        .read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # trials on workers
    assert any("caat-sweeper" in c and "pip install" in c for c in config["setup_commands"])
    assert any("mlflow server" in c for c in config["head_setup_commands"])
