"""Writing one reply: build the prompt, stream the provider's answer into events, finish once.

The reply's lifecycle is `pending → streaming → completed | failed | cancelled`, or
`requires_action` when the model called tools: the client answers them (tool_results: the reply
becomes `completed` and the next one is queued), or it fails at its deadline (`expire`). The
reply is written as parts (replies/assembly.py): text, reasoning and tool calls. Its stored
document is written when the attempt starts and when it ends, not in between: the deltas are
kept as they are published (appended), and a GET of a streaming reply shows them
(Store.published_parts). Every state change is a compare-and-set on the stored message (the
Store's start_attempt and finish_reply), so that:
- a cancel, a delete or another worker's write is noticed at the next write and the generation
  stops (and `publish_delta` refuses a cancelled or deleted reply at once, which closes the
  provider's stream within one token);
- a reply is finished exactly once, even if two workers ran it (the second CAS fails).

A worker that dies leaves the reply `streaming` with the text published so far; the next attempt
starts over and announces it with `message.updated` carrying the reset (empty) content, so that
clients drop the partial text. Attempts are counted on the reply (`context.attempts`); past
JOB_MAX_TRIES it ends `failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Coroutine
from typing import Any

from loguru import logger

from conversational_core.observability import metrics
from conversational_core.replies.assembly import PartsBuilder, batched
from conversational_core.replies.context import PromptTooLong, build_prompt, part_tokens
from conversational_core.replies.providers.base import Provider, ProviderError, Stop, Usage
from conversational_core.replies.titles import TitleWriter
from conversational_core.runtime import stopped
from conversational_core.settings import Settings
from conversational_core.storage.base import JobQueue, MessageQuery, Store
from conversational_core.storage.errors import NotFound, ReplyStopped, Unavailable
from conversational_core.storage.models import (
    TOOL_CALL,
    Conversation,
    Message,
    MessageStatus,
    Part,
    content_of,
    is_json_object,
    rfc3339_to_ms,
    utcnow,
)

# How often a reply's writer checks, while nothing is published, that the reply is still its to
# write (ReplyWriter._watched).
_WATCH_SECONDS = 1.0
_ENDS = (Usage, Stop)  # what a stream's last read holds beside its pieces (a tuple: per token)


def _attempt(message: Message) -> int:
    return int((message.context or {}).get("attempts", 0))


class ReplyWriter:
    def __init__(
        self,
        store: Store,
        provider: Provider,
        settings: Settings,
        deadlines: JobQueue | None = None,
    ) -> None:
        self._store = store
        self._deadlines = deadlines  # where a reply waiting for tool results gets its deadline
        self._provider = provider
        self._settings = settings
        self._titles = TitleWriter(store, provider, settings)
        self._titling: dict[str, asyncio.Task[None]] = {}  # conversation id -> its title's
        self._running: dict[str, int] = {}  # reply id -> the attempt this writer is writing
        self._batch_window = settings.DELTA_BATCH_MS / 1000

    async def write(self, conversation_id: str, reply_id: str) -> None:
        """Write (or finish) one reply; returns when it has ended or is no longer ours to write."""
        # The reply, its conversation and the branch that leads to it (newest first: never
        # another branch), read at once: the model is asked one round trip after the job
        # starts instead of three.
        history_query = MessageQuery(
            self._settings.LLM_HISTORY_MESSAGES, descending=True, anchor_id=reply_id, leaf=reply_id
        )
        current, conversation, history = await asyncio.gather(
            self._store.get_message(conversation_id, None, reply_id),
            self._store.get_conversation(conversation_id, None),
            self._store.list_messages(conversation_id, None, history_query),
            return_exceptions=True,
        )
        if isinstance(current, NotFound):
            return
        if isinstance(current, BaseException):
            raise current
        if current.status.is_written:
            # Ended, yet at the head of the reply queue (write is asked for the head only): no
            # path should leave it there; off it, or every later reply would wait behind it.
            await self._store.release_ended_reply(conversation_id, current)
            return
        if isinstance(conversation, NotFound) or isinstance(history, NotFound):
            return
        if isinstance(conversation, BaseException):
            raise conversation
        if isinstance(history, BaseException):
            raise history
        previous = current.context or {}
        attempts = int(previous.get("attempts", 0)) + 1
        # Attempts a stopping worker handed back (SIGTERM) are not the reply's fault: only the
        # others count against JOB_MAX_TRIES (a worker that died could not say, so its count).
        uncharged = int(previous.get("uncharged_attempts", 0))
        if attempts - uncharged > self._settings.JOB_MAX_TRIES:
            await self._end(
                conversation_id,
                current,
                MessageStatus.FAILED,
                error=f"The reply could not be written after {attempts - 1 - uncharged} attempts.",
            )
            return
        requested = previous.get("requested") or {}
        try:
            prompt = build_prompt(self._settings, conversation, history.items, requested)
        except PromptTooLong:
            await self._end(
                conversation_id,
                current,
                MessageStatus.FAILED,
                error="The message is too long for the AI model's context window.",
            )
            return
        context: dict[str, Any] = {
            **prompt.info,
            "provider": self._provider.name,
            "attempts": attempts,
        }
        if uncharged:
            context["uncharged_attempts"] = uncharged
        if requested:
            context["requested"] = requested
        streaming = current.replace(
            status=MessageStatus.STREAMING,
            content="",
            parts=[],  # an attempt starts from nothing (a previous one's calls included)
            context=context,
            updated_at=utcnow(),
            version=current.version + 1,
        )
        try:
            stored = await self._store.start_attempt(conversation_id, streaming, current, attempts)
        except ReplyStopped as stopped:
            # Stopped by a cancel (or an interrupting message) whose process did not get to
            # record it: finish the cancellation, with the text its clients received.
            await self._cancelled(conversation_id, current, stopped.parts)
            return
        if stored is None:
            return  # changed meanwhile (cancelled, deleted, or another worker): not ours
        self._running[reply_id] = attempts
        try:
            completed = await self._stream(conversation_id, stored, prompt.request)
            if completed and self._settings.AUTO_TITLE and conversation.title_source is None:
                self._title_beside(conversation, history.items)
        except asyncio.CancelledError:
            raise  # the entry stays until the worker hands the attempt back, or forgets it
        except BaseException:
            self.forget(reply_id)
            raise
        self.forget(reply_id)

    def _title_beside(self, conversation: Conversation, history: list[Message]) -> None:
        """Name the conversation in a task of its own, beside its next replies rather than
        before them (a title is a completion of its own, as slow as the provider, and a
        failing one costs only the title), within LLM_TIMEOUT_SECONDS in all."""
        if conversation.id in self._titling:
            return  # (one at a time: its conversation will have a title, or the next reply asks)

        async def title() -> None:
            try:
                async with asyncio.timeout(self._settings.LLM_TIMEOUT_SECONDS):
                    await self._titles.write(conversation, history)
            except TimeoutError:
                logger.info("no title for {}: the provider took too long", conversation.id)
            except Exception:
                logger.exception("no title for {}", conversation.id)
            finally:
                self._titling.pop(conversation.id, None)

        self._titling[conversation.id] = asyncio.create_task(title(), name="title")

    async def aclose(self) -> None:
        """Stop the titles being written (a title is best effort: the next reply asks again)."""
        titling = list(self._titling.values())
        for task in titling:
            task.cancel()
        await asyncio.gather(*titling, return_exceptions=True)

    def _window(self) -> float:
        """How long a reply's tokens are gathered into one delta: DELTA_BATCH_MS while this
        writer writes more than one reply, else nothing (a delta per token read)."""
        return self._batch_window if len(self._running) > 1 else 0.0

    def forget(self, reply_id: str) -> None:
        self._running.pop(reply_id, None)

    async def hand_back(self, conversation_id: str, reply_id: str) -> None:
        """The worker stops (SIGTERM) before the reply ended and hands it to another: the
        attempt it was writing does not count against JOB_MAX_TRIES."""
        attempt = self._running.pop(reply_id, None)
        if attempt is None:
            return
        for _ in range(5):
            try:
                current = await self._store.get_message(conversation_id, None, reply_id)
            except NotFound:
                return
            if current.status.is_written or _attempt(current) != attempt:
                return  # ended meanwhile, or already another worker's
            context = dict(current.context or {})
            context["uncharged_attempts"] = int(context.get("uncharged_attempts", 0)) + 1
            released = current.replace(context=context)
            if await self._store.flush_reply(conversation_id, released, current):
                return

    async def _stream(self, conversation_id: str, current: Message, request: Any) -> bool:
        """Write the reply; True when it completed (by this writer)."""
        settings = self._settings
        built = PartsBuilder()
        usage: Usage | None = None
        stop: str | None = None  # why the model stopped, when a user is told (Stop)
        attempt = _attempt(current)  # deltas of another attempt are refused by the store
        provider = self._provider.name
        began = time.monotonic()
        first_token = True
        published = [began]  # when a delta last went out (the watch reads it)

        async def generate() -> bool:
            """The provider's answer into deltas, retried before its first token; True when
            it came whole, False when the reply was ended here (failed or stopped)."""
            for try_number in range(settings.LLM_MAX_RETRIES + 1):
                ended = await attempt_once(try_number)
                if ended is not None:
                    return ended
            return True  # (unreachable: the last try ends the reply)

        async def attempt_once(try_number: int) -> bool | None:
            """One provider call: True (answered), False (ended), None (retry)."""
            nonlocal usage, first_token, stop
            started = False
            try:
                reads = self._provider.reads(request, self._window)
                batches = batched(reads, self._window)
                async with contextlib.aclosing(batches):
                    async for batch in batches:
                        pieces = [i for i in batch if not isinstance(i, _ENDS)]
                        if len(pieces) < len(batch):  # (the end of the stream)
                            for item in batch:
                                if isinstance(item, Usage):
                                    usage = item
                                elif isinstance(item, Stop):
                                    stop = item.reason
                        started = started or bool(pieces)
                        for delta in built.add_all(pieces):
                            first = first_token
                            if first_token:
                                first_token = False
                                waited = time.time() - rfc3339_to_ms(current.created_at) / 1000
                                metrics.TIME_TO_FIRST_TOKEN.labels(provider).observe(
                                    max(0.0, waited)
                                )
                            if not await self._store.publish_delta(
                                conversation_id,
                                current.id,
                                delta.text,
                                attempt,
                                part_index=delta.part_index,
                                part_type=delta.part_type,
                                start=delta.start,
                                urgent=first,
                            ):
                                # Cancelled, deleted or taken over: leaving `batched` closes the
                                # stream, which stops the provider. A reply still ours was stopped
                                # by a cancel that may not get recorded (its process died): record
                                # it, with exactly what its deltas published.
                                latest = await self._reread(conversation_id, current)
                                if latest is not None:
                                    stopped = await self._store.stop_reply(
                                        conversation_id, current.id
                                    )
                                    await self._cancelled(conversation_id, latest, stopped)
                                return False
                            published[0] = time.monotonic()
                return True
            except ProviderError as exc:
                if not exc.retryable or started or try_number == settings.LLM_MAX_RETRIES:
                    logger.info(
                        "reply {} failed: {} (status {})", current.id, exc.message, exc.status
                    )
                    if await self._end(
                        conversation_id,
                        current,
                        MessageStatus.FAILED,
                        error=exc.message,
                        parts=built.snapshot(),
                    ):
                        metrics.GENERATION_DURATION.labels(provider, "failed").observe(
                            time.monotonic() - began
                        )
                    return False
                delay = exc.retry_after
                if delay is None:
                    delay = min(
                        settings.LLM_RETRY_MAX_SECONDS,
                        settings.LLM_RETRY_BASE_SECONDS * 2**try_number,
                    )
                    delay *= 0.5 + random.random() / 2  # jitter
                delay = min(delay, settings.LLM_RETRY_MAX_SECONDS)
                logger.info(
                    "reply {}: provider error {}, retrying in {:.2f}s",
                    current.id,
                    exc.status,
                    delay,
                )
                await asyncio.sleep(delay)  # (the watch stops it for a reply no longer wanted)
                if await self._reread(conversation_id, current) is None:
                    return False  # cancelled (or deleted, taken over) while it waited: no call
                return None

        if not await self._watched(conversation_id, current, generate(), published, began):
            return False
        for index, part in enumerate(built.parts):
            if part["type"] == TOOL_CALL and not part["arguments"]:
                # A call with no arguments: `{}` (JSON text, as every call's), sent as its
                # delta too, so that its deltas still make its arguments.
                if not await self._store.publish_delta(
                    conversation_id, current.id, "{}", attempt,
                    part_index=index, part_type=TOOL_CALL,
                ):  # fmt: skip
                    return False  # stopped meanwhile: recorded by who stopped it
                part["arguments"] = "{}"
        parts = built.snapshot()
        noted: dict[str, Any] = {}
        broken = [p for p in built.tool_calls if not is_json_object(p["arguments"])]
        if broken:
            # A call a client cannot run (its arguments cut at the output limit, or not JSON):
            # the reply fails, with what it wrote, rather than ask for the call's result.
            await self._end(
                conversation_id,
                current,
                MessageStatus.FAILED,
                error=(
                    "The AI model's tool call was cut off at the output limit."
                    if stop == "length"
                    else "The AI model called a tool with arguments that are not a JSON object."
                ),
                parts=parts,
                noted={"finish_reason": stop} if stop else None,
            )
            return False
        if stop is not None:
            noted["finish_reason"] = stop  # `length`: cut at the output limit
            if stop == "content_filter" and not parts:
                await self._end(
                    conversation_id,
                    current,
                    MessageStatus.FAILED,
                    error="The AI provider declined to answer (its content filter).",
                    parts=parts,
                    noted=noted,
                )
                return False
        if usage is None:
            # Some servers report none (llama-cpp-python's): an estimate, marked as one.
            prompt_tokens = int((current.context or {}).get("estimated_prompt_tokens", 0))
            usage = Usage(prompt_tokens, sum(part_tokens(p) for p in parts))
            noted["usage_estimated"] = True
        status = MessageStatus.COMPLETED
        if built.tool_calls:
            # The client runs the tools: the reply waits for their results (tool_results),
            # and fails if none come in time. The deadline is registered first: never lost.
            status = MessageStatus.REQUIRES_ACTION
            if self._deadlines is not None:
                await self._deadlines.add_deadline(
                    conversation_id,
                    current.id,
                    time.time() + settings.TOOL_RESULT_TIMEOUT_SECONDS,
                )
        if await self._end(
            conversation_id, current, status, parts=parts, usage=usage.as_dict(), noted=noted
        ):
            metrics.GENERATION_DURATION.labels(provider, status.value).observe(
                time.monotonic() - began
            )
            metrics.COUNTS.add(metrics.TOKENS.labels(provider, "prompt"), usage.input_tokens)
            metrics.COUNTS.add(metrics.TOKENS.labels(provider, "completion"), usage.output_tokens)
            if self._settings.LOG_CONTENT:
                logger.debug("reply {} text: {}", current.id, content_of(parts))
            return status is MessageStatus.COMPLETED
        return False

    async def _watched(
        self,
        conversation_id: str,
        current: Message,
        work: Coroutine[Any, Any, bool],
        published: list[float],
        began: float,
    ) -> bool:
        """Run `work` (the provider's answer into deltas) under a watch: each second in which it
        published nothing (the provider is silent before its first token, or trickles, or the
        worker waits to retry), the reply is read again, and `work` is stopped when the reply
        is no longer this writer's to write (cancelled, deleted, taken over): a cancel does not
        wait for the provider's timeout, and no provider call is made again for a reply no one
        wants. A reply still written LLM_REPLY_MAX_SECONDS after it started is ended `failed`
        with its text so far (a stream that trickles forever would hold its conversation).
        Returns what `work` did, or False when the watch stopped it."""
        task = asyncio.ensure_future(work)
        deadline = began + self._settings.LLM_REPLY_MAX_SECONDS
        try:
            while True:
                now = time.monotonic()
                wait = min(_WATCH_SECONDS, max(0.0, deadline - now))
                done, _ = await asyncio.wait({task}, timeout=wait)
                if done:
                    return task.result()
                now = time.monotonic()
                if now >= deadline:
                    await stopped(task)
                    if await self._reread(conversation_id, current) is None:
                        return False  # no longer this writer's (taken over, cancelled…)
                    logger.info("reply {} ran past LLM_REPLY_MAX_SECONDS", current.id)
                    # Exactly what its deltas published (stopped mid-publish, the builder may
                    # hold a piece more), and no delta after it.
                    sent = await self._store.stop_reply(conversation_id, current.id)
                    await self._end(
                        conversation_id,
                        current,
                        MessageStatus.FAILED,
                        error=(
                            "The AI provider's answer took longer than "
                            f"{self._settings.LLM_REPLY_MAX_SECONDS:g} seconds."
                        ),
                        parts=sent or [],
                    )
                    return False
                if now - published[0] >= _WATCH_SECONDS:
                    try:
                        ours = await self._reread(conversation_id, current)
                    except Unavailable:
                        continue  # the store's hiccup is no reason to stop a stream
                    if ours is None:
                        return False  # (the `finally` stops the work)
        finally:
            if not task.done():
                await stopped(task)

    async def expire(self, conversation_id: str, message_id: str) -> float | None:
        """A deadline came (JobQueue.due_deadlines): a reply still waiting for tool results
        TOOL_RESULT_TIMEOUT_SECONDS after it asked for them ends `failed`. Returns when to look
        again if it is not due yet (a deadline registered early, as on a start), else None."""
        timeout = self._settings.TOOL_RESULT_TIMEOUT_SECONDS
        for _ in range(5):
            try:
                current = await self._store.get_message(conversation_id, None, message_id)
            except NotFound:
                return None
            if current.status is not MessageStatus.REQUIRES_ACTION:
                return None  # answered, cancelled or deleted
            due = rfc3339_to_ms(current.updated_at) / 1000 + timeout
            if due > time.time():
                return due
            failed = current.replace(
                status=MessageStatus.FAILED,
                error=f"No tool results arrived within {timeout} seconds.",
                updated_at=utcnow(),
                version=current.version + 1,
            )
            if await self._store.finish_reply(conversation_id, failed, current):
                metrics.REPLIES.labels("failed").inc()
                return None
        return None

    async def _cancelled(
        self, conversation_id: str, current: Message, parts: list[Part] | None
    ) -> None:
        """Record a stopped reply as cancelled, with `parts` (what its deltas published); a
        no-op when someone else recorded it first."""
        cancelled = (current if parts is None else current.with_parts(parts)).replace(
            status=MessageStatus.CANCELLED, updated_at=utcnow(), version=current.version + 1
        )
        if await self._store.cancel_reply(conversation_id, None, cancelled, current):
            metrics.REPLIES.labels("cancelled").inc()

    async def _reread(self, conversation_id: str, ours: Message) -> Message | None:
        """The reply as stored now, or None when it is no longer ours to write: ended, deleted,
        or restarted by another worker that took it over (another attempt number)."""
        try:
            latest = await self._store.get_message(conversation_id, None, ours.id)
        except NotFound:
            return None
        if latest.status.is_written or _attempt(latest) != _attempt(ours):
            return None
        return latest

    async def _end(
        self,
        conversation_id: str,
        current: Message,
        status: MessageStatus,
        *,
        error: str | None = None,
        parts: list[Part] | None = None,
        usage: dict[str, int] | None = None,
        noted: dict[str, Any] | None = None,
    ) -> bool:
        """Finish the reply exactly once: a CAS against what this writer last stored (re-read
        when only its metadata changed meanwhile). False when someone else ended it."""
        for _ in range(5):
            final = (current if parts is None else current.with_parts(parts)).replace(
                status=status,
                error=error,
                usage=usage,
                context={**(current.context or {}), **noted} if noted else current.context,
                updated_at=utcnow(),
                version=current.version + 1,
            )
            # Once the reply has ended no delta passes, not even a stale writer's.
            if await self._store.finish_reply(conversation_id, final, current):
                metrics.COUNTS.add(metrics.REPLIES.labels(status.value))
                return True
            latest = await self._reread(conversation_id, current)
            if latest is None:
                return False  # cancelled, deleted or finished by someone else
            current = latest
        logger.warning("reply {} kept changing; leaving it to the next attempt", current.id)
        return False
