"""Configuration: invalid values stop start-up with a message naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conversational_core.settings import DEV_JWT_SECRET, ConfigError
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": 70000}, "PORT"),
        ({"WORKERS": 0}, "WORKERS"),
        ({"REDIS_URL": "http://localhost"}, "REDIS_URL"),
        ({"RATE_LIMIT": "lots"}, "RATE_LIMIT"),
        ({"AI_RATE_LIMIT": "5 per minute"}, "AI_RATE_LIMIT"),
        ({"JWT_ALGORITHMS": "none"}, "JWT_ALGORITHMS"),
        ({"JWT_ALGORITHMS": "RS256"}, "JWT_PUBLIC_KEY"),
        ({"LLM_PROVIDER": "magic"}, "LLM_PROVIDER"),
        ({"ENVIRONMENT": "staging-ish"}, "ENVIRONMENT"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"REDIS_CLUSTER": True}, "REDIS_CLUSTER"),
        ({"ANONYMOUS_RATE_LIMIT": "some"}, "ANONYMOUS_RATE_LIMIT"),
        ({"CORS_ALLOW_CREDENTIALS": "maybe"}, "CORS_ALLOW_CREDENTIALS"),
        ({"SENTRY_TRACES_SAMPLE_RATE": 2}, "SENTRY_TRACES_SAMPLE_RATE"),
        ({"RATE_LIMIT": "0/minute"}, "RATE_LIMIT"),
        ({"AI_RATE_LIMIT": "10/0 minutes"}, "AI_RATE_LIMIT"),
        ({"DATA_DIR": " "}, "DATA_DIR"),
        ({"LLM_REASONING_BUDGET_TOKENS": 5}, "LLM_REASONING_BUDGET_TOKENS"),
        ({"LLM_MODEL_CONTEXT_TOKENS": {"m": -1}}, "LLM_MODEL_CONTEXT_TOKENS"),
        ({"SENTRY_DSN": "not a dsn"}, "SENTRY_DSN"),
        ({"REDIS_URL": "redis://localhost:port/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://localhost:6379/zero"}, "REDIS_URL"),
        ({"JWT_JWKS_URL": "keys.example.com/jwks.json"}, "JWT_JWKS_URL"),
        ({"LLM_BASE_URL": "localhost:11434/v1"}, "LLM_BASE_URL"),
        ({"JWT_PUBLIC_KEY": "not a key", "JWT_ALGORITHMS": "RS256"}, "JWT_PUBLIC_KEY"),
        ({"EVENTS_MAX_LEN": 500, "SSE_CLIENT_BUFFER": 1000}, "EVENTS_MAX_LEN"),
    ],
)
def test_invalid_values_name_the_variable(overrides: dict[str, object], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        make_settings(**overrides)


def test_production_refuses_a_jwks_url_over_plain_http() -> None:
    strong = {"ENVIRONMENT": "production", "JWT_SECRET": "s" * 40, "JWT_ALGORITHMS": "RS256"}
    with pytest.raises(ConfigError, match="JWT_JWKS_URL"):
        make_settings(**strong, JWT_JWKS_URL="http://idp.example.com/jwks.json")
    make_settings(**strong, JWT_JWKS_URL="https://idp.example.com/jwks.json")
    make_settings(**strong, JWT_JWKS_URL="http://127.0.0.1:8080/jwks.json")  # a sidecar


def test_production_refuses_development_key_and_wildcard_credentials() -> None:
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        make_settings(ENVIRONMENT="production")
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        make_settings(ENVIRONMENT="production", JWT_SECRET=DEV_JWT_SECRET)
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        make_settings(ENVIRONMENT="production", JWT_SECRET="short")
    with pytest.raises(ConfigError, match="CORS_ORIGINS"):
        make_settings(
            ENVIRONMENT="production",
            JWT_SECRET="k" * 40,
            CORS_ORIGINS="*",
            CORS_ALLOW_CREDENTIALS=True,
        )
    ok = make_settings(
        ENVIRONMENT="production",
        JWT_SECRET="k" * 40,
        CORS_ORIGINS="https://a.example,https://b.example",
    )
    assert ok.CORS_ORIGINS == ["https://a.example", "https://b.example"]


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PORT": "not-a-port"}, "PORT"),
        ({"LLM_MODEL_CONTEXT_TOKENS": "{not json"}, "LLM_MODEL_CONTEXT_TOKENS"),
        ({"HOST": "no-such-host.invalid"}, "HOST=no-such-host.invalid"),
    ],
)
def test_run_py_refuses_to_start_with_a_readable_message(
    env: dict[str, str], variable: str
) -> None:
    env = {**os.environ, **env, "REDIS_URL": ""}
    result = subprocess.run(
        [sys.executable, "run.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert variable in result.stderr
    assert "Traceback" not in result.stderr


def test_the_embedded_store_serves_one_process_and_says_what_it_cannot_use(
    tmp_path: Path,
) -> None:
    """A second process on a data directory in use would write replies the first one's
    clients never hear of (the embedded store's events live in its process): refused at
    start, in one line, as are a data directory that is a file and WORKER_IN_API=false (no
    process could write the replies)."""
    from conversational_core.storage.embedded.lock import DataDirInUse, data_dir_lock

    def start(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "run.py"],
            cwd=ROOT,
            env={**os.environ, "REDIS_URL": "", "PORT": "1", **env},
            capture_output=True,
            text=True,
            timeout=30,
        )

    busy = tmp_path / "busy"
    with data_dir_lock(busy):
        with pytest.raises(DataDirInUse), data_dir_lock(busy):
            pass  # (another holder, even in this process)
        refused = start(DATA_DIR=str(busy))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"DATA_DIR {busy} is in use by another process (process {os.getpid()})" in (
        refused.stderr
    )
    (tmp_path / "file").write_text("")
    refused = start(DATA_DIR=str(tmp_path / "file"))
    assert refused.returncode == 2 and "not a directory" in refused.stderr
    refused = start(DATA_DIR=str(tmp_path / "ok"), WORKER_IN_API="false")
    assert refused.returncode == 2 and "WORKER_IN_API=false needs REDIS_URL" in refused.stderr
