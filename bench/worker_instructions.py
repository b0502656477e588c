"""Benchmark: instructions a reply in a worker process, counted by callgrind.

Why: the relay's CPU per token moves by a fifth between runs on this shared machine, more than
most changes to the worker. The instructions a worker runs for a reply move less (within ~1%
from run to run for the 1-token and 1,000-token shapes; the 100-token count moved by up to 7%:
how many tokens a read finds depends on how fast the machine runs the worker, ~50 times slower
under callgrind, while the model writes every 10 ms). A
worker (`python run.py worker`) runs under `valgrind --tool=callgrind` beside Redis, the API
and bench/fake_model.py at full speed; it writes replies one at a time (a conversation, a
message, then the reply awaited), after WARMUP of them, and the count covers COUNT replies of
each shape:

- `1 token`: a reply's fixed cost (the job, the lease, the reads, the provider's request, the
  start and the end);
- `100 tokens, 10 ms apart`: a reply read a token at a time, a delta each (a worker writing one
  reply does not batch);
- `1,000 tokens at once`: one read of many tokens, few deltas (the per-token work).

The count includes the worker's timers while it waits for the model (the loop-lag probe every
5 ms), the same for both sides of a comparison made at the same shapes.

    PYTHONPATH=src:. python -m bench.worker_instructions   (about half a minute)
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.client import RawClient
from bench.fixtures import create_conversation
from bench.instructions import _callgrind, _control, _dumped, _names
from bench.procs import ensure_binary, fake_model, issue_token, redis_server, service_env, spawn
from bench.procs import service as service_process

WARMUP = 3
COUNT = 6
USER = "bench-user"


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    token_delay_ms: float


SHAPES = (
    Shape("1 token", 1, 10.0),
    Shape("100 tokens, 10 ms apart", 100, 10.0),
    Shape("1,000 tokens at once", 1000, 0.01),
)


def _reply(client: RawClient, token: str) -> None:
    """One message with a reply, in a conversation of its own; returns once it completed."""
    cid = create_conversation(client, token, "worker instructions")
    message = orjson.loads(
        client.call(
            "POST", f"/conversations/{cid}/messages", token=token, json={"content": "hi"},
            expected=201,
        )
    )  # fmt: skip
    path = f"/conversations/{cid}/messages/{message['reply_message_id']}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = orjson.loads(client.call("GET", path, token=token))["status"]
        if status == "completed":
            return
        if status not in ("pending", "streaming"):
            raise RuntimeError(f"the reply ended {status}")
        time.sleep(0.05)  # a worker under valgrind is slow: polled, it says nothing when done
    raise RuntimeError("no reply within 300 s")


def measure() -> dict[str, float]:
    counts: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        work = Path(tmp)
        out = work / "callgrind"
        out.mkdir()
        redis_binary = ensure_binary("redis-server", "redis-server")
        with (
            redis_server(redis_binary, work) as (_, url),
            fake_model(work) as (_, model_port),
        ):
            env = {
                "WORKER_IN_API": "false",
                "LLM_PROVIDER": "openai",
                "LLM_BASE_URL": f"http://127.0.0.1:{model_port}/v1",
                "LLM_MODEL": "bench-fake",
                "AUTO_TITLE": "false",
                **_names(),
            }
            with service_process(url, work, env, name="api") as (_, port):
                token = issue_token(url, USER)
                argv = [*_callgrind(out, "worker"), sys.executable, "run.py", "worker"]
                with (
                    spawn("worker", argv, work, {**service_env(url), **env}) as worker,
                    RawClient(port, timeout=300) as client,
                    RawClient(model_port) as model,
                ):
                    pid = worker.proc.pid
                    for shape in SHAPES:
                        config = {
                            "first_delay_ms": 5,
                            "tokens": shape.tokens,
                            "token_delay_ms": shape.token_delay_ms,
                        }
                        model.call("PUT", "/fake/config", json=config)
                        for _ in range(WARMUP):
                            _reply(client, token)
                        _control(pid, "--zero")
                        _control(pid, "--instr=on")
                        for _ in range(COUNT):
                            _reply(client, token)
                        _control(pid, "--instr=off")
                        _control(pid, "--dump")
                        dumped = _dumped(out, f"worker.{pid}.", f"worker-{shape.tokens}")
                        counts[shape.name] = dumped["Ir"] / COUNT
                    worker.check_alive()
    return counts


def main() -> int:
    counts = measure()
    print(f"Instructions a reply in a worker process (callgrind, {COUNT} replies after {WARMUP}):")
    for name, count in counts.items():
        print(f"  {name:26s} {count:>13,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
