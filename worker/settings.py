"""The one settings object of a worker, read from ``BLIPQ_*`` environment variables at start-up."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from producer.protocol.s3 import S3Settings
from producer.protocol.settings import ClientSettings

DEFAULT_MODELS: dict[str, str] = {
    "caption-base": "Salesforce/blip-image-captioning-base",
    "caption-large": "Salesforce/blip-image-captioning-large",
    "vqa-base": "Salesforce/blip-vqa-base",
    "vqa-capfilt-large": "Salesforce/blip-vqa-capfilt-large",
    "itm-base": "Salesforce/blip-itm-base-coco",
    "itm-large": "Salesforce/blip-itm-large-coco",
    "blip2-opt-2.7b": "Salesforce/blip2-opt-2.7b",
    "blip2-flan-t5-xl": "Salesforce/blip2-flan-t5-xl",
}
"""Model names a job may use, mapped to a Hugging Face hub id or a local directory."""

# Moderation policies: the shipped default.
DEFAULT_POLICIES: dict[str, str] = {
    "default": str(Path(__file__).resolve().parent / "policies" / "default.yaml"),
}

# The model family of a checkpoint, from the `architectures` entry of its config.json.
ARCHITECTURE_FAMILIES: dict[str, str] = {
    "BlipForConditionalGeneration": "caption",
    "BlipForQuestionAnswering": "vqa",
    "BlipForImageTextRetrieval": "match",
    "Blip2ForConditionalGeneration": "blip2",
}

Family = Literal["caption", "vqa", "match", "blip2", "null", "sim"]
"""Model families; the job kinds each serves are its runner's (``worker.models.registry``)."""


class ModelSpec(BaseModel):
    """One entry of the model map."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    source: str
    family: Family
    max_batch_size: int | None = Field(default=None, ge=1, le=1024)
    max_wait_ms: float | None = Field(default=None, ge=0, le=60_000)
    crash_on: str | None = Field(default=None, min_length=1)
    """Fault injection, null family only (poison-job drills and tests): the worker SIGKILLs
    itself when a batch holds a job whose image URI contains this text. Never set in service."""

    @model_validator(mode="after")
    def _crash_only_for_drills(self) -> ModelSpec:
        if self.crash_on is not None and self.family != "null":
            raise ValueError(
                f"model {self.name!r}: crash_on is fault injection for the null family only "
                f"(a drill model such as {{'source': 'null', 'family': 'null', "
                f"'crash_on': 'poison'}}), not for a {self.family} model"
            )
        return self


class Settings(S3Settings, ClientSettings):
    """Everything a worker is configured by. Build it once, at start-up: ``Settings()``."""

    # --- models ---
    models: dict[str, str | dict[str, object]] = Field(
        default_factory=dict,
        description='Extra or overriding model map entries, JSON: {"name": "hub-id-or-dir"} or '
        '{"name": {"source": ..., "family": "caption", "max_batch_size": 32}}; families: '
        "caption, vqa, match, blip2 (inferred from a local config.json or the name).",
    )
    model_dirs: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Directories of saved models (comma-separated): each folder in them that "
        "holds a config.json joins the model map under the folder's name.",
    )
    policy_dirs: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Directories of moderation policies (comma-separated): each NAME.yaml in "
        "them is the policy NAME.",
    )
    serve: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["caption-base"],
        description="Model names this worker loads at start and serves (comma-separated or JSON).",
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="auto = float16 on CUDA, float32 on CPU."
    )
    warmup: bool = Field(default=True, description="Run one dummy batch per model at start.")
    sdpa_attention: bool = Field(
        default=True,
        description="Run BLIP's vision attention through torch's fused "
        "scaled_dot_product_attention instead of transformers' eager matmul + softmax (13% "
        "faster captioning on 2 CPU cores; same outputs within float tolerance).",
    )
    caption_scorer: str = Field(
        default="itm-base",
        description="ITM model that ranks best-of-k caption candidates (must be served).",
    )
    policies: dict[str, str] = Field(
        default_factory=dict,
        description='Extra or overriding moderation policies, JSON: {"name": "/path/policy.yaml"}; '
        "added to the shipped default policy. Every policy is validated at start.",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for torch (default: all cores)."
    )
    exact_resize: bool = Field(
        default=False,
        description="Resize images with PIL as BLIP's processor does (the same pixels exactly) "
        "instead of torch's antialiased resize of the same filter: 5x faster, within two 8-bit "
        "levels of PIL's.",
    )
    gil_switch_interval_ms: float = Field(
        default=0.5,
        gt=0,
        le=100,
        description="Python's GIL switch interval in the worker (Python's default: 5). "
        "Shorter lets the consumer loop and the I/O threads back in sooner while other "
        "threads run Python: +15 % null-model images/s at 0.5.",
    )

    # --- processes ---
    intake_processes: Literal["auto"] | Annotated[int, Field(ge=0, le=256)] = Field(
        default="auto",
        description="blipq-worker: 0 = one process (the Celery consumer, its threads and the "
        "model thread share one GIL); N = a model process that only batches and runs the "
        "models, and N intake processes (Celery consumers with threads) that fetch, decode, "
        "preprocess, hand pixels over through shared memory, store results and acknowledge; "
        "auto = on a CUDA device the worker's cores minus one, at least 1 (its CPU affinity, "
        "capped by a container's CPU limit), and 0 on the CPU (the model pass wants the cores "
        "there).",
    )
    model_socket: str | None = Field(
        default=None,
        description="Set by blipq-worker for its intake processes: the model process's Unix "
        "socket. Not set by hand.",
    )
    model_connect_s: float = Field(
        default=600.0,
        gt=0,
        le=3600,
        description="How long an intake process waits for the model process at start (it "
        "loads the models first); then the intake process ends and blipq-worker starts it again.",
    )

    # --- batching ---
    max_batch_size: int = Field(default=16, ge=1, le=1024, description="Items per forward pass.")
    max_wait_ms: float = Field(
        default=10.0, ge=0, le=60_000, description="Longest an item waits for its batch to fill."
    )
    arriving_wait_fraction: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="While more jobs for a model are already being fetched and decoded, a batch "
        "may wait for them longer than max_wait_ms: up to this fraction of the model's last "
        "forward pass, at most 1 s (a burst shares a seconds-long CPU pass; a 20 ms GPU pass "
        "waits 5 ms at most). 0 = max_wait_ms only.",
    )
    concurrency: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Worker threads (messages in flight); default 2 x max_batch_size + 4.",
    )

    # --- object storage ---
    s3_allowed_buckets: Annotated[list[str] | None, NoDecode] = Field(
        default=None, description="If set, only these buckets may be read."
    )
    s3_direct_get: bool = Field(
        default=True,
        description="Read objects over a URL boto3 presigns, with urllib3 (0.5 ms of CPU per "
        "GET instead of get_object's 1.4 ms); false, or an HTTP proxy in the environment: "
        "get_object.",
    )
    s3_max_attempts: int = Field(
        default=7,
        ge=1,
        le=20,
        description="Tries of a transiently failing GET, backoff 1, 2, 4, 8, 15, 30 s "
        "(the default rides out about a minute of object-store outage).",
    )

    # --- limits ---
    max_image_bytes: int = Field(default=25 * 2**20, ge=1024, description="Largest object read.")
    max_image_pixels: int = Field(
        default=50_000_000, ge=4096, description="Largest decoded image (w x h)."
    )
    max_message_bytes: int = Field(
        default=16 * 2**20,
        ge=4096,
        description="Largest broker message body, after decompression: a compressed message "
        "(kombu's `compression` header) is inflated only up to this size, and a larger one on "
        "the wire is not parsed beyond its headers; either is refused with `invalid_job`. A "
        "worker's memory grows by at most this plus 100 MB for any message (tests/e2e/"
        "test_wire_e2e.py).",
    )
    jpeg_draft: bool = Field(
        default=True,
        description="Decode large JPEGs at 1/2, 1/4 or 1/8 scale, never below twice the "
        "model's input side nor 512 px (2.4x faster on 2400 px photos; pixels within 0.03 "
        "of a full decode).",
    )

    # --- delivery ---
    visibility_timeout_s: int = Field(
        default=3600,
        ge=5,
        description="Seconds before an unacknowledged message is redelivered (Redis broker); "
        "must exceed the worst queue wait plus run time (small values are for tests).",
    )
    task_time_limit_s: float = Field(default=600.0, gt=0, description="Hard limit per job.")
    stream_maxlen: int = Field(default=100_000, ge=100, description="Results stream cap.")
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="Serve Prometheus metrics on this port."
    )
    metrics_addr: str = Field(default="0.0.0.0", description="Address the metrics server binds.")
    task_events: bool = Field(
        default=False,
        description="Send Celery task events from the start (three broker messages per job: "
        "7% of the null-model throughput). Flower turns them on by itself (its enable_events "
        "option, on by default); so does `celery -A worker.celery.app control enable_events`.",
    )
    log_every_task: bool = Field(
        default=False,
        description="Celery's two INFO lines per message (received; succeeded, with the result). "
        "Off: a line per image is noise at hundreds of images/s, and cost 3% of the worker's "
        "GIL time; results are on the results stream and in the metrics, and failures, retries "
        "and poison jobs are still logged.",
    )
    reap_after_s: float = Field(
        default=900.0,
        ge=1,
        description="A Redis-brokered job with no result this long after submission, not "
        "running, not held and no longer queued is sent again (a consumer lost it).",
    )
    reap_interval_s: float = Field(
        default=30.0, ge=0.5, description="Seconds between reaper sweeps (one worker at a time)."
    )
    max_deliveries: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Deaths of a job running alone (quarantined after a first start that did "
        "not finish) before it is declared poison and dead-lettered.",
    )

    @field_validator("model_dirs", "policy_dirs")
    @classmethod
    def _directories(cls, value: list[str]) -> list[str]:
        missing = [path for path in value if not Path(path).is_dir()]
        if missing:
            raise ValueError(f"not a directory: {', '.join(missing)}")
        return value

    @field_validator("serve", "s3_allowed_buckets", "model_dirs", "policy_dirs", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_served(self) -> Settings:
        known = self.model_map()
        unknown = [name for name in self.serve if name not in known]
        if unknown:
            raise ValueError(
                f"BLIPQ_SERVE names unknown models {unknown}; add them to BLIPQ_MODELS "
                f'(e.g. BLIPQ_MODELS=\'{{"{unknown[0]}": "/path/to/model"}}\') '
                f"or use one of {sorted(known)}"
            )
        if not self.serve:
            raise ValueError("BLIPQ_SERVE is empty: name at least one model to serve")
        return self

    def intake_count(self, *, cuda: bool, cores: int) -> int:
        """The intake processes ``blipq-worker`` starts: an explicit count, or for ``auto`` the
        worker's ``cores`` minus one (at least 1) when the models run on CUDA, else 0."""
        if self.intake_processes != "auto":
            return self.intake_processes
        return max(1, cores - 1) if cuda else 0

    @property
    def worker_concurrency(self) -> int:
        return self.concurrency or 2 * self.max_batch_size + 4

    def model_map(self) -> dict[str, ModelSpec]:
        """Every model name a job may use, defaults first, ``BLIPQ_MODELS`` on top."""
        raw: dict[str, str | dict[str, object]] = {
            **DEFAULT_MODELS,
            **_models_in(self.model_dirs),
            **self.models,
        }
        return {name: _spec(name, entry) for name, entry in raw.items()}

    def policy_map(self) -> dict[str, str]:
        """Every moderation policy a job may name -> its YAML file, ``BLIPQ_POLICIES`` on top."""
        return {**DEFAULT_POLICIES, **_policies_in(self.policy_dirs), **self.policies}

    def served(self) -> list[ModelSpec]:
        specs = self.model_map()
        return [specs[name] for name in self.serve]


def _models_in(directories: Sequence[str]) -> dict[str, str | dict[str, object]]:
    """Every saved model (a folder with a config.json) in these directories, by folder name."""
    return {
        path.name: str(path)
        for directory in directories
        for path in sorted(Path(directory).iterdir())
        if (path / "config.json").is_file()
    }


def _policies_in(directories: Sequence[str]) -> dict[str, str]:
    """Every policy file (``NAME.yaml``) in these directories, by file name."""
    return {
        path.stem: str(path)
        for directory in directories
        for path in sorted(Path(directory).glob("*.yaml"))
    }


def _spec(name: str, entry: str | dict[str, object]) -> ModelSpec:
    fields: dict[str, object] = {"source": entry} if isinstance(entry, str) else dict(entry)
    if "family" not in fields:  # inferred only when not given (inference may fail)
        fields["family"] = _infer_family(name, str(fields["source"]))
    return ModelSpec(name=name, **fields)  # type: ignore[arg-type]


def _infer_family(name: str, source: str) -> str:
    """A model's family: from its local config.json, else from its name or hub id."""
    config = Path(source) / "config.json"
    if config.is_file():
        for arch in json.loads(config.read_text()).get("architectures") or []:
            if arch in ARCHITECTURE_FAMILIES:
                return ARCHITECTURE_FAMILIES[arch]
    hints = {"blip2": "blip2", "itm": "match", "match": "match", "vqa": "vqa", "caption": "caption"}
    for hint, family in hints.items():
        if hint in name.lower() or hint in source.lower():
            return family
    raise ValueError(
        f"cannot tell which model family {name!r} is; give it as "
        f'{{"{name}": {{"source": "{source}", "family": "caption"}}}} '
        f"(families: {sorted(get_args(Family))})"
    )


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process's settings, built from the environment on first use (at worker start)."""
    global _settings
    if _settings is None:
        _settings = Settings()
    return _settings
