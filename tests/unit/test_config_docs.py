"""The configuration docs and example files stay true to ``kvray.Config`` and to Ray's schemas."""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from kvray.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]


def _gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_config_docs", REPO / "scripts" / "gen_config_docs.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        ann: Any = field.annotation
        for sub in (ann, *getattr(ann, "__args__", ())):
            for inner in (sub, *getattr(sub, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    out += _field_paths(inner, f"{prefix}{name}.")
    return out


def test_committed_configuration_doc_is_the_generated_one() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == _gen().render(), (
        "docs/configuration.md is out of date: run `python scripts/gen_config_docs.py`"
    )


def test_every_field_has_a_row_with_its_default() -> None:
    text = _gen().render()
    for path in _field_paths(Config):
        name = path.rsplit(".", 1)[-1]
        assert re.search(rf"^\| `{name}` \| .+ \| .+ \| .+ \|$", text, re.M), path
    assert "| `block_size` | `int`, > 0, ≤ 4096 | `16` |" in text
    assert '| `backend` | `"memory" \\| "budget" \\| "redis"` | `"memory"` |' in text
    assert "`536870912` (512 MiB)" in text
    assert "Env: `KVRAY_INDEX__DEFAULT_MODEL__HASH_SEED`." in text
    assert "| `endpoint` | `str` | required |" in text


def test_example_kvray_yaml_loads() -> None:
    cfg = load_config(REPO / "examples" / "kvray.yaml", env={})
    assert cfg.events.bind == ["tcp://0.0.0.0:5557"]
    assert cfg.index.model("Qwen/Qwen3-8B").hash_seed == "0"
    llama = cfg.index.model("meta-llama/Llama-3.1-8B-Instruct")
    assert (llama.block_size, llama.hash_algo) == (64, "sha256_cbor")
    assert llama.lora_paths == {"sql-adapter": "/models/loras/sql-adapter"}
    assert cfg.index.model("any-other-model") == cfg.index.default_model
    assert cfg.serve.auth_token is None  # secrets come from KVRAY_SERVE__AUTH_TOKEN
    env = {"KVRAY_SERVE__AUTH_TOKEN": "t0k", "KVRAY_EVENTS__BIND": '["tcp://127.0.0.1:0"]'}
    over = load_config(REPO / "examples" / "kvray.yaml", env=env)
    assert (over.serve.auth_token, over.events.bind) == ("t0k", ["tcp://127.0.0.1:0"])


def test_ray_cluster_yaml_is_a_valid_launcher_config() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` checks first
    assert raw["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    for local in raw["file_mounts"].values():
        assert (REPO / local).exists(), local
    serve_cmd = [c for c in raw["head_start_ray_commands"] if c.startswith("kvray serve")]
    assert len(serve_cmd) == 1 and "--address auto --detach" in serve_cmd[0]
    config_path = serve_cmd[0].split("--config ", 1)[1].split()[0]
    mount = next(remote for remote in raw["file_mounts"] if config_path.startswith(remote + "/"))
    relative = config_path[len(mount) + 1 :]
    load_config(REPO / raw["file_mounts"][mount] / relative, env={})


@pytest.mark.parametrize("where", ["serve_config.yaml", "deploy/rayservice.yaml"])
def test_serve_configs_are_valid_serve_deploy_configs(where: str) -> None:
    """serve_config.yaml, and the RayService's serveConfigV2 (the same application), parse as
    Ray's ServeDeploySchema and carry a kvray configuration the app builder accepts."""
    from ray.serve.schema import ServeDeploySchema

    from kvray.serve.app import config_from_args

    raw = yaml.safe_load((REPO / where).read_text())
    if raw.get("kind") == "RayService":
        raw = yaml.safe_load(raw["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert (app.name, app.route_prefix) == ("kvray", "/")
    assert app.import_path == "kvray.serve.app:app_builder"
    cfg = config_from_args(app.args)
    assert cfg is not None and cfg.events.bind == ["tcp://0.0.0.0:5557"]


def test_serve_config_and_rayservice_deploy_the_same_application() -> None:
    serve_cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    svc = yaml.safe_load((REPO / "deploy" / "rayservice.yaml").read_text())
    assert yaml.safe_load(svc["spec"]["serveConfigV2"]) == serve_cfg


def test_app_args_errors_name_the_problem() -> None:
    from kvray.errors import ConfigError
    from kvray.serve.app import config_from_args

    with pytest.raises(ConfigError, match="confg"):
        config_from_args({"confg": {}})
    with pytest.raises(ConfigError, match="num_shards"):
        config_from_args({"config": {"num_shards": 0}})
    with pytest.raises(ConfigError, match="not both"):
        config_from_args({"config": {}, "config_path": "x.yaml"})
    assert config_from_args({"namespace": "kvray", "serve": {}}) is None  # the attach form
