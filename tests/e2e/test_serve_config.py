"""A Serve config alone brings all of kvray up, reconciles it on redeploy, and tears it down.

The configuration is deploy/rayservice.yaml's serveConfigV2 (the same as serve_config.yaml),
with what must differ on a test machine: a namespace of its own, events bound on 127.0.0.1
with a free port, and one shard (to keep actors few; the redeploy then asks for two).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from ray import serve

import kvray
from kvray import runtime
from kvray.actors.naming import CONTROLLER
from kvray.config import Config
from kvray.serve.app import APP_NAME, app_builder, find_http
from kvray.sim import SimPod, SimPublisher
from tests.helpers import sync

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
NS = "kvray-e2e-serve-config"


def _app_args() -> dict[str, Any]:
    svc = yaml.safe_load((REPO / "deploy" / "rayservice.yaml").read_text())
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "kvray.serve.app:app_builder"
    args = copy.deepcopy(app["args"])
    cfg = args["config"]
    cfg["namespace"] = NS
    cfg["num_shards"] = 1
    cfg["events"]["bind"] = ["tcp://127.0.0.1:0"]
    cfg["serve"]["host"] = "127.0.0.1"
    return dict(args)


def _wait(done: Callable[[], bool], timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.25)
    return done()


def _actors(namespace: str) -> list[str]:
    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == namespace
    )  # fmt: skip


def _deploy(args: dict[str, Any]) -> None:
    serve.run(
        app_builder(args),
        name=APP_NAME,
        route_prefix="/",
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )


@pytest.fixture(scope="module")
def deployed(ray_session: None) -> Iterator[dict[str, Any]]:
    args = _app_args()
    _deploy(args)
    yield args
    try:
        serve.delete(APP_NAME)
    finally:
        runtime.stop(NS)  # whatever the test left behind


def test_the_serve_config_starts_every_actor_and_serves(deployed: dict[str, Any]) -> None:
    names = _actors(NS)
    assert CONTROLLER in names, names
    assert sum("shard" in n for n in names) == 1, names
    assert any("ingestor" in n for n in names) and any("tokenizer" in n for n in names), names
    cfg = Config.model_validate(deployed["config"])
    base = find_http(cfg, timeout_s=30)
    client = kvray.connect(NS)
    pub = SimPublisher(client.endpoints[0][0], "kv@10.30.0.1@m")
    try:
        assert pub.wait_connected()
        toks = list(range(900, 964))
        SimPod("10.30.0.1", "m", publisher=pub).serve(toks)
        assert sync(client, {"10.30.0.1": pub.seq})

        def scored() -> bool:
            r = httpx.post(f"{base}/score_tokens", json={"model": "m", "token_ids": toks})
            return r.status_code == 200 and r.json()["scores"] == {"10.30.0.1": 4.0}

        assert _wait(scored, 30)
    finally:
        pub.close()
        client.close()
    # The ingress runs with the replica settings of kvray's config.
    status = serve.status().applications[APP_NAME]
    assert set(status.deployments) == {"KvrayRuntime", "KvrayIngress"}


def test_a_redeploy_with_another_config_reconciles_the_actors(deployed: dict[str, Any]) -> None:
    args = copy.deepcopy(deployed)
    args["config"]["num_shards"] = 2
    args["config"]["num_tokenizers"] = 1
    _deploy(args)
    assert _wait(lambda: sum("shard" in n for n in _actors(NS)) == 2), _actors(NS)
    assert runtime.running_config(NS)["num_shards"] == 2  # type: ignore[index]
    cfg = Config.model_validate(args["config"])
    base = find_http(cfg, timeout_s=60)
    assert httpx.get(f"{base}/healthz").json()["namespace"] == NS
    # Deploying the same configuration again keeps the running actors (and their index).
    before = ray.get_actor(CONTROLLER, namespace=NS)._actor_id.hex()
    _deploy(args)
    assert ray.get_actor(CONTROLLER, namespace=NS)._actor_id.hex() == before
    deployed.update(args)


def test_deleting_the_application_leaves_no_actor(deployed: dict[str, Any]) -> None:
    serve.delete(APP_NAME)
    assert _wait(lambda: _actors(NS) == [], 60), _actors(NS)
