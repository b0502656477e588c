"""Benchmarks of Conversational Core: `make bench` (`PYTHONPATH=src python -m bench`).

It prints figures, not pass/fail: each figure is shown beside the goal of the performance issue,
and the same figures are written as JSON to `bench/results/latest.json`. Everything runs against
processes the benchmark starts itself on free loopback ports (its own `redis-server`, the service
as `python run.py` and `python run.py worker`, a bare FastAPI app and a fake OpenAI-compatible
server), so it never touches the machine's Redis nor a real model, and the memory figures are
clean. It takes about three minutes (plus wrk's installation the first time: when `wrk` is
missing and the run is root on Debian/Ubuntu it runs `apt-get install wrk`, saying so; otherwise
it stops and says what to install).

1. `throughput`: the service beside a bare FastAPI endpoint on the same uvicorn settings, for
   appending a message and reading a page (wrk; req/s, p50, p99, ratio ours/bare).
2. `scaling`: append and page latency in a conversation of 100,000 messages against one of 10.
3. `memory`: Redis memory per stored message against the size of its JSON.
4. `ttft`: what the service adds to the time to first token of an AI reply (the provider's first
   token written -> the first `message.delta` at an SSE client), with a worker process; again
   with 1,000 idle SSE clients connected.
5. `fanout`: 1,000 SSE clients on one API process, each receiving its complete reply; memory of
   the API and worker processes.

Modules: `run` (the sequence), `procs` (processes and tools), `wrk` (load generator), `client`
(a minimal HTTP client for sequential samples), `sse` (minimal SSE clients), `fixtures` (data),
`bare_app` (the baseline), `fake_llm` (the fake model), `report` (table and JSON).
"""
