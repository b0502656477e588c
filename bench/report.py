"""The final table and `bench/results/latest.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from bench.memory import GOAL_MAX_RATIO as MEMORY_GOAL
from bench.memory import MemoryResult
from bench.scaling import Pair
from bench.throughput import Comparison

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def _side(summary: dict[str, float]) -> str:
    return (
        f"{summary['rps']:>7,.0f} req/s  p50 {summary['p50_ms']:5.2f} ms  "
        f"p99 {summary['p99_ms']:6.2f} ms"
    )


def throughput_line(c: Comparison) -> str:
    ratios = c.round_ratios
    errors = c.summary(c.ours)["errors"] + c.summary(c.bare)["errors"]
    line = (
        f"{c.name:<16} ours {_side(c.summary(c.ours))} | bare {_side(c.summary(c.bare))} | "
        f"ratio {c.ratio:.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}; "
        f"goal >= {c.goal}x: {_verdict(c.ratio >= c.goal)})"
    )
    if errors:
        line += f"  [{errors:.0f} ERRORS]"
    return line


def scaling_line(p: Pair) -> str:
    goal = "" if p.goal is None else f" (goal <= {p.goal}x: {_verdict(p.ratio <= p.goal)})"
    big = p.big_label.removeprefix("at_")
    small = p.small_label.removeprefix("at_")
    return (
        f"{p.name:<29} p50 {big} {p.big_p50:5.2f} ms vs {small} {p.small_p50:5.2f} ms | "
        f"ratio {p.ratio:.2f}x{goal}"
    )


def memory_line(m: MemoryResult) -> str:
    other = ""
    if m.other_key_names:
        names = ", ".join(m.other_key_names)
        other = f" + {m.per_message_other_keys:,.0f} B in other keys ({names})"
    return (
        f"{'Redis memory per message':<29} {m.per_message:,.0f} B in c/m/i{other}; "
        f"used_memory delta {m.per_message_used_memory:,.0f} B | JSON {m.json_mean_bytes:,.0f} B "
        f"| ratio {m.ratio:.2f}x (goal <= {MEMORY_GOAL}x: {_verdict(m.ratio <= MEMORY_GOAL)})"
    )


def table(
    comparisons: list[Comparison], pairs: list[Pair], memory: MemoryResult, notes: list[str]
) -> str:
    lines = [
        "",
        "=" * 100,
        "Throughput, one uvicorn worker (medians of alternating wrk rounds; latency under 32 "
        "connections):",
        *(throughput_line(c) for c in comparisons),
        "",
        "Latency at 100,000 messages vs at 10 (p50 of sequential keep-alive requests; pages sized "
        "so that both return the same number of messages):",
        *(scaling_line(p) for p in pairs),
        "",
        "Memory (10,000 messages of 200 characters):",
        memory_line(memory),
    ]
    if notes:
        lines += ["", "Notes:", *(f"- {n}" for n in notes)]
    lines += ["=" * 100, f"figures written to {RESULTS}"]
    return "\n".join(lines)


def _rounded(value: Any) -> Any:
    """Floats to 4 decimals (0.1 us, 0.01 %): the figures are not more precise than that."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def write_json(data: dict[str, Any]) -> Path:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_bytes(orjson.dumps(_rounded(data), option=orjson.OPT_INDENT_2) + b"\n")
    return RESULTS
