"""The reply worker: takes jobs, holds a conversation's lease, writes its replies in order.

Replies of one conversation are written one after the other (a second user message while a
reply is being written is answered after it, with the first reply in its history); replies of
different conversations are written concurrently, up to WORKER_CONCURRENCY per worker.

Admission: streams are I/O-bound, so a worker takes many at once, but never more than it can
relay at the model's pace. It takes jobs a few at a time (so that the jobs of a burst spread
over the worker processes instead of going to whichever asked first) and only while its event
loop keeps up (LoopLag below WORKER_MAX_LAG_MS). Past that, jobs wait in the queue in order
(the queue metrics show them) and the replies already started keep the model's full speed,
instead of every reply slowing down alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator

import uuid_utils
from loguru import logger

from conversational_core.observability import metrics
from conversational_core.observability.errors import report
from conversational_core.replies.generation import ReplyWriter
from conversational_core.replies.providers import build_provider
from conversational_core.settings import Settings
from conversational_core.storage.base import Job, JobQueue, Store
from conversational_core.storage.errors import Unavailable, describe
from conversational_core.storage.factory import Backend

# Jobs taken per read: a burst spreads over the worker processes, and the replies a worker
# starts together (each start a few round trips and the provider request built: ~1 ms of the
# loop) hold up the first tokens of the replies it is writing. With 500 streams on two cores,
# 4 against 8 (6 alternating runs each): first-delta overhead p99 18-37 ms (median 22) against
# 28-81 ms (median 35), at 51,000-62,000 tokens/s against 61,000-67,000 (README).
TAKE_AT_ONCE = 4


class LoopLag:
    """How late this process's event loop runs: a timer every PERIOD seconds notes how much
    later than asked it fired, smoothed. `calm` is set while the lag is below `limit`."""

    PERIOD = 0.005

    def __init__(self, limit_ms: int) -> None:
        self.limit = limit_ms / 1000
        self.lag = 0.0
        self.calm = asyncio.Event()
        self.calm.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(self.PERIOD)  # a probe: being late is the measurement
            late = max(0.0, loop.time() - asked - self.PERIOD)
            self.lag = 0.7 * self.lag + 0.3 * late
            metrics.WORKER_LOOP_LAG.set(self.lag)
            if self.lag < self.limit:
                self.calm.set()
            else:
                self.calm.clear()


class Worker:
    def __init__(
        self,
        store: Store,
        jobs: JobQueue,
        writer: ReplyWriter,
        settings: Settings,
        name: str | None = None,
    ) -> None:
        self._store = store
        self._jobs = jobs
        self._writer = writer
        self._settings = settings
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid_utils.uuid4().hex[:6]}"
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self.lag = LoopLag(settings.WORKER_MAX_LAG_MS)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Take and run jobs until :meth:`stop`; then let the running ones finish for up to
        WORKER_SHUTDOWN_GRACE_SECONDS, and hand the rest back (another worker takes them at
        once and restarts their replies)."""
        limit = self._settings.WORKER_CONCURRENCY
        backoff = 0.1
        watcher = asyncio.create_task(self._watch_deadlines(), name="reply-deadlines")
        probe = asyncio.create_task(self.lag.run(), name="loop-lag")
        try:
            while not self._stopping.is_set():
                free = limit - len(self._tasks)
                if free <= 0 or (self._tasks and not self.lag.calm.is_set()):
                    # Full, or falling behind the streams it writes: wait for a free slot (or
                    # for the loop to catch up), or for stop(). The jobs wait in the queue. (A
                    # worker writing nothing always takes one: its lag is then the machine's.)
                    pending = {asyncio.ensure_future(self._stopping.wait())}
                    if free > 0:
                        pending.add(asyncio.ensure_future(self.lag.calm.wait()))
                    try:
                        await asyncio.wait(
                            {*self._tasks, *pending}, return_when=asyncio.FIRST_COMPLETED
                        )
                    finally:
                        for future in pending:
                            future.cancel()
                    continue
                try:
                    jobs = await self._take(min(free, TAKE_AT_ONCE))
                    backoff = 0.1
                except Exception as exc:  # the loop must outlive any store hiccup
                    metrics.STORE_ERRORS.labels("worker").inc()
                    logger.warning(
                        "worker {}: cannot take jobs ({}), retrying", self.name, describe(exc)
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                for job in jobs:
                    task = asyncio.create_task(self._handle(job), name=f"job-{job.id}")
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
                metrics.WORKER_REPLIES.set(len(self._tasks))
        finally:
            watcher.cancel()
            probe.cancel()
            running = set(self._tasks)
            grace = self._settings.WORKER_SHUTDOWN_GRACE_SECONDS
            if running and grace > 0 and self._stopping.is_set():
                logger.info("worker {}: finishing {} running job(s)", self.name, len(running))
                _, running = await asyncio.wait(running, timeout=grace)
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        metrics.WORKER_REPLIES.set(len(self._tasks))

    async def _watch_deadlines(self) -> None:
        """Fail replies that waited too long for tool results: every worker looks at the
        deadlines that came (a few times per TOOL_RESULT_TIMEOUT_SECONDS, at most every
        second); ending one is a compare-and-set, so two workers on one are harmless."""
        period = min(1.0, self._settings.TOOL_RESULT_TIMEOUT_SECONDS / 4)
        while True:
            await asyncio.sleep(period)  # a timer: time is the point
            try:
                for cid, mid in await self._jobs.due_deadlines(time.time(), 100):
                    later = await self._writer.expire(cid, mid)
                    if later is not None:
                        await self._jobs.add_deadline(cid, mid, later)
                    else:
                        await self._jobs.remove_deadline(cid, mid)
            except Exception as exc:  # the watch must outlive any store hiccup
                metrics.STORE_ERRORS.labels("worker").inc()
                logger.warning("worker {}: deadlines: {}", self.name, describe(exc))

    async def _take(self, count: int) -> list[Job]:
        """Jobs, waiting up to a second for some; nothing once :meth:`stop` is called (a
        stopping worker does not sit out a blocking read)."""
        take = asyncio.ensure_future(self._jobs.take(self.name, count, wait_seconds=1.0))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({take, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if take.done():
            return take.result()
        take.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            jobs = await take
            return jobs  # taken just as it was cancelled: still ours to run or hand back
        return []

    async def _handle(self, job: Job) -> None:
        cid = job.conversation_id
        token = uuid_utils.uuid4().hex
        try:
            if not await self._jobs.acquire(cid, token):
                return  # another worker is on this conversation; the job comes back later
        except Unavailable:
            return
        me = asyncio.current_task()
        assert me is not None
        keeper = asyncio.create_task(self._keep_lease(job, token, me))
        writing: str | None = None
        try:
            last: str | None = None
            while True:
                reply_id = await self._store.reply_queue_head(cid)
                if reply_id is None:
                    # Stop renewing first: a renewal racing the release would find the lease
                    # gone and cancel this job while it acknowledges.
                    keeper.cancel()
                    if await self._jobs.release(cid, token):
                        break
                    keeper = asyncio.create_task(self._keep_lease(job, token, me))
                    continue
                if reply_id == last:
                    # The reply could not be ended (it keeps changing under us): leave the job
                    # unacknowledged so that it is retried after the lease time.
                    logger.warning(
                        "reply {} is still queued after a write; retrying later", reply_id
                    )
                    return
                last = writing = reply_id
                await self._writer.write(cid, reply_id)
                writing = None
            await self._jobs.ack(job)
        except Unavailable:
            metrics.STORE_ERRORS.labels("worker").inc()
            logger.warning("worker {}: store unavailable during job {}", self.name, job.id)
        except asyncio.CancelledError:
            if self._stopping.is_set():
                keeper.cancel()  # its next renewal would find the lease gone and cancel us
                await self._hand_back(job, token, writing)
            elif writing is not None:
                self._writer.forget(writing)
            raise
        except Exception as exc:
            logger.exception("worker {}: job {} failed", self.name, job.id)
            report(exc)
        finally:
            keeper.cancel()

    async def _hand_back(self, job: Job, token: str, writing: str | None) -> None:
        try:
            if writing is not None:
                await self._writer.hand_back(job.conversation_id, writing)
            await self._jobs.hand_back(job, token)
            logger.info("worker {}: handed job {} back", self.name, job.id)
        except Unavailable:
            pass  # the job stays pending: another worker reclaims it after the lease time

    async def _keep_lease(self, job: Job, token: str, owner: asyncio.Task[None]) -> None:
        """Renew the lease every third of its time; stop the job once it cannot be held (lost,
        or not renewed for a whole lease time because the store is unreachable): another
        worker may have taken the conversation over."""
        lease = self._settings.JOB_LEASE_SECONDS
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            await asyncio.sleep(lease / 3)  # a heartbeat: time is the point
            try:
                held = await self._jobs.renew(job.conversation_id, token, job)
                if held:
                    renewed = loop.time()
            except Unavailable:
                held = loop.time() - renewed < lease
            if not held:
                logger.warning(
                    "worker {}: lost the lease of {}; stopping", self.name, job.conversation_id
                )
                owner.cancel()
                return


@contextlib.asynccontextmanager
async def run_worker(settings: Settings, backend: Backend) -> AsyncIterator[Worker]:
    """A worker running in the background for as long as the context is open."""
    provider = build_provider(settings)
    writer = ReplyWriter(backend.store, provider, settings, backend.jobs)
    worker = Worker(backend.store, backend.jobs, writer, settings)
    task = asyncio.create_task(worker.run(), name="reply-worker")
    try:
        yield worker
    finally:
        worker.stop()  # takes nothing new, finishes or hands back what runs
        try:
            await asyncio.wait_for(asyncio.shield(task), settings.WORKER_SHUTDOWN_GRACE_SECONDS + 5)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await writer.aclose()
        await provider.close()
