"""Typed configuration of the HTTP endpoint (``sepit serve``, ``serve deploy``, ``jobs/serve.py``).

Everything that shapes a deployment lives here: which exported model folder the replicas load,
where the HTTP proxy listens (loopback unless told otherwise), how many replicas and how they
autoscale, continuous batching, per-request limits, the optional API key and generation defaults.
Load it from YAML with dotted overrides::

    cfg = load_config(ServeConfig, "serve.yaml", overrides=["limits.max_questions=4"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from sepit.config.base import ConfigError, check_choice, check_range, from_dict, merge, to_dict

#: Longest protein the encoder takes (ESM-2 positions: 1022 residues + <cls> + <eos>).
ENCODER_MAX_RESIDUES = 1022

#: ServeConfig fields a running model deployment takes from Serve's ``user_config`` (applied by
#: ``SepitModelRunner.reconfigure`` in place: no replica restart, no model reload).
USER_CONFIG_FIELDS = ("max_batch_size", "batch_wait_timeout_s", "generation")


@dataclass
class AutoscalingConfig:
    """Ray Serve autoscaling of the model replicas (used instead of a fixed replica count)."""

    min_replicas: int = 1
    """Replicas kept up when idle (>= 0; 0 scales to zero, the first request then waits for a load)."""
    max_replicas: int = 2
    """Upper bound on model replicas (each holds one model copy and, if configured, one GPU)."""
    target_ongoing_requests: float = 8.0
    """Ongoing requests per replica the autoscaler aims for (about one full batch)."""
    upscale_delay_s: float = 10.0
    """How long load must stay high before adding a replica."""
    downscale_delay_s: float = 120.0
    """How long load must stay low before removing a replica."""

    def __post_init__(self) -> None:
        check_range(self.min_replicas, "autoscaling.min_replicas", lo=0)
        check_range(self.max_replicas, "autoscaling.max_replicas", lo=1)
        if self.max_replicas < self.min_replicas:
            raise ConfigError(
                f"autoscaling.max_replicas={self.max_replicas} is below min_replicas={self.min_replicas}"
            )
        check_range(self.target_ongoing_requests, "autoscaling.target_ongoing_requests", lo=0, lo_inclusive=False)
        check_range(self.upscale_delay_s, "autoscaling.upscale_delay_s", lo=0)
        check_range(self.downscale_delay_s, "autoscaling.downscale_delay_s", lo=0)

    def to_serve(self) -> dict:
        """The ``autoscaling_config`` dict Ray Serve's ``@serve.deployment`` takes."""
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }


@dataclass
class LimitsConfig:
    """Per-request limits; a request over one gets 413/422 with a JSON error naming the limit."""

    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body in bytes (checked on Content-Length and on the streamed body, before
    any JSON parsing).  4 MiB holds an all-atom mmCIF of a ~1000-residue chain."""
    max_residues: int = ENCODER_MAX_RESIDUES
    """Longest protein accepted (residues); at most the encoder's 1022 positions."""
    max_questions: int = 8
    """Questions per ``/v1/answer`` request."""
    max_question_chars: int = 4000
    """Characters per question (or chat message)."""
    max_new_tokens: int = 256
    """Largest ``max_new_tokens`` / ``max_tokens`` a request may ask for."""
    max_messages: int = 16
    """Messages per chat-completions request."""

    def __post_init__(self) -> None:
        check_range(self.max_body_bytes, "limits.max_body_bytes", lo=1024)
        check_range(self.max_residues, "limits.max_residues", lo=1, hi=ENCODER_MAX_RESIDUES)
        check_range(self.max_questions, "limits.max_questions", lo=1)
        check_range(self.max_question_chars, "limits.max_question_chars", lo=1)
        check_range(self.max_new_tokens, "limits.max_new_tokens", lo=1)
        check_range(self.max_messages, "limits.max_messages", lo=1)


@dataclass
class GenerationDefaults:
    """Generation options used when a request does not set them."""

    max_new_tokens: int = 64
    """New tokens per answer (requests may ask for up to ``limits.max_new_tokens``)."""
    do_sample: bool = False
    """Greedy decoding by default: the same question gets the same answer."""
    temperature: float = 1.0
    """Softmax temperature when sampling (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass when sampling, in (0, 1]."""

    def __post_init__(self) -> None:
        check_range(self.max_new_tokens, "generation.max_new_tokens", lo=1)
        check_range(self.temperature, "generation.temperature", lo=0, lo_inclusive=False)
        check_range(self.top_p, "generation.top_p", lo=0, hi=1, lo_inclusive=False)


@dataclass
class ServeConfig:
    """One SEPIT HTTP application on Ray Serve."""

    model_dir: str = ""
    """Exported model folder (``SepitForConditionalGeneration.save_pretrained``); required."""
    model_name: Optional[str] = None
    """Model id reported by ``/v1/models`` and accepted in ``model``; default: the folder name."""
    app_name: str = "sepit"
    """Ray Serve application name."""
    route_prefix: str = "/"
    """URL prefix of the application on the proxy (``/`` serves ``/v1/answer`` at the root)."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds; loopback unless you mean to expose the endpoint."""
    port: int = 8000
    """HTTP port of the proxy."""
    replicas: int = 1
    """Fixed number of model replicas (ignored when ``autoscaling`` is set)."""
    autoscaling: Optional[AutoscalingConfig] = None
    """Autoscale model replicas between bounds instead of a fixed count."""
    num_gpus_per_replica: float = 0.0
    """0 runs replicas on CPU; 1 gives each replica one GPU (the model moves to ``cuda``)."""
    num_cpus_per_replica: float = 1.0
    """Logical CPUs reserved per model replica."""
    max_ongoing_requests: int = 64
    """Requests a model replica holds at once (queued for a batch or generating)."""
    max_batch_size: int = 8
    """Most rows decoding together in a replica's continuous-batching loop (more requests queue)."""
    batch_wait_timeout_s: float = 0.01
    """Longest an idle replica waits for more arrivals before its first prefill; a busy replica
    admits new rows between decode steps without waiting."""
    request_timeout_s: float = 60.0
    """Deadline of one request (queueing + generation); past it the client gets 504."""
    api_key: Optional[str] = None
    """Bearer token required on ``/v1/*`` when set; prefer ``api_key_env`` over putting it here."""
    api_key_env: str = "SEPIT_API_KEY"
    """Environment variable read for the API key when ``api_key`` is unset (empty = no auth)."""
    warmup_question: str = "What is the function of <protein>?"
    """Question of the real generation each replica runs before it reports ready."""
    warmup_sequence: str = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
    """Protein of the warm-up generation."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Per-request limits."""
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    """Generation defaults."""

    def __post_init__(self) -> None:
        check_range(self.port, "port", lo=1, hi=65535)
        check_range(self.replicas, "replicas", lo=1)
        check_choice(self.num_gpus_per_replica, "num_gpus_per_replica", (0, 0.0, 1, 1.0))
        check_range(self.num_cpus_per_replica, "num_cpus_per_replica", lo=0)
        check_range(self.max_ongoing_requests, "max_ongoing_requests", lo=1)
        check_range(self.max_batch_size, "max_batch_size", lo=1)
        check_range(self.batch_wait_timeout_s, "batch_wait_timeout_s", lo=0)
        check_range(self.request_timeout_s, "request_timeout_s", lo=0, lo_inclusive=False)
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix={self.route_prefix!r} must start with '/'")
        if not self.app_name:
            raise ConfigError("app_name must not be empty")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(
                f"max_ongoing_requests={self.max_ongoing_requests} is below max_batch_size="
                f"{self.max_batch_size}: a replica could never fill a batch"
            )
        if self.generation.max_new_tokens > self.limits.max_new_tokens:
            raise ConfigError(
                f"generation.max_new_tokens={self.generation.max_new_tokens} exceeds "
                f"limits.max_new_tokens={self.limits.max_new_tokens}"
            )

    @property
    def served_model_name(self) -> str:
        from pathlib import Path

        return self.model_name or Path(self.model_dir.rstrip("/")).name or "sepit"

    def with_user_config(self, user_config: Optional[dict]) -> "ServeConfig":
        """This config with Serve's ``user_config`` applied on top (``USER_CONFIG_FIELDS`` only).

        ``user_config`` is declarative: it is applied to the application's own ``args`` each time,
        so a key removed from it falls back to the ``args`` value.  ``generation`` merges field
        by field.  The result is validated like any ServeConfig (e.g. ``max_batch_size`` at most
        ``max_ongoing_requests``, ``generation.max_new_tokens`` within ``limits``)."""
        if not user_config:
            return self
        if not isinstance(user_config, dict):
            raise ConfigError(f"user_config must be a mapping of {list(USER_CONFIG_FIELDS)}, got {type(user_config).__name__}")
        other = sorted(set(user_config) - set(USER_CONFIG_FIELDS))
        if other:
            raise ConfigError(
                f"user_config: field(s) {other} cannot change on a running deployment; user_config takes "
                f"{list(USER_CONFIG_FIELDS)} (set the others in the application's args, which redeploys)"
            )
        try:
            return from_dict(ServeConfig, merge(to_dict(self), user_config))
        except ConfigError as exc:
            raise ConfigError(f"user_config: {exc}") from None

    def require_model_dir(self) -> "ServeConfig":
        """Check that ``model_dir`` names an existing folder; return self."""
        from pathlib import Path

        if not self.model_dir:
            raise ConfigError("model_dir is required: the exported model folder to serve (--model DIR)")
        from sepit.storage import is_remote

        from sepit.tracking.models import is_model_uri

        if not is_remote(self.model_dir) and not is_model_uri(self.model_dir) and not Path(self.model_dir).is_dir():
            raise ConfigError(f"model_dir={self.model_dir!r} is not a folder")
        return self
