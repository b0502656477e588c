"""The deployment files agree with the service: metric names, non-root image, compose services.

Read as text (no Docker engine, no YAML parser needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from conversational_core.observability import metrics

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "conversational-core.json"

# Every metric the service exports (histograms by their base name, counters without _total).
METRIC_NAMES = metrics.METRIC_NAMES

_METRIC_RE = re.compile(r"conversational_core_[a-z_]+")
_HISTOGRAM_SUFFIX_RE = re.compile(r"_(bucket|sum|count)$")


def _base_name(name: str) -> str:
    """A series name without its histogram suffix or counter `_total`: prometheus_client's
    `metric._name` drops `_total`, so either spelling of the names above compares equal."""
    return _HISTOGRAM_SUFFIX_RE.sub("", name).removesuffix("_total")


EXPECTED = {_base_name(name) for name in METRIC_NAMES}


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    found = []
    for panel in panels:
        found.append(panel)
        nested = panel.get("panels")
        if isinstance(nested, list):
            found.extend(_panels(nested))
    return found


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _dashboard_queries() -> list[str]:
    dashboard = _dashboard()
    queries = [
        target["expr"]
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            queries.append(query if isinstance(query, str) else query.get("query", ""))
    return queries


def _dashboard_metrics() -> set[str]:
    return {
        _base_name(name) for query in _dashboard_queries() for name in _METRIC_RE.findall(query)
    }


def _final_stage(dockerfile: str) -> list[str]:
    """The instructions of the last stage, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    lines = [line.strip() for line in joined.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    return lines[last_from:]


def _compose_services(compose: str) -> set[str]:
    """The keys directly under the top-level `services:` (two-space indentation)."""
    services: set[str] = set()
    inside = False
    for line in compose.splitlines():
        if re.match(r"^\S", line):
            inside = line.rstrip() == "services:"
        elif inside and (match := re.match(r"^  ([A-Za-z0-9_.-]+):\s*$", line)):
            services.add(match.group(1))
    return services


def test_dashboard_uses_only_known_metrics() -> None:
    used = _dashboard_metrics()
    assert used, "the dashboard queries no conversational_core_ metric"
    assert used <= EXPECTED, f"unknown metrics: {sorted(used - EXPECTED)}"


def test_dashboard_shows_every_metric() -> None:
    missing = EXPECTED - _dashboard_metrics()
    assert not missing, f"metrics without a panel: {sorted(missing)}"


def test_dashboard_quantiles_are_taken_over_buckets() -> None:
    quantiles = [query for query in _dashboard_queries() if "histogram_quantile" in query]
    assert quantiles
    for query in quantiles:
        assert re.search(r"_seconds_bucket\b", query), query
        assert re.search(r"by \([^)]*\ble\b", query), query


def test_dashboard_panels_use_the_datasource_variable() -> None:
    dashboard = _dashboard()
    variables = dashboard["templating"]["list"]
    assert {"name": "DS_PROMETHEUS", "type": "datasource"}.items() <= variables[0].items()
    panels = _panels(dashboard["panels"])
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    rows = [panel["title"] for panel in panels if panel["type"] == "row"]
    assert rows == [
        "Traffic",
        "Latency",
        "AI replies",
        "Queue & streaming",
        "Errors",
        "Page copies",
    ]


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    stage = _final_stage(DOCKERFILE.read_text())
    users = [line.split(None, 1)[1] for line in stage if line.upper().startswith("USER ")]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user

    healthchecks = [line for line in stage if line.upper().startswith("HEALTHCHECK ")]
    assert len(healthchecks) == 1
    assert "/health/live" in healthchecks[0]
    # The check is exec form: a JSON array whose python -c code must at least compile.
    command = json.loads(healthchecks[0].split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "HEALTHCHECK", "exec")

    assert 'CMD ["python", "run.py"]' in stage
    assert "EXPOSE 8000" in stage


def test_dockerignore_keeps_what_the_image_needs() -> None:
    ignored = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "data", ".env", "tests"} <= ignored
    assert not ignored & {"src", "run.py", "requirements.txt", "pyproject.toml", "*", "**"}


def test_compose_runs_api_worker_and_persistent_redis() -> None:
    compose = COMPOSE.read_text()
    assert {"redis", "api", "worker"} <= _compose_services(compose)
    assert '"--appendonly", "yes"' in compose
    assert 'command: ["python", "run.py", "worker"]' in compose
    assert "WORKER_IN_API" in compose
    assert "${JWT_SECRET:?" in compose


@pytest.mark.parametrize("mounted", ["./deploy/prometheus.yml", "./deploy/grafana"])
def test_compose_mounts_existing_monitoring_files(mounted: str) -> None:
    assert mounted in COMPOSE.read_text()
    assert (ROOT / mounted).exists()


def test_prometheus_scrapes_the_api() -> None:
    config = PROMETHEUS.read_text()
    assert '"api:8000"' in config
    assert "metrics_path: /metrics" in config
