"""Black-box: the README's run command serves the API with no Redis, and with Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import REDIS_URL
from tests.fixtures.server import ROOT, run_service


def _token(env: dict[str, str], sub: str) -> str:
    result = subprocess.run(
        [sys.executable, "run.py", "token", "--sub", sub],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


def _conversation_flow(base: str, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=10) as http:
        assert http.get("/health").json()["status"] == "ok"
        conv = http.post("/conversations", json={"title": "from curl"})
        assert conv.status_code == 201
        cid = conv.json()["id"]
        msg = http.post(f"/conversations/{cid}/messages", json={"content": "hi", "respond": False})
        assert msg.status_code == 201
        page = http.get(f"/conversations/{cid}/messages").json()
        assert [m["content"] for m in page["items"]] == ["hi"]
        assert http.get("/openapi.json").json()["info"]["title"] == "Conversational Core"
        assert http.get("/docs").status_code == 200
        assert http.delete(f"/conversations/{cid}").status_code == 204


def test_serves_on_the_embedded_store(tmp_path: Path) -> None:
    env = {"REDIS_URL": "", "DATA_DIR": str(tmp_path / "data")}
    with run_service(env) as base:
        _conversation_flow(base, _token(env, "alice"))
        health = httpx.get(f"{base}/health").json()
        assert health["checks"]["store"]["backend"] == "sqlite"
    assert (tmp_path / "data").is_dir()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serves_on_redis(workers: str, prefix: str) -> None:
    env = {"REDIS_URL": REDIS_URL, "REDIS_KEY_PREFIX": prefix, "WORKERS": workers}
    with run_service(env) as base:
        _conversation_flow(base, _token(env, "alice"))
        assert httpx.get(f"{base}/health").json()["checks"]["store"]["backend"] == "redis"
