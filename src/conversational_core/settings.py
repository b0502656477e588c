"""Every setting of the service, read once from the environment (and an optional `.env`).

Names are the ones of the HTTP contract (`shared/API.md`, Configuration) so that operators and
tests can rely on them. An invalid value stops start-up with a message naming the variable
(see :func:`load_settings`).
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

# Used when JWT_SECRET is unset in development so that `run.py token` works out of the box.
# ENVIRONMENT=production refuses it (and any secret shorter than 32 bytes).
DEV_JWT_SECRET = "conversational-core-development-secret-do-not-use-in-production"

_LOOPBACK = ("localhost", "127.0.0.1", "::1")  # (a sidecar: no network path to tamper with)
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+\s*)?(second|minute|hour|day)s?\s*$", re.IGNORECASE)


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class ConfigError(ValueError):
    """Raised with an operator-readable message when the configuration is invalid."""


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            import orjson

            return orjson.loads(value)
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # Server (the seed's names).
    HOST: str = "127.0.0.1"
    PORT: int = Field(8000, ge=1, le=65535)
    RELOAD: bool = False
    WORKERS: int = Field(1, ge=1, le=64)
    ENVIRONMENT: Environment = Environment.DEVELOPMENT
    DEBUG: bool = False
    LOG_LEVEL: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # Message text in logs (at DEBUG): off unless switched on explicitly.
    LOG_CONTENT: bool = False
    # The seed's defaults: a local web app may call, and only local names reach the API.
    CORS_ORIGINS: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://localhost:3000"]
    )
    CORS_ALLOW_CREDENTIALS: bool = False
    ALLOWED_HOSTS: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1"]
    )
    SENTRY_DSN: str | None = None
    # /docs and /openapi.json: on in development, off in production unless switched on.
    DOCS_ENABLED: bool | None = None
    SENTRY_TRACES_SAMPLE_RATE: float = Field(0.0, ge=0, le=1)
    # Budget of requests that fail authentication, per client address ("off" disables it).
    ANONYMOUS_RATE_LIMIT: str = "60/minute"
    # The worker's own /metrics port (`run.py worker`; 0: none). The API serves /metrics itself.
    WORKER_METRICS_PORT: int = Field(9101, ge=0, le=65535)
    # On SIGTERM a worker lets running replies finish for this long, then hands the rest back.
    WORKER_SHUTDOWN_GRACE_SECONDS: float = Field(10.0, ge=0, le=600)

    # Storage.
    REDIS_URL: str | None = None
    REDIS_KEY_PREFIX: str = Field("cc", pattern=r"^[A-Za-z0-9_.:-]{1,32}$")
    REDIS_SOCKET_TIMEOUT: float = Field(2.0, gt=0, le=60)
    REDIS_CONNECT_TIMEOUT: float = Field(1.0, gt=0, le=60)
    REDIS_MAX_CONNECTIONS: int = Field(128, ge=1, le=10_000)
    # REDIS_URL names one node of a Redis Cluster; the client discovers the others.
    REDIS_CLUSTER: bool = False
    # Pages of messages kept in each process to be served again while their conversation is
    # unchanged (storage/redis/pages.py); 0 keeps none.
    PAGE_CACHE_MB: int = Field(64, ge=0, le=65_536)
    DATA_DIR: Path = Path("data")

    # Auth.
    JWT_SECRET: str | None = None
    JWT_PUBLIC_KEY: str | None = None
    JWT_JWKS_URL: str | None = None
    JWT_ALGORITHMS: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["HS256"])
    JWT_AUDIENCE: str | None = None
    JWT_ISSUER: str | None = None
    JWT_LEEWAY_SECONDS: int = Field(30, ge=0, le=600)
    JWT_JWKS_CACHE_SECONDS: int = Field(300, ge=10, le=86_400)

    # The HTTP server's guard against hostile or broken clients (serving.py).
    MAX_REQUEST_HEADER_BYTES: int = Field(32_768, ge=1_024, le=1_048_576)
    REQUEST_HEADERS_TIMEOUT_SECONDS: float = Field(10.0, gt=0, le=600)
    REQUEST_BODY_MIN_RATE: int = Field(1_024, ge=0, le=1_000_000_000)  # bytes/s; 0: none
    REQUEST_BODY_GRACE_SECONDS: float = Field(5.0, ge=0, le=600)
    KEEPALIVE_TIMEOUT_SECONDS: float = Field(5.0, gt=0, le=3_600)
    MAX_CONNECTIONS: int = Field(16_384, ge=1, le=1_000_000)

    # Limits (every request body, field and page has a bound).
    MAX_BODY_BYTES: int = Field(1_048_576, ge=1_024, le=64 * 1_048_576)
    MAX_MESSAGE_CHARS: int = Field(100_000, ge=1, le=10_000_000)
    MAX_SYSTEM_PROMPT_CHARS: int = Field(32_000, ge=1, le=1_000_000)
    IDEMPOTENCY_TTL_SECONDS: int = Field(86_400, ge=60, le=30 * 86_400)

    # AI replies.
    LLM_PROVIDER: Literal["openai", "anthropic", "dev"] | None = None
    LLM_BASE_URL: str | None = None
    LLM_API_KEY: str | None = None
    LLM_MODEL: str | None = None
    # The name of the output limit in OpenAI-protocol requests (replies/providers/openai.py).
    LLM_MAX_TOKENS_PARAM: Literal["auto", "max_tokens", "max_completion_tokens"] = "auto"
    # Anthropic's extended thinking: the tokens the model may think for (0: off; at least 1024).
    LLM_REASONING_BUDGET_TOKENS: int = Field(0, ge=0, le=1_000_000)
    LLM_TIMEOUT_SECONDS: float = Field(60.0, gt=0, le=3600)
    # The longest a reply may stream (a stream that trickles forever would hold its
    # conversation: LLM_TIMEOUT_SECONDS bounds only a silence). replies/generation.py.
    LLM_REPLY_MAX_SECONDS: float = Field(900.0, gt=0, le=86_400)
    LLM_MAX_RETRIES: int = Field(3, ge=0, le=10)
    LLM_RETRY_BASE_SECONDS: float = Field(0.5, ge=0, le=60)
    LLM_RETRY_MAX_SECONDS: float = Field(30.0, ge=0, le=600)
    # Prompt budget: the context window of a model (per-model overrides as a JSON object).
    LLM_CONTEXT_TOKENS: int = Field(8192, ge=256, le=10_000_000)
    LLM_MODEL_CONTEXT_TOKENS: dict[str, int] = Field(default_factory=dict)
    LLM_MAX_OUTPUT_TOKENS: int = Field(1024, ge=1, le=1_000_000)
    LLM_HISTORY_MESSAGES: int = Field(200, ge=1, le=10_000)
    DEV_PROVIDER_DELAY_MS: int = Field(30, ge=0, le=10_000)
    # A conversation created without a title gets one after its first reply (written by the
    # model: one short completion).
    AUTO_TITLE: bool = True

    # Typed parts and client-side tools.
    TOOL_RESULT_TIMEOUT_SECONDS: int = Field(600, ge=1, le=7 * 86_400)
    MAX_TOOL_ROUNDS: int = Field(10, ge=1, le=1000)
    MAX_PARTS: int = Field(64, ge=1, le=10_000)
    MAX_TOOLS: int = Field(64, ge=1, le=1000)
    MAX_TOOL_SCHEMA_BYTES: int = Field(16_384, ge=64, le=1_048_576)
    MAX_INLINE_FILE_BYTES: int = Field(16_384, ge=0, le=10_485_760)

    # Workers and the job queue.
    WORKER_IN_API: bool = True
    # Streams are I/O-bound: a worker writes many at once, and admits no more while its event
    # loop falls behind by WORKER_MAX_LAG_MS (the jobs wait in the queue, in order).
    WORKER_CONCURRENCY: int = Field(256, ge=1, le=10_000)
    WORKER_MAX_LAG_MS: int = Field(20, ge=1, le=10_000)
    JOB_LEASE_SECONDS: float = Field(15.0, ge=0.5, le=3600)
    JOB_MAX_TRIES: int = Field(3, ge=1, le=100)
    # While a worker writes more than one reply, the tokens a reply gets within this window go
    # out as one delta (one stream entry, one SSE event); 0: a delta per token read.
    DELTA_BATCH_MS: int = Field(25, ge=0, le=100)

    # Events (SSE).
    EVENTS_MAX_LEN: int = Field(10_000, ge=10, le=10_000_000)
    EVENTS_TTL_SECONDS: int = Field(86_400, ge=60, le=30 * 86_400)
    SSE_KEEPALIVE_SECONDS: float = Field(15.0, gt=0, le=300)
    SSE_MAX_CONNECTION_SECONDS: float = Field(3600.0, gt=0, le=86_400)
    SSE_CLIENT_BUFFER: int = Field(1000, ge=10, le=1_000_000)
    SSE_RETRY_MS: int = Field(2000, ge=0, le=600_000)
    # Event streams one user may hold open on one API process at once (then 429).
    SSE_MAX_STREAMS_PER_USER: int = Field(100, ge=1, le=100_000)

    # Rate limits ("600/minute" or "off").
    RATE_LIMIT: str = "600/minute"
    AI_RATE_LIMIT: str = "60/minute"

    @field_validator("CORS_ORIGINS", "ALLOWED_HOSTS", "JWT_ALGORITHMS", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("JWT_ALGORITHMS")
    @classmethod
    def _algorithms(cls, value: list[str]) -> list[str]:
        allowed = {"HS256", "RS256", "ES256"}
        bad = [alg for alg in value if alg not in allowed]
        if bad or not value:
            raise ValueError(f"must be a non-empty list of {sorted(allowed)}, got {value}")
        return value

    @field_validator("RATE_LIMIT", "AI_RATE_LIMIT", "ANONYMOUS_RATE_LIMIT")
    @classmethod
    def _rate(cls, value: str) -> str:
        if value.strip().lower() == "off":
            return value.strip()
        match = _RATE_RE.match(value)
        if not match:
            raise ValueError("must look like '600/minute' (second|minute|hour|day) or 'off'")
        if any(n is not None and int(n) == 0 for n in match.groups()[:2]):
            raise ValueError("must allow at least 1 request in a window of at least 1 unit")
        return value.strip()

    @field_validator("DATA_DIR", mode="before")
    @classmethod
    def _data_dir(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must name a directory (unset: ./data)")
        return value

    @field_validator("LLM_REASONING_BUDGET_TOKENS")
    @classmethod
    def _reasoning_budget(cls, value: int) -> int:
        if 0 < value < 1024:
            raise ValueError("must be 0 (off) or at least 1024 (Anthropic's least budget)")
        return value

    @field_validator("LLM_MODEL_CONTEXT_TOKENS")
    @classmethod
    def _model_contexts(cls, value: dict[str, int]) -> dict[str, int]:
        small = sorted(model for model, tokens in value.items() if tokens < 256)
        if small:
            raise ValueError(f"context windows must be at least 256 tokens: {small}")
        return value

    @field_validator("JWT_JWKS_URL", "LLM_BASE_URL")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("JWT_PUBLIC_KEY")
    @classmethod
    def _public_key(cls, value: str | None) -> str | None:
        if value is not None:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            try:
                load_pem_public_key(value.encode())
            except ValueError:
                raise ValueError("is not a PEM public key (-----BEGIN PUBLIC KEY-----…)") from None
        return value

    @field_validator("SENTRY_DSN")
    @classmethod
    def _sentry_dsn(cls, value: str | None) -> str | None:
        if value is not None:
            from sentry_sdk.utils import BadDsn, Dsn

            try:
                Dsn(value)
            except BadDsn:
                raise ValueError("is not a Sentry DSN (https://<key>@<host>/<project>)") from None
        return value

    @field_validator(
        "REDIS_URL",
        "SENTRY_DSN",
        "JWT_SECRET",
        "JWT_PUBLIC_KEY",
        "JWT_JWKS_URL",
        "JWT_AUDIENCE",
        "JWT_ISSUER",
        "LLM_BASE_URL",
        "LLM_API_KEY",
        "LLM_MODEL",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("REDIS_URL")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        from redis.connection import parse_url

        try:
            parse_url(value)  # type: ignore[no-untyped-call]  # (how the client reads it)
            database = urlsplit(value).path.strip("/")
            if value.startswith("redis") and database and not database.isdigit():
                raise ValueError(database)
        except ValueError:
            raise ValueError(
                "is not a Redis URL (redis://[:password@]host[:port][/database])"
            ) from None
        return value

    @model_validator(mode="after")
    def _consistency(self) -> Settings:
        hs = "HS256" in self.JWT_ALGORITHMS
        asym = any(alg != "HS256" for alg in self.JWT_ALGORITHMS)
        if asym and not (self.JWT_PUBLIC_KEY or self.JWT_JWKS_URL):
            raise ConfigError(
                "JWT_ALGORITHMS includes RS256/ES256 but neither JWT_PUBLIC_KEY nor JWT_JWKS_URL "
                "is set"
            )
        if self.LLM_PROVIDER in ("openai", "anthropic") and not self.LLM_MODEL:
            raise ConfigError(f"LLM_MODEL is required with LLM_PROVIDER={self.LLM_PROVIDER}")
        if self.LLM_PROVIDER == "anthropic" and not self.LLM_API_KEY:
            raise ConfigError("LLM_API_KEY is required with LLM_PROVIDER=anthropic")
        if self.LLM_PROVIDER == "openai" and not (self.LLM_API_KEY or self.LLM_BASE_URL):
            raise ConfigError(
                "LLM_API_KEY is required with LLM_PROVIDER=openai (or set LLM_BASE_URL for a "
                "local OpenAI-compatible server)"
            )
        if self.EVENTS_MAX_LEN < self.SSE_CLIENT_BUFFER:
            # A client dropped for falling SSE_CLIENT_BUFFER events behind resumes from there:
            # with fewer retained, it could never resume, only resync.
            raise ConfigError(
                f"EVENTS_MAX_LEN ({self.EVENTS_MAX_LEN}) must be at least SSE_CLIENT_BUFFER "
                f"({self.SSE_CLIENT_BUFFER}): a client dropped for falling that far behind "
                "resumes from the events retained"
            )
        if self.REDIS_URL is None and self.REDIS_CLUSTER:
            raise ConfigError("REDIS_CLUSTER=true needs REDIS_URL (any one node of the cluster)")
        if self.REDIS_URL is None and self.WORKERS > 1:
            raise ConfigError(
                "WORKERS: more than one process needs REDIS_URL (the embedded store's events "
                "and job queue live in one process)"
            )
        if self.ENVIRONMENT is Environment.PRODUCTION:
            if hs and (
                self.JWT_SECRET is None
                or self.JWT_SECRET == DEV_JWT_SECRET
                or len(self.JWT_SECRET.encode()) < 32
            ):
                raise ConfigError(
                    "JWT_SECRET: ENVIRONMENT=production refuses the development signing key; "
                    "set JWT_SECRET to a random secret of at least 32 bytes (or drop HS256 from "
                    "JWT_ALGORITHMS)"
                )
            jwks = urlsplit(self.JWT_JWKS_URL) if self.JWT_JWKS_URL else None
            if jwks is not None and jwks.scheme != "https" and jwks.hostname not in _LOOPBACK:
                raise ConfigError(
                    "JWT_JWKS_URL: ENVIRONMENT=production needs https:// (over plain http, "
                    "anyone on the path could serve keys and sign tokens for any user)"
                )
            if self.CORS_ALLOW_CREDENTIALS and "*" in self.CORS_ORIGINS:
                raise ConfigError(
                    "CORS_ORIGINS: ENVIRONMENT=production refuses a wildcard origin together "
                    "with CORS_ALLOW_CREDENTIALS=true; list the allowed origins"
                )
        return self

    @property
    def jwt_secret(self) -> str:
        """The HS256 key in force: the configured one, or the development key."""
        return self.JWT_SECRET or DEV_JWT_SECRET

    @property
    def llm_model(self) -> str:
        """The default model: LLM_MODEL, or "dev" for the development provider."""
        return self.LLM_MODEL or "dev"

    def context_tokens(self, model: str) -> int:
        return self.LLM_MODEL_CONTEXT_TOKENS.get(model, self.LLM_CONTEXT_TOKENS)

    @property
    def is_production(self) -> bool:
        return self.ENVIRONMENT is Environment.PRODUCTION

    @property
    def docs_enabled(self) -> bool:
        return self.DOCS_ENABLED if self.DOCS_ENABLED is not None else not self.is_production


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning validation errors into one message that names each variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except SettingsError as exc:  # a value pydantic-settings parses as JSON and could not
        found = re.search(r'field "(\w+)"', str(exc))
        name = found.group(1).upper() if found else "configuration"
        raise ConfigError(f"invalid configuration: {name}: is not valid JSON") from None
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]) or "configuration"
            message = error["msg"]
            if isinstance(error.get("ctx", {}).get("error"), ConfigError):
                problems.append(str(error["ctx"]["error"]))
            else:
                problems.append(f"{name.upper()}: {message}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
