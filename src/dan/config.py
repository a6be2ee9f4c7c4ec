"""Settings: one pydantic-settings object. Building it reads the environment and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DType = Literal["auto", "float32", "float16", "bfloat16"]
AuthMode = Literal["auto", "required", "optional"]
UnservedModelPolicy = Literal["reject", "accept"]
BlobStoreKind = Literal["auto", "files", "database"]
NodeBackend = Literal["diffusers", "a1111"]
FastPath = Literal["auto", "off", "compile"]
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
GITHUB = "github"  # the sign-in providers' ids, as in /auth/login/{id}
OIDC = "oidc"


class Settings(BaseSettings):
    """Every knob of DAN. Each field can be set as an environment variable ``DAN_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="DAN_", extra="ignore")

    # HTTP
    host: str = Field("127.0.0.1", description="address the API listens on")
    port: int = Field(6006, ge=0, le=65535, description="port the API listens on")
    cors_origins: str = Field(
        "",
        description="comma-separated origins (https://app.example) whose browser clients may "
        "call the API; * for any",
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="largest request body accepted, in bytes"
    )
    sync_timeout_s: float = Field(
        120.0, gt=0, description="how long a synchronous request waits before answering timeout"
    )
    poll_interval_s: float = Field(
        0.02, gt=0, description="how often waiting requests and idle workers look at the queue (s)"
    )
    metrics: bool = Field(True, description="serve Prometheus metrics at GET /metrics")
    metrics_token: SecretStr | None = Field(
        None,
        description="when set, GET /metrics answers only requests with the header "
        "Authorization: Bearer <this token> (Prometheus: authorization.credentials)",
    )
    metrics_max_nodes: int = Field(
        100,
        ge=0,
        description="nodes named in the metrics' node label; the runs of any more count as "
        "node=other",
    )
    worker_idle_poll_s: float = Field(
        2.0,
        gt=0,
        description="how often an idle local worker that is woken when a task is queued "
        "(PostgreSQL NOTIFY, or its server through stdin) looks at the queue anyway (s); "
        "poll_interval_s gives the old polling",
    )

    # Where things live
    data_dir: Path = Field(Path("data"), description="database, results and caches")
    models_dir: Path = Field(
        Path("models"), description="checkpoints, loras, controlnet, upscalers"
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file inside data_dir"
    )
    blob_store: BlobStoreKind = Field(
        "auto",
        description="where images live: files in data_dir, or the database (shared by every "
        "API replica); auto: the database on PostgreSQL, files on SQLite",
    )

    # Models
    download: bool = Field(True, description="pull the default checkpoint when none is installed")
    allow_ckpt: bool = Field(
        False, description="load pickled .ckpt files (unpickling can run code; trust them first)"
    )
    default_model: str | None = Field(
        None, description="checkpoint used when a request names none (hash or name)"
    )

    # Queue
    max_pending_per_account: int = Field(
        16,
        ge=1,
        description="pending images per account (a task of batch_size x n_iter images counts "
        "that many); 16 lets one request of the most images a request may ask for wait",
    )
    result_ttl_s: float = Field(24 * 3600.0, gt=0, description="how long results are kept")
    lease_s: float = Field(30.0, gt=0, description="a worker's claim lasts this long unrenewed")
    max_attempts: int = Field(3, ge=1, description="tries before a task whose worker died fails")
    max_prompt_chars: int = Field(8000, ge=1, description="longest prompt accepted")

    # Accounts, keys and honor
    auth: AuthMode = Field(
        "auto",
        description="API keys: required; optional (every key or none is accepted from anyone, "
        "proxied or not: choose it only when something in front of DAN decides who may call); "
        "or auto: optional for the embedded single-user server (SQLite, listening on "
        "loopback), except for requests that came through a proxy or tunnel (a Forwarded, "
        "X-Forwarded-For, X-Real-IP, Via or similar header), which need a valid key",
    )
    max_keys_per_account: int = Field(
        10,
        ge=1,
        description="active API keys an account may have at once (revoked keys do not count)",
    )
    anonymous_lanes: int = Field(
        64,
        ge=1,
        le=100_000,
        description="when keys are optional, unknown keys share this many anonymous accounts "
        "(queue lanes), picked by the key's hash: a client keeps its lane, and inventing keys "
        "adds no rows beyond these",
    )
    public_key: bool = Field(
        False,
        description="offer a public key (GET /api/user/public-api-key) for anonymous use at "
        "the lowest priority",
    )
    public_api_key: str | None = Field(
        None,
        description="the public key itself; default: one made once and kept in data_dir (set "
        "it on every API replica so they all hand out the same one)",
    )
    signup_honor: float = Field(10.0, ge=0, description="honor a new account starts with")
    honor_per_task: float = Field(
        1.0,
        ge=0,
        description="honor a node's owner earns for a task of cost 1 (one 512x512, 20-step SD 1.x "
        "image); a task earns this times its cost, so 4 images earn 4 times one",
    )
    honor_per_interval: float = Field(
        1.0, ge=0, description="honor a node's owner earns per online interval"
    )
    online_interval_s: float = Field(600.0, gt=0, description="length of an online interval")

    # Sign in (OAuth 2 / OpenID Connect): off unless a provider is configured
    public_url: str | None = Field(
        None,
        description="the server's external base URL (https://dan.example), for the sign-in "
        "redirect URIs <public_url>/auth/callback/<provider>; default: the request's own URL",
    )
    session_secret: str | None = Field(
        None,
        min_length=32,
        description="signs the sign-in session cookies (at least 32 characters; the same on "
        "every API replica); default: one made once and kept in data_dir",
    )
    session_max_age_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="a sign-in session lasts this long"
    )
    github_client_id: str | None = Field(None, description="GitHub OAuth app's client id")
    github_client_secret: str | None = Field(None, description="GitHub OAuth app's secret")
    github_url: str = Field(
        "https://github.com", description="GitHub's web address (GitHub Enterprise: your server)"
    )
    github_api_url: str = Field(
        "https://api.github.com",
        description="GitHub's API address (GitHub Enterprise: https://HOST/api/v3)",
    )
    oidc_issuer: str | None = Field(
        None,
        description="an OpenID Connect provider's issuer URL (its /.well-known/"
        "openid-configuration is read from there)",
    )
    oidc_client_id: str | None = Field(None, description="client id at the OIDC provider")
    oidc_client_secret: str | None = Field(None, description="client secret at the provider")
    oidc_name: str = Field("OpenID Connect", description="the OIDC provider's name, as shown")

    # Nodes
    node_offline_after_s: float = Field(
        60.0, gt=0, description="a node not heard from for this long is offline"
    )
    unserved_models: UnservedModelPolicy = Field(
        "reject",
        description="a task for a checkpoint no online node has: reject it at once (503), or "
        "accept it with a warning in the message",
    )
    affinity_lookahead: int = Field(
        8,
        ge=1,
        description="a node may take, of the next this-many runnable tasks, one for a "
        "checkpoint it has loaded before the first in line",
    )
    claim_threads: int = Field(
        4,
        ge=1,
        description="threads (and so database connections) that nodes' claims use at once on "
        "one API server; the other requests keep the rest",
    )
    max_nodes_per_account: int = Field(
        32,
        ge=1,
        description="nodes (names) one account may register; also its claims that may wait "
        "at once on one API server",
    )
    max_sessions_per_node: int = Field(
        4, ge=1, description="processes that may serve one node (name) at once"
    )
    max_files_per_account: int = Field(
        100_000, ge=0, description="installed files all of one account's nodes may report"
    )
    runtime_base_s: float = Field(
        120.0, gt=0, description="every run may take this long, plus runtime_per_cost_s x cost"
    )
    runtime_per_cost_s: float = Field(
        120.0,
        ge=0,
        description="extra run time per unit of cost (a 512x512, 20-step txt2img costs 1); a "
        "run past its limit goes to another node",
    )

    # Trust: checks of nodes' results, and the honor they earn
    probation_checks: int = Field(
        3,
        ge=0,
        description="a new node's results are held until this many have been re-run by another "
        "account's node (or the trusted local worker) and matched; its honor waits in escrow",
    )
    verify_share: float = Field(
        0.05,
        ge=0,
        le=1,
        description="the share of a node's later results that is re-run and compared",
    )
    verify_threshold: float = Field(
        0.06,
        gt=0,
        description="largest perceptual distance (RMS of 32x32 colour thumbnails, 0-1) at which "
        "two runs of one task count as the same picture",
    )
    verify_timeout_s: float = Field(
        600.0,
        gt=0,
        description="how long a held result waits for its check before it is shown unchecked",
    )
    online_honor_window_s: float = Field(
        3600.0,
        gt=0,
        description="a node earns online honor only if it delivered an accepted result for "
        "another account within this window",
    )
    rewarded_nodes_per_account: int = Field(
        4, ge=0, description="nodes of one account that earn online honor in an interval"
    )

    # Worker / engine
    worker: bool = Field(True, description="run a local worker next to the API")
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:1, ...")
    dtype: DType = Field("auto", description="auto: fp16 on CUDA, bf16 on CPUs with native bf16")
    cpu_threads: int = Field(0, ge=0, description="torch threads on CPU (0: torch's default)")
    fast_path: FastPath = Field(
        "auto",
        description="compile: run the UNet compiled by inductor with frozen weights for the "
        "shapes plain requests use (compiled in the background, the plain path serving "
        "meanwhile; about the UNet's size in memory per shape); auto: on CPUs computing in "
        "bf16; off: plain diffusers",
    )
    compile_max_shapes: int = Field(
        2,
        ge=1,
        le=16,
        description="most input shapes (size x batch) compiled per checkpoint by the fast path",
    )
    batch_max: int = Field(
        0,
        ge=0,
        le=64,
        description="batching across requests: most images one UNet batch of compatible "
        "tasks holds (fewer for images larger than 512x512; 1: no batching); 0: this "
        "device's default (2 on a CPU, by memory on a GPU, at most 8)",
    )
    pipeline_cache_bytes: int = Field(
        12 * 1024**3, ge=0, description="memory budget for checkpoints kept loaded"
    )
    lora_cache_bytes: int = Field(
        1024**3, ge=0, description="memory budget for LoRA files kept read"
    )

    # Webhooks: a task submitted with a callback_url POSTs its final status there (README,
    # "Webhooks"); dan.webhooks.
    webhook_allow_private: bool = Field(
        False,
        description="let callback_url reach loopback, private, link-local and other non-public "
        "addresses (turns the SSRF guard off: only for receivers on a network you trust)",
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=300, description="a webhook try must be answered within this long (s)"
    )
    webhook_max_attempts: int = Field(
        8, ge=1, le=30, description="tries of a webhook before it is given up"
    )
    webhook_retry_s: float = Field(
        10.0,
        gt=0,
        description="wait before a failed webhook's second try; each later one waits 3 times "
        "longer than the one before (10 s, 30 s, 90 s, ...)",
    )
    webhook_poll_s: float = Field(
        1.0, gt=0, description="how often each API process looks for webhooks to send (s)"
    )

    # Downloads: a Hugging Face mirror, and the tokens of sources that need one. The standard
    # HF_ENDPOINT and HF_TOKEN (read by the hub's own tools) apply when the DAN_ ones are unset.
    hf_endpoint: str = Field(
        "https://huggingface.co",
        validation_alias=AliasChoices("DAN_HF_ENDPOINT", "HF_ENDPOINT", "hf_endpoint"),
        description="base URL of the Hugging Face hub or of a mirror of it "
        "(https://hf-mirror.example): catalog files on huggingface.co are downloaded from there",
    )
    hf_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("DAN_HF_TOKEN", "HF_TOKEN", "hf_token"),
        description="Hugging Face access token for gated repositories; sent only to "
        "huggingface.co or the mirror of hf_endpoint",
    )
    civitai_api_key: SecretStr | None = Field(
        None,
        description="CivitAI API key for models whose creators allow signed-in downloads only; "
        "sent only to civitai.com",
    )

    # AUTOMATIC1111 facade (/sdapi/v1): its clients set no timeout and wait for the image
    a1111_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="how long a synchronous /sdapi/v1 request (txt2img, img2img, extras, "
        "interrogate) waits for its task before answering 504; the task keeps running",
    )

    @model_validator(mode="after")
    def _check_sign_in(self) -> Settings:
        _check_together(
            DAN_GITHUB_CLIENT_ID=self.github_client_id,
            DAN_GITHUB_CLIENT_SECRET=self.github_client_secret,
        )
        _check_together(
            DAN_OIDC_ISSUER=self.oidc_issuer,
            DAN_OIDC_CLIENT_ID=self.oidc_client_id,
            DAN_OIDC_CLIENT_SECRET=self.oidc_client_secret,
        )
        _check_url("DAN_PUBLIC_URL", self.public_url)
        _check_url("DAN_OIDC_ISSUER", self.oidc_issuer)
        _check_url("DAN_GITHUB_URL", self.github_url)
        _check_url("DAN_GITHUB_API_URL", self.github_api_url)
        return self

    @model_validator(mode="after")
    def _check_downloads(self) -> Settings:
        _check_url("DAN_HF_ENDPOINT", self.hf_endpoint)
        return self

    @property
    def sign_in_providers(self) -> tuple[str, ...]:
        """The ids of the sign-in providers configured (none: sign-in is off)."""
        configured = {GITHUB: self.github_client_id, OIDC: self.oidc_issuer}
        return tuple(provider for provider, value in configured.items() if value)

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def keys_required(self) -> bool:
        """Whether requests need a valid API key (see ``auth``)."""
        if self.auth != "auto":
            return self.auth == "required"
        embedded = self.database_url is None or self.database_url.startswith("sqlite")
        return not (embedded and self.host in LOOPBACK_HOSTS)

    @property
    def blobs_in_database(self) -> bool:
        if self.blob_store != "auto":
            return self.blob_store == "database"
        return not self.db_url.startswith("sqlite")

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'dan.sqlite3').resolve()}"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    # A node serving through an AUTOMATIC1111 or Forge instance (`dan node --backend a1111`)
    node_backend: NodeBackend = Field(
        "diffusers",
        description="what runs a node's tasks: diffusers (this machine's GPU, with the models "
        "folder) or a1111 (an AUTOMATIC1111/Forge instance's API, with its models)",
    )
    a1111_url: str = Field(
        "http://127.0.0.1:7860",
        description="the AUTOMATIC1111/Forge instance an a1111 node runs its tasks on (started "
        "with --api)",
    )
    a1111_user: str | None = Field(None, description="user of the instance's --api-auth")
    a1111_password: str | None = Field(None, description="password of the instance's --api-auth")
    a1111_api_key: str | None = Field(
        None, description="an API key of the instance, when it is a DAN server that needs one"
    )

    @model_validator(mode="after")
    def _check_a1111(self) -> Settings:
        _check_url("DAN_A1111_URL", self.a1111_url)
        if self.a1111_password and not self.a1111_user:
            raise ValueError("DAN_A1111_PASSWORD needs DAN_A1111_USER (HTTP Basic, as --api-auth)")
        return self

    # Model families a node serves (`dan node --families sd15`): by default every family its
    # memory allows (dan.workers.capabilities); this narrows it, e.g. to keep a 12 GiB card on
    # SD 1.x work only.
    node_families: str = Field(
        "",
        description="comma-separated model families this node serves (sd15, sdxl); empty: "
        "every family it has the memory for",
    )

    @model_validator(mode="after")
    def _check_node_families(self) -> Settings:
        unknown = sorted(set(self.node_family_names) - set(FAMILY_NAMES))
        if unknown:
            raise ValueError(
                f"DAN_NODE_FAMILIES: model families are {', '.join(FAMILY_NAMES)}, got "
                f"{', '.join(unknown)}"
            )
        return self

    @property
    def node_family_names(self) -> tuple[str, ...]:
        """The families of ``node_families`` (empty: not narrowed)."""
        return tuple(name.strip() for name in self.node_families.split(",") if name.strip())


FAMILY_NAMES = ("sd15", "sdxl")  # dan.domain.ModelFamily's values (config imports no domain)


def _check_together(**settings: str | None) -> None:
    """ValueError if some of ``settings`` are set and others not."""
    missing = [name for name, value in settings.items() if not value]
    if missing and len(missing) < len(settings):
        raise ValueError(
            f"sign-in needs {' and '.join(settings)} together; not set: {', '.join(missing)}"
        )


def _check_url(name: str, url: str | None) -> None:
    if url is not None and not url.startswith(("https://", "http://")):
        raise ValueError(f"{name} must be an http(s) URL such as https://dan.example, got {url!r}")
