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


def test_serve_config_yaml_is_a_valid_serve_deploy_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert (app.name, app.route_prefix) == ("kvray", "/")
    module, _, attr = app.import_path.partition(":")
    assert module == "kvray.serve.app"
    assert set(app.args) <= {"namespace", "serve"}
    from kvray.config import ServeConfig

    ServeConfig.model_validate(app.args.get("serve") or {})
    import kvray.serve.app as serve_app

    if not hasattr(serve_app, attr):
        pytest.skip(f"serve_config.yaml needs kvray.serve.app.{attr} (a Serve app builder)")
