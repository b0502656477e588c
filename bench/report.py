"""The final table and `bench/results/latest.json`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from bench import fanout as fanout_bench
from bench import relay as relay_bench
from bench import trees as trees_bench
from bench import ttft as ttft_bench
from bench.memory import GOAL_MAX_RATIO as MEMORY_GOAL
from bench.memory import MemoryResult
from bench.scaling import Pair
from bench.throughput import Comparison
from bench.trees import TreeResult

if TYPE_CHECKING:
    from bench.run import Replies

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
    if c.cpu_ratio is not None:
        cpu = c.cpu_us
        redis = f" + Redis {cpu['ours_redis']:.0f}" if cpu["ours_redis"] is not None else ""
        line += (
            f"\n{'':<16} CPU per request: ours {cpu['ours']:.0f} us{redis} | bare "
            f"{cpu['bare']:.0f} us | bare/ours {c.cpu_ratio:.2f}x"
        )
    return line


def edges_line(comparisons: list[Comparison]) -> str | None:
    """What the production edges cost: ours in the production configuration over ours without
    the rate limit and access lines, same route, medians of the same alternating rounds."""
    by_name = {c.name: c for c in comparisons}
    pairs = [
        ("POST", "POST message", "POST, production"),
        ("GET", "GET page (50)", "GET, production"),
    ]
    parts = []
    for label, plain, production in pairs:
        if plain not in by_name or production not in by_name:
            return None
        ratio = (
            by_name[production].summary(by_name[production].ours)["rps"]
            / by_name[plain].summary(by_name[plain].ours)["rps"]
        )
        plain_cpu = by_name[plain].cpu_us["ours"]
        production_cpu = by_name[production].cpu_us["ours"]
        cpu = (
            f" (CPU per request {plain_cpu / production_cpu:.2f}x)"
            if plain_cpu and production_cpu
            else ""
        )
        parts.append(f"{label} {ratio:.2f}x{cpu}")
    return (
        "Production edges (rate limit + access line): ours with them over ours without, "
        + ", ".join(parts)
    )


def scaling_line(p: Pair) -> str:
    goal = "" if p.goal is None else f" (goal <= {p.goal}x: {_verdict(p.ratio <= p.goal)})"
    big = p.big_label.removeprefix("at_")
    small = p.small_label.removeprefix("at_")
    return (
        f"{p.name:<29} p50 {big} {p.big_p50:5.2f} ms vs {small} {p.small_p50:5.2f} ms | "
        f"ratio {p.ratio:.2f}x{goal}"
    )


def trees_lines(t: TreeResult) -> list[str]:
    small = trees_bench.SMALL
    switches = [
        f"{'PUT active_leaf_id, k=' + format(k, ','):<29} p50 {s.p50:7.2f} ms "
        f"({s.to_json()['us_per_message_changed']:.2f} us per message changed, "
        f"{len(s.ms)} samples)"
        for k, s in t.switches.items()
    ]
    small_k, big_k = t.switches[10], t.switches[10_000]
    marginal = (big_k.p50 - small_k.p50) * 1000 / (big_k.k - small_k.k)
    m = t.memory
    return [
        f"Trees: {trees_bench.TOTAL:,} messages in {t.leaves:,} branches (active branch "
        f"{t.active_branch_length} messages) vs conversations of {small} (p50, interleaved):",
        *(scaling_line(p) for p in t.pairs.values()),
        *switches,
        f"{'switch cost per message':<29} {marginal:.1f} us for each message more in the "
        f"switched part (k=10,000 vs k=10: the request's own cost is the k=10 figure)",
        f"{'Redis memory per message':<29} {m['bytes_per_message']:,.0f} B in c/m/i/b/t/f | "
        f"JSON {m['json_mean_bytes']:,.0f} B | ratio {m['ratio']:.2f}x",
    ]


def trees_table(t: TreeResult) -> str:
    return "\n".join(["", "=" * 100, *trees_lines(t), "=" * 100])


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


def ttft_lines(result: ttft_bench.TtftResult, label: str) -> list[str]:
    data = result.to_json()
    o = data["overhead"]
    k = data["overhead_kernel_timestamp"]
    share = data["client_share"]["kernel_to_thread"]
    split = data["breakdown_approx_1ms"]
    early, late = (
        data["post_to_provider_request_by_history"][q] for q in ("first_quarter", "last_quarter")
    )
    goal_50 = _verdict(o["p50_ms"] <= ttft_bench.GOAL_P50_MS)
    goal_99 = _verdict(o["p99_ms"] <= ttft_bench.GOAL_P99_MS)
    return [
        f"{label:<29} p50 {o['p50_ms']:5.2f} ms (goal <= {ttft_bench.GOAL_P50_MS:g} ms: "
        f"{goal_50}) | p99 {o['p99_ms']:5.2f} ms (goal <= {ttft_bench.GOAL_P99_MS:g} ms: "
        f"{goal_99}) | "
        f"max {o['max_ms']:.2f} ms",
        f"{'  at the socket (kernel time)':<29} p50 {k['p50_ms']:5.2f} ms | p99 "
        f"{k['p99_ms']:5.2f} ms | client's own share p50 {share['p50_ms']:.2f} ms, p99 "
        f"{share['p99_ms']:.2f} ms",
        f"{'  split at Redis XADD (+-1ms)':<29} provider -> XADD p50 "
        f"{split['provider_to_redis_xadd']['p50_ms']:.2f} ms, p99 "
        f"{split['provider_to_redis_xadd']['p99_ms']:.2f} ms | XADD -> client p50 "
        f"{split['redis_xadd_to_client_socket']['p50_ms']:.2f} ms, p99 "
        f"{split['redis_xadd_to_client_socket']['p99_ms']:.2f} ms",
        f"{'  before the provider':<29} POST -> provider request p50 "
        f"{data['post_to_provider_request']['p50_ms']:.1f} ms (prompt of "
        f"{early['history_messages'][0]}-{early['history_messages'][1]} messages: "
        f"{early['p50_ms']:.1f} ms; {late['history_messages'][0]}-{late['history_messages'][1]}: "
        f"{late['p50_ms']:.1f} ms) | POST -> first delta p50 "
        f"{data['post_to_first_delta']['p50_ms']:.1f} ms "
        f"(the fake model waits {ttft_bench.FIRST_DELAY_MS:g} ms)",
    ]


def _mb(kb: int) -> str:
    return f"{kb / 1024:.1f} MB"


def fanout_lines(fan: fanout_bench.FanoutResult, warnings: dict[str, dict[str, int]]) -> list[str]:
    data = fan.to_json()
    rss = fan.api_rss_kb
    per_client = (rss["clients_connected"] - rss["before_clients"]) / max(1, fan.connected)
    first = data["post_to_first_delta"] or {"p50_ms": 0.0, "p99_ms": 0.0}
    done = data["post_to_completed"] or {"p50_ms": 0.0, "p99_ms": 0.0}
    complete = f"{fan.completed:,} / {fan.clients:,}"
    verdict = _verdict(fan.completed == fan.clients)
    lines = [
        f"{'Clients complete':<29} {complete} (goal: all: {verdict}) "
        f"in {fan.total_seconds:.1f} s (first POST to last message.completed; {fan.clients:,} "
        f"POSTs took {fan.post_seconds:.1f} s) | {fan.restarted} replies restarted | stored "
        f"replies equal to the streamed text: {fan.verified_stored}/{fanout_bench.VERIFY_SAMPLE}",
        f"{'Reply latency under load':<29} POST -> first delta p50 {first['p50_ms']:,.0f} ms, p99 "
        f"{first['p99_ms']:,.0f} ms | POST -> completed p50 {done['p50_ms']:,.0f} ms, p99 "
        f"{done['p99_ms']:,.0f} ms | {fan.connected:,} clients connected in "
        f"{fan.connect_seconds:.1f} s",
        f"{'API RSS':<29} {_mb(rss['before_clients'])} before, {_mb(rss['clients_connected'])} "
        f"with the clients connected ({per_client:,.0f} kB a client; its Redis connections "
        f"meanwhile {fan.api_redis_connections.get('before_clients', 0)} -> "
        f"{fan.api_redis_connections.get('clients_connected', 0)}), peak "
        f"{_mb(rss['peak_sampled'])} (VmHWM {_mb(rss['vmhwm'])}), after they left "
        f"{_mb(rss['clients_gone'])}; a second round of {fan.clients:,}: "
        f"{_mb(rss['second_round_connected'])}, then {_mb(rss['second_round_gone'])}",
        f"{'Worker RSS':<29} "
        + "; ".join(
            f"{name} {_mb(w['before'])} before, peak {_mb(w['peak_sampled'])}"
            for name, w in fan.workers_rss_kb.items()
        ),
        f"{'CPU seconds during replies':<29} "
        + ", ".join(f"{name} {sec:.1f}" for name, sec in fan.cpu_seconds.items()),
    ]
    if fan.redis_connections_peak:
        lines.append(
            f"{'Redis connections (peak)':<29} "
            + ", ".join(f"{name} {n}" for name, n in fan.redis_connections_peak.items())
            + f" (redis-py pool of a process: REDIS_MAX_CONNECTIONS="
            f"{fanout_bench.REDIS_POOL_DEFAULT}, the default; beside it the script connections "
            "of storage/redis/client.py and the API's event reader)"
        )
    jobs = fan.jobs_unacknowledged
    if jobs.get("jobs"):
        lines.append(
            f"{'  jobs not acknowledged':<29} {jobs['jobs']:.0f} jobs still pending "
            f"{jobs['seconds_after_last_reply']:.0f} s after the last reply had ended (XPENDING "
            "of the workers' group)"
        )
    commands = fan.redis_commands
    if commands:
        total = sum(c["usec"] for c in commands.values()) or 1
        lines.append(
            f"{'Redis command time':<29} "
            + ", ".join(
                f"{name} {c['usec'] / total:.0%} ({c['calls']:,.0f} calls, "
                f"{c['usec_per_call']:,.0f} us each)"
                for name, c in list(commands.items())[:3]
            )
        )
    for kind, count in fan.failure_kinds.items():
        lines.append(f"{'  FAILED':<29} {count} x {kind}")
    for name, counts in warnings.items():
        for message, count in counts.items():
            lines.append(f"{'  log of ' + name:<29} {count} x {message}")
    return lines


def relay_line(r: relay_bench.RelayResult) -> str:
    j = r.to_json()
    ratio = j["reply_time_over_model"] or {"p50": float("nan"), "p99": float("nan")}
    first = j["first_delta_ms"] or {"p50": float("nan"), "p99": float("nan")}
    overhead = j["first_delta_overhead_ms"] or {"p50": float("nan"), "p99": float("nan")}
    lag = j["model_time_over_nominal"] or {"p99": float("nan")}
    asked = j["post_to_model_request_ms"] or {"p50": float("nan"), "p99": float("nan")}
    complete = f"{r.completed}/{r.load.streams} complete"
    return (
        f"{r.load.name:<20} {r.tokens_per_second:>8,.0f} tok/s  {r.cpu_us_per_token():6.1f} "
        f"us CPU/token  reply/model p50 {ratio['p50']:.2f}x p99 {ratio['p99']:.2f}x  "
        f"first delta p50 {first['p50']:.0f} ms p99 {first['p99']:.0f} ms (overhead after the "
        f"model's p50 {overhead['p50']:.1f} ms p99 {overhead['p99']:.1f} ms; model asked after "
        f"p50 {asked['p50']:.0f} ms p99 {asked['p99']:.0f} ms)  {r.events_per_token:.2f} "
        f"events/token  [{complete}; model on schedule p99 {lag['p99']:.2f}x]"
    )


def relay_median_line(s: relay_bench.RelaySummary) -> str:
    """A load's medians over its runs, with the runs' range of the figures the goals are on."""
    tps, (tps_lo, tps_hi) = s.figure("tokens_per_second"), s.spread("tokens_per_second")
    cpu, (cpu_lo, cpu_hi) = s.figure("cpu_us_per_token"), s.spread("cpu_us_per_token")
    ratio = "reply_time_over_model"
    overhead = "first_delta_overhead_ms"
    over_lo, over_hi = s.spread(overhead, "p99")
    ratio_lo, ratio_hi = s.spread(ratio, "p99")
    runs = f"{len(s.runs)} runs, " + ("all complete" if s.complete else "NOT all complete")
    return (
        f"{s.load.name:<20} {tps:>8,.0f} tok/s ({tps_lo:,.0f}-{tps_hi:,.0f})  {cpu:.1f} us "
        f"CPU/token ({cpu_lo:.1f}-{cpu_hi:.1f})  reply/model p50 {s.figure(ratio, 'p50'):.2f}x "
        f"p99 {s.figure(ratio, 'p99'):.2f}x ({ratio_lo:.2f}-{ratio_hi:.2f})  first-delta "
        f"overhead p50 {s.figure(overhead, 'p50'):.1f} ms p99 {s.figure(overhead, 'p99'):.1f} "
        f"ms ({over_lo:.1f}-{over_hi:.1f})  {s.figure('events_per_token'):.2f} events/token  "
        f"[{runs}]"
    )


def relay_goals(summaries: list[relay_bench.RelaySummary]) -> list[str]:
    """The goals of issue 12 against the loads they are set at (medians of the runs)."""
    by_load = {(s.load.streams, s.load.tokens, s.load.token_delay_ms): s for s in summaries}
    lines = []
    heavy = by_load.get((500, 200, 2.0))
    if heavy is not None:
        tps, cpu = heavy.figure("tokens_per_second"), heavy.figure("cpu_us_per_token")
        lines.append(
            f"  500 x 200 x 2 ms: {tps:,.0f} tok/s (goal >= 40,000: {_verdict(tps >= 40_000)}), "
            f"{cpu:.1f} us CPU/token (goal <= 30: {_verdict(cpu <= 30)})"
        )
        overhead = heavy.figure("first_delta_overhead_ms", "p99")
        worker = "first_delta_model_to_xadd_ms"
        api = "first_delta_xadd_to_client_ms"
        lines.append(
            f"  first-delta overhead p99 with 500 streams: {overhead:.0f} ms "
            f"(goal <= 20: {_verdict(overhead <= 20)}); split at the XADD: model -> XADD p50 "
            f"{heavy.figure(worker, 'p50'):.1f} ms p99 {heavy.figure(worker, 'p99'):.0f} ms, "
            f"XADD -> client p50 {heavy.figure(api, 'p50'):.1f} ms p99 "
            f"{heavy.figure(api, 'p99'):.0f} ms"
        )
    light = by_load.get((200, 200, 5.0))
    if light is not None:
        p99 = light.figure("reply_time_over_model", "p99")
        lines.append(
            f"  200 x 200 x 5 ms: reply time p99 {p99:.2f}x the model's own "
            f"(goal <= 1.5: {_verdict(p99 <= 1.5)})"
        )
    complete = all(s.complete for s in summaries)
    lines.append(f"  every reply complete and exact: {_verdict(complete)}")
    return lines


def relay_table(results: list[relay_bench.RelayResult]) -> str:
    return "\n".join(relay_lines(results))


def relay_lines(results: list[relay_bench.RelayResult]) -> list[str]:
    r = relay_bench
    summaries = r.summaries(results)
    rounds = max((len(s.runs) for s in summaries), default=0)
    return [
        f"Relay: streams x tokens x token delay (after {r.FIRST_DELAY_MS:g} ms), one SSE client "
        f"each; API (WORKER_IN_API=false) + {r.WORKERS} worker processes, default settings; CPU "
        "of API + workers + Redis; bench/fake_model.py; each run:",
        *(relay_line(x) for x in results),
        f"Medians of {rounds} runs (the runs' range in brackets) and the goals of issue 12:",
        *(relay_median_line(s) for s in summaries),
        *relay_goals(summaries),
    ]


def table(
    comparisons: list[Comparison],
    pairs: list[Pair],
    memory: MemoryResult,
    notes: list[str],
    replies: Replies | None = None,
    trees: TreeResult | None = None,
    relays: list[relay_bench.RelayResult] | None = None,
) -> str:
    lines = [
        "",
        "=" * 100,
        "Throughput, one uvicorn worker (medians of alternating wrk rounds; latency under 32 "
        "connections):",
        *(throughput_line(c) for c in comparisons),
        *([line] if (line := edges_line(comparisons)) else []),
        "",
        "Latency at 100,000 messages vs at 10 (p50 of sequential keep-alive requests; pages sized "
        "so that both return the same number of messages):",
        *(scaling_line(p) for p in pairs),
        "",
        "Memory (10,000 messages of 200 characters):",
        memory_line(memory),
    ]
    if trees is not None:
        lines += ["", *trees_lines(trees)]
    if replies is not None:
        t = ttft_bench
        lines += [
            "",
            f"Time to first token overhead: provider's first token written -> first message.delta "
            f"at the client ({t.SAMPLES} replies one at a time, {t.CONVERSATIONS} open event "
            f"streams; API with WORKER_IN_API=false, worker process, fake OpenAI server):",
            *ttft_lines(replies.ttft_sequential, "TTFT overhead"),
        ]
        if replies.ttft_loaded is not None:
            lines += ttft_lines(replies.ttft_loaded, f"same, {fanout_bench.CLIENTS:,} idle clients")
        f = fanout_bench
        lines += [
            "",
            f"{f.CLIENTS:,} SSE clients on one API process, one reply each ({f.WORKERS} worker "
            f"processes x WORKER_CONCURRENCY {f.WORKER_CONCURRENCY}; {f.TOKENS} tokens "
            f"{f.TOKEN_DELAY_MS:g} ms apart after {f.FIRST_DELAY_MS:g} ms):",
            *fanout_lines(replies.fan, replies.log_warnings),
        ]
        pauses = ", ".join(
            f"{name} {p['count']:.0f} ({p['full']:.0f} full; longest {p['max_ms']:.0f} ms)"
            for name, p in replies.gc_pauses.items()
        )
        lines.append(
            f"{'GC pauses >= 10 ms':<29} {pauses} (wall-clock, whole reply benchmarks; "
            "bench/gcprobe)"
        )
    if relays:
        lines += ["", *relay_lines(relays)]
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
