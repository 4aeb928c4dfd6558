"""Config: strict, described, overridable from the environment, with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from kvray.config import Config, load_config
from kvray.errors import ConfigError


def _walk(model: type[BaseModel], path: str = "") -> list[str]:
    missing = []
    for name, field in model.model_fields.items():
        if not field.description:
            missing.append(f"{path}{name}")
        ann: Any = field.annotation
        for sub in (ann, *getattr(ann, "__args__", ())):
            for inner in (sub, *getattr(sub, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    missing += _walk(inner, f"{path}{name}.")
    return missing


def test_every_field_is_described() -> None:
    assert _walk(Config) == []


def test_defaults_and_yaml_and_env(tmp_path: Path) -> None:
    assert load_config(env={}).index.default_model.block_size == 16
    f = tmp_path / "kvray.yaml"
    f.write_text(
        "num_shards: 3\nindex:\n  models:\n    m: {block_size: 64, hash_algo: sha256_cbor}\n"
    )
    cfg = load_config(f, env={"KVRAY_INDEX__BACKEND": "budget", "KVRAY_SERVE__PORT": "9000"})
    assert cfg.num_shards == 3 and cfg.index.backend == "budget" and cfg.serve.port == 9000
    assert cfg.index.model("m").block_size == 64
    assert cfg.index.model("other").block_size == 16


def test_env_reads_declared_fields_only(tmp_path: Path) -> None:
    f = tmp_path / "kvray.yaml"
    f.write_text("index: {max_keys: 5000}\nevents: {flush_messages: 64}\n")
    env = {
        "KVRAY_PURE_PYTHON": "1",  # kvray's own switch, not a config field: left alone
        "KVRAY_CONFIG": "/elsewhere.yaml",
        "KVRAY_INDEX__BACKEND": "budget",
        "KVRAY_EVENTS__BIND": '["tcp://127.0.0.1:5557"]',
        "KVRAY_ROUTING__LOAD_WEIGHT": "2.5",
        "KVRAY_SNAPSHOTS__DIR": "/var/lib/kvray/snapshots",
        "OTHER_NUM_SHARDS": "9",
    }
    cfg = load_config(f, env=env)
    # The file's other fields in a section survive an override of one of them.
    assert (cfg.index.backend, cfg.index.max_keys) == ("budget", 5000)
    assert cfg.events.bind == ["tcp://127.0.0.1:5557"] and cfg.events.flush_messages == 64
    assert cfg.routing.load_weight == 2.5 and cfg.num_shards == 2
    assert cfg.snapshots.dir == "/var/lib/kvray/snapshots" and cfg.snapshots.interval_s == 10
    with pytest.raises(ConfigError, match="index.bakend"):
        load_config(f, env={"KVRAY_INDEX__BAKEND": "budget"})  # a typo inside a section
    with pytest.raises(ConfigError, match="num_shards"):
        load_config(f, env={"KVRAY_NUM_SHARDS": "zero"})


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("num_shards: 0\n", "num_shards"),
        ("index: {backend: cassandra}\n", "index.backend"),
        ("idnex: {}\n", "idnex: Extra inputs"),
        ("events: {connect: [{endpoint: 'http://x'}]}\n", "not a ZMQ endpoint"),
        ("- a\n", "mapping at the top level"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, text: str, words: str) -> None:
    f = tmp_path / "kvray.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(f, env={})


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("/nonexistent/kvray.yaml", env={})
