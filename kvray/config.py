"""kvray's configuration: pydantic models that reject unknown keys and describe every field.

One file (``kvray.yaml``) holds everything a user tunes; ``KVRAY_*`` environment variables
override single values (``KVRAY_INDEX__BACKEND=redis`` sets ``index.backend``). Defaults work
for vLLM pods left at their defaults (block size 16, ``sha256``, PYTHONHASHSEED unset).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from kvray.core.apply import ModelHashing
from kvray.core.hashing import BlockHasher
from kvray.core.routing import RoutingWeights
from kvray.core.sharding import Placement
from kvray.errors import ConfigError

ENV_PREFIX = "KVRAY_"
HashAlgoName = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]


class _Strict(BaseModel):
    # Reject unknown keys so typos fail at parse time instead of being silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """How one model's pods cache and hash blocks."""

    block_size: int = Field(16, gt=0, le=4096, description="Tokens per KV block (--block-size).")
    hash_algo: HashAlgoName = Field("sha256", description="The pods' --prefix-caching-hash-algo.")
    hash_seed: str | None = Field(
        None,
        description="The pods' PYTHONHASHSEED as a string; null when unset (xxhash* then "
        "cannot be reproduced: request keys still work, hash checks are off).",
    )
    lora_paths: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapter name -> path as loaded by vLLM (needed for engine keys and "
        "hash checks of LoRA blocks).",
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer directory (tokenizer.json + tokenizer_config.json) or hub name; "
        "null: the model name.",
    )

    def hashing(self) -> ModelHashing:
        """The core's view of this model's hashing."""
        hasher = None
        if self.hash_seed is not None or not self.hash_algo.startswith("xxhash"):
            hasher = BlockHasher(self.hash_algo, self.hash_seed, self.block_size)
        return ModelHashing(self.block_size, hasher, dict(self.lora_paths))


class IndexConfig(_Strict):
    """The index: keying, backend, bounds, scoring weights, TTLs."""

    keys: Literal["request", "engine"] = Field(
        "request",
        description="'request': kvray's token-derived keys (works whatever the pods' hash "
        "settings); 'engine': the pods' own u64 hashes (needs hash_algo/hash_seed to match).",
    )
    default_model: ModelConfig = Field(
        default_factory=ModelConfig, description="Settings for models not listed in 'models'."
    )
    models: dict[str, ModelConfig] = Field(
        default_factory=dict, description="Per served-model-name settings."
    )
    backend: Literal["memory", "budget", "redis"] = Field(
        "memory", description="Index backend: bounded LRU, byte-budgeted, or Redis."
    )
    max_keys: int = Field(
        10_000_000, gt=0, description="memory backend: most (key, tier) entries kept (LRU)."
    )
    budget_bytes: int = Field(
        512 * 2**20, gt=0, description="budget backend: byte budget per shard."
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="redis backend: redis://, rediss:// (TLS) or unix:// URL.",
    )
    redis_password: str | None = Field(
        None, description="redis backend: password (or put it in the URL)."
    )
    redis_prefix: str = Field("kvray", description="redis backend: key prefix.")
    tier_weights: dict[str, float] = Field(
        default_factory=lambda: {"GPU": 1.0, "CPU": 0.8},
        description="Weight of a block held in each tier; unnamed tiers weigh 1.0.",
    )
    verify_hashes: bool = Field(
        True, description="Re-hash stored blocks to check each pod's hash contract."
    )
    verify_blocks: int = Field(
        64,
        ge=0,
        description="Blocks re-hashed per pod run (until it restarts) to check its hash "
        "contract; 0: every block. A pod's hash settings cannot change while it runs (a wrong "
        "algorithm, seed or extra key shows in its first block), and the check (~2-3 us per "
        "block, vLLM's sha256) was most of a shard's write time (256 blocks a pod: 12-20 % of "
        "it with 256 pods).",
    )
    speculative_ttl_s: float = Field(
        5.0, gt=0, description="Lifetime of speculative entries recorded by /route."
    )
    pod_ttl_s: float | None = Field(
        None,
        gt=0,
        description="Drop pods silent for longer than this; null: never. Silence is counted "
        "while the pod's reader listens: an ingestor's outage is not its pods' silence (its "
        "restart replays what they sent meanwhile).",
    )

    def model(self, name: str) -> ModelConfig:
        """The settings of ``name``."""
        return self.models.get(name, self.default_model)

    def hashing_lookup(self) -> Callable[[str], ModelHashing]:
        """model name → its ``ModelHashing``, memoised (key derivation asks once per block
        batch, so the per-model hasher is built once)."""
        cache: dict[str, ModelHashing] = {}

        def lookup(model: str) -> ModelHashing:
            h = cache.get(model)
            if h is None:
                h = cache[model] = self.model(model).hashing()
            return h

        return lookup

    def backend_options(self) -> dict[str, Any]:
        """Keyword options for ``create_backend(self.backend, ...)``."""
        if self.backend == "memory":
            return {"max_keys": self.max_keys}
        if self.backend == "budget":
            return {"budget_bytes": self.budget_bytes}
        return {
            "url": self.redis_url,
            "password": self.redis_password,
            "prefix": self.redis_prefix,
        }


class EventsConfig(_Strict):
    """Where KV events come from."""

    bind: list[str] = Field(
        default_factory=list,
        description="Endpoints kvray binds a SUB socket on, for pods that connect "
        "(llm-d topology), e.g. tcp://0.0.0.0:5557.",
    )
    connect: list[PodEndpoint] = Field(
        default_factory=list, description="Pods that bind their PUB socket (vLLM default)."
    )
    replay: dict[str, str] = Field(
        default_factory=dict,
        description="Pod id -> replay ROUTER endpoint, for pods that connect to a bound socket.",
    )
    replay_timeout_s: float = Field(
        1.0, gt=0, description="How long one replay request waits for the pod's answer."
    )
    replay_attempts: int = Field(
        3,
        ge=1,
        description="Replay requests per missing range (each resumes where the previous "
        "answer stopped) before the range is counted lost.",
    )
    flush_interval_s: float = Field(
        0.005, gt=0, description="Longest time events wait in an ingestor before shipping."
    )
    flush_messages: int = Field(
        256,
        gt=0,
        description="Queued messages that trigger an immediate shipment to a shard (larger "
        "calls amortise Ray's per-call cost; flush_interval_s still bounds the wait).",
    )
    shard_reads_named_pods: bool = Field(
        True,
        description="A pod added with its name (add_pod / events.connect with pod) is read by "
        "the shard that owns it, in its own process: no ingestor hop, no Ray call per batch. "
        "false: ingestors read every pod.",
    )
    max_inflight: int = Field(
        4, gt=0, description="Shard calls in flight per ingestor (backpressure beyond)."
    )


class PodEndpoint(_Strict):
    """A pod whose PUB socket kvray connects to."""

    endpoint: str = Field(description="The pod's PUB endpoint, e.g. tcp://10.0.0.7:5557.")
    replay_endpoint: str | None = Field(
        None, description="The pod's replay ROUTER endpoint, e.g. tcp://10.0.0.7:5558."
    )
    pod: str | None = Field(
        None, description="Pod id used when the pod publishes with an empty topic."
    )
    model: str | None = Field(None, description="Model used when the topic is empty.")

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _zmq_endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"{v!r} is not a ZMQ endpoint (tcp://, ipc:// or inproc://)")
        return v


EventsConfig.model_rebuild()


class ServeConfig(_Strict):
    """The HTTP endpoint."""

    host: str = Field("127.0.0.1", description="Interface the HTTP endpoint listens on.")
    port: int = Field(
        8000,
        ge=0,
        le=65535,
        description="Serve's HTTP port (its proxy; unused with direct ingress).",
    )
    side_port: int | None = Field(
        None,
        ge=0,
        le=65535 - 64,
        description="Opt-in: each ingress replica also serves the same routes on its own "
        "listener, first free port from this one (0: any), skipping Serve's per-request work "
        "(and so Serve's max_ongoing_requests, autoscaling signal and request metrics); "
        "null: off.",
    )
    auth_token: str | None = Field(
        None, description="Bearer token required on every route but /healthz; null: none."
    )
    max_body_bytes: int = Field(8 * 2**20, gt=0, description="Largest request body accepted.")
    max_prompt_chars: int = Field(2_000_000, gt=0, description="Largest prompt accepted.")
    max_messages: int = Field(4096, gt=0, description="Most chat messages in one request.")
    max_pods_per_request: int = Field(4096, gt=0, description="Most pods in a 'pods' filter.")
    replicas: int = Field(
        1, ge=1, le=1024, description="Serve replicas of the HTTP ingress (without autoscaling)."
    )
    autoscaling: dict[str, Any] | None = Field(
        None,
        description="Serve autoscaling_config of the ingress (min_replicas, max_replicas, "
        "target_ongoing_requests, ...); replaces 'replicas' when set.",
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests one ingress replica takes at once (Serve's limit)."
    )


class ReplicaConfig(_Strict):
    """In-process read replicas of the index (``kvray.connect()`` and the Serve replicas)."""

    enabled: bool | None = Field(
        None,
        description="Shards publish their changes and readers score on a local replica; "
        "false: every score is an actor call to the shards; null: on unless the backend is "
        "redis (a shared Redis may have writers this deployment's replicas do not follow).",
    )
    host: str | None = Field(
        None,
        description="Interface the shards publish changes on; null: the node's Ray IP address.",
    )
    heartbeat_s: float = Field(
        0.05, gt=0, le=10, description="Shards announce their stream position this often when idle."
    )
    ready_timeout_s: float = Field(
        10.0,
        ge=0,
        description="How long connect() waits for its replica; scores go to the shards until then.",
    )


class SnapshotConfig(_Strict):
    """The controller's snapshots of the shards (what a restarted shard is restored from)."""

    dir: str | None = Field(
        None,
        description="Directory on the controller's node holding the snapshot files; null: one "
        "per namespace and Ray cluster under the machine's temporary directory. Set it to a "
        "persistent disk for snapshots that survive a reboot or a /tmp cleaner.",
    )
    interval_s: float = Field(10.0, gt=0, description="How often every shard's snapshot is taken.")


class RoutingConfig(_Strict):
    """How ``/route``, ``Client.route`` and the Serve request router pick a pod
    (``kvray.core.routing``): the lowest estimated cost, in KV blocks, of
    ``prefill × (1 + fullness × pool fill) + load_weight × queued work``."""

    load_weight: float = Field(
        1.0,
        ge=0,
        description="A block of queued work counts as this many blocks of prefill (1: "
        "estimated time to first token). Queued work is the caller's 'load' (tokens) or, "
        "when it gives none, kvray's own recent routing decisions.",
    )
    fullness: float = Field(
        1.0,
        ge=0,
        description="Extra cost of a new block on a full KV pool, times the pool's fill "
        "fraction (pool sizes are learned from each pod's events).",
    )
    self_load_weight: float = Field(
        0.5,
        ge=0,
        description="The same for kvray's own load estimate (its recent routing decisions), "
        "used when the caller gives no load.",
    )
    load_half_life_s: float = Field(
        1.0, gt=0, description="Half-life of kvray's own load estimate (blocks it routed)."
    )
    tie_blocks: float = Field(
        0.5,
        ge=0,
        description="Costs this close to the best tie; ties go by rendezvous hashing of the "
        "prompt's first block (same prefix, same pod).",
    )

    request_blocks: float = Field(
        16.0,
        ge=0,
        description="kvray's own load estimate: work each routed request brings besides its "
        "prefill (its decode), in blocks.",
    )

    def weights(self) -> RoutingWeights:
        return RoutingWeights(
            load_weight=self.load_weight,
            self_load_weight=self.self_load_weight,
            fullness=self.fullness,
            half_life_s=self.load_half_life_s,
            tie_blocks=self.tie_blocks,
            request_blocks=self.request_blocks,
        )


class Config(_Strict):
    """Everything kvray needs to run on a Ray cluster."""

    namespace: str = Field("kvray", description="Ray namespace of kvray's named actors.")
    num_shards: int = Field(2, gt=0, le=1024, description="Index shard actors.")
    num_ingestors: int = Field(1, gt=0, le=256, description="Ingestion actors.")
    num_tokenizers: int = Field(1, gt=0, le=256, description="Tokenizer actors in the pool.")
    index: IndexConfig = Field(default_factory=IndexConfig, description="The index.")
    events: EventsConfig = Field(default_factory=EventsConfig, description="Event sources.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="HTTP endpoint.")
    replica: ReplicaConfig = Field(
        default_factory=ReplicaConfig, description="Local read replicas of the index."
    )
    routing: RoutingConfig = Field(
        default_factory=RoutingConfig, description="How a pod is chosen for a prompt."
    )
    snapshots: SnapshotConfig = Field(
        default_factory=SnapshotConfig, description="Shard snapshots kept by the controller."
    )

    def replicas_on(self) -> bool:
        """Whether shards publish change streams and clients keep replicas."""
        if self.replica.enabled is None:
            return self.index.backend != "redis"
        return self.replica.enabled

    def placement(self) -> Placement:
        """The pins of the named pods in ``events.connect`` that shards read themselves,
        balanced in list order (every process derives the same from the same config)."""
        named: list[str] = []
        if self.events.shard_reads_named_pods:
            named = [p.pod for p in self.events.connect if p.pod]
        return Placement.balanced(self.num_shards, named)


class _EnvSource(EnvSettingsSource):
    """``KVRAY_*`` variables from a given mapping (``os.environ`` by default)."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str] | None) -> None:
        self._env = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        if self._env is None:
            return super()._load_env_vars()
        return {k.lower(): v for k, v in self._env.items()}


class _Settings(BaseSettings, Config):
    """``Config`` with environment overrides (pydantic-settings): ``KVRAY_<FIELD>`` and
    ``KVRAY_<SECTION>__<FIELD>``, declared fields only, over the file's values."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=True,
    )
    _env: ClassVar[Mapping[str, str] | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (_EnvSource(settings_cls, cls._env), init_settings)  # the environment wins


def load_config(
    path: str | Path | None = None,
    *,
    doc: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Load ``kvray.yaml`` (or ``doc``, an inline config such as a Serve application's args, or
    defaults) and apply ``KVRAY_*`` overrides.

    ``KVRAY_A__B=value`` sets ``a.b`` (pydantic-settings: scalars as text, lists and mappings
    as JSON). Only declared fields are read: ``KVRAY_PURE_PYTHON`` and other variables that
    name no field are left alone; an unknown field inside a section is an error.

    Raises:
        ConfigError: naming the file, the field and what is wrong.
    """
    if doc is not None and path is not None:
        raise ConfigError("give a config file or an inline config, not both")
    where = "defaults" if doc is None else "inline config"
    doc = dict(doc or {})
    if path is not None:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {where}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {where} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {where} must be a mapping at the top level")
        doc = loaded or {}
    try:
        settings = type("_SettingsFor", (_Settings,), {"_env": env})
        return Config.model_validate(settings(**doc).model_dump())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid config ({where}): {problems}") from exc
