"""Send every item of every job to its endpoint and store each Record the moment it finishes.

Asyncio with the real `openai.AsyncOpenAI` client, one client (own connection pool) per endpoint and
a semaphore per endpoint for bounded concurrency.  Items are pulled from their iterators only when a
request slot is free, so a task's items are never all in memory.  With `interleave=True` one
dispatcher walks the tasks and hands each item to every role before pulling the next, which keeps
the two backends working on the same items at the same time (load and time don't confound the
comparison); the slower backend paces the faster one.

Imports stay light (no torch/transformers/datasets): the first request goes out within a second or
two of the command starting.
"""
from __future__ import annotations

import asyncio
import email.utils
import inspect
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import openai

try:  # openai >= 3 ships its own httpx fork; older releases use httpx itself
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed openai
    import httpx

from flageval_lite.errors import UserError
from flageval_lite.progress import Progress, TaskProgress
from flageval_lite.records import Endpoint, GenParams, Item, Record
from flageval_lite.store import Store


class Supervisor(Protocol):
    """Keeps a managed server alive; implemented by the server lifecycle stage."""

    def ensure_alive(self) -> object:
        """Return once the server answers (restarting it if it died, on the same base_url); raise
        UserError when it cannot be brought back or is an external endpoint that went away.
        The return value is ignored."""


@dataclass
class Job:
    endpoint: Endpoint
    task: str
    items: Iterable[Item]
    params: GenParams = field(default_factory=GenParams)
    total: Optional[int] = None  # item count, when known, for the progress bar's ETA


@dataclass
class RunStats:
    role: str
    task: str
    sent: int = 0  # items sent this time
    skipped: int = 0  # items already stored by an earlier run (resumed)
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # error_kind -> items that failed for good
    attempts: int = 0  # HTTP requests made, retries included
    wall_s: float = 0.0

    def summary(self) -> str:
        errors = sum(self.errors.values())
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.errors.items()))
        rate = self.sent / self.wall_s if self.wall_s > 0 else 0.0
        return (f"{self.ok} ok, {errors} failed{f' ({kinds})' if kinds else ''}, {self.skipped} resumed; "
                f"{self.sent} sent with {self.attempts} requests in {self.wall_s:.1f}s ({rate:.1f} items/s)")


class _Failure(Exception):
    """One failed attempt, classified."""

    def __init__(self, kind: str, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.kind != "http_4xx"


def _retry_after(headers: Any) -> Optional[float]:
    """Seconds from `retry-after-ms` / `Retry-After` (delta-seconds or HTTP date), if present."""
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return float(value)
        except ValueError:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


# Raw bytes go in `content` where the client has it (older releases took them in `body`).
_RAW_BODY_ARG = "content" if "content" in inspect.signature(openai.AsyncOpenAI.post).parameters else "body"
_TRUNCATION_ERRORS = ("ClientPayloadError", "ContentLengthError", "TransferEncodingError")


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _classify(exc: BaseException) -> Optional[_Failure]:
    """Map a client exception to an error kind; None for exceptions that are bugs, not failures.

    Transport errors are judged by their root cause: the aiohttp transport reports resets and refused
    connections as httpx ConnectTimeout, so the top-level type alone would call them timeouts."""
    if isinstance(exc, _Failure):
        return exc
    if isinstance(exc, openai.APIStatusError):
        status, after = exc.status_code, _retry_after(exc.response.headers)
        message = f"HTTP {status}: {exc.message}"[:500]
        if status == 429:
            return _Failure("rate_limit", message, after)
        if status >= 500:
            return _Failure("http_5xx", message, after)
        if status == 408:
            return _Failure("timeout", message, after)
        return _Failure("http_4xx", message)
    if isinstance(exc, (openai.APIConnectionError, httpx.TransportError)):
        root = _root_cause(exc)
        detail = f"{type(root).__name__}: {root}"[:500]
        if isinstance(root, TimeoutError):
            return _Failure("timeout", f"timed out ({detail})")
        if any(cls.__name__ in _TRUNCATION_ERRORS for cls in type(root).__mro__) or "message body" in str(root):
            return _Failure("stream_cut", f"response cut short ({detail})")
        if isinstance(root, OSError):
            return _Failure("connection", f"connection failed ({detail})")
        if isinstance(exc, (openai.APITimeoutError, httpx.TimeoutException)):
            return _Failure("timeout", f"timed out ({detail})")
        if isinstance(exc, openai.APIConnectionError):
            return _Failure("connection", f"connection failed ({detail})")
        return _Failure("stream_cut", f"stream broke off ({detail})")
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError, openai.APIResponseValidationError)):
        return _Failure("malformed", f"malformed response: {exc}"[:500])
    if isinstance(exc, openai.APIError):  # an error event inside a 200 stream (vLLM sends these)
        return _Failure("http_5xx", f"server error in stream: {exc}"[:500])
    return None


def _reasoning(message: dict[str, Any]) -> str:
    """vLLM's reasoning text (`reasoning_content`; newer releases call it `reasoning`)."""
    return message.get("reasoning_content") or message.get("reasoning") or ""


def _logprob_entries(logprobs: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"token": entry.get("token"), "logprob": entry.get("logprob"),
             "top_logprobs": [{"token": top.get("token"), "logprob": top.get("logprob")}
                              for top in entry.get("top_logprobs") or []]}
            for entry in (logprobs or {}).get("content") or []]


def _http_client(limits: Any, timeout: Any) -> Any:
    """openai's aiohttp transport (several times less CPU per request than its httpx pool at high
    concurrency), or its httpx client where aiohttp is not installed."""
    try:
        return openai.DefaultAioHttpClient(limits=limits, timeout=timeout)
    except RuntimeError:
        return openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)


class _Backend:
    """Per-endpoint client, concurrency slots and server-health bookkeeping."""

    def __init__(self, endpoint: Endpoint, concurrency: int, timeout_s: float, supervisor: Optional[Supervisor]):
        self.endpoint = endpoint
        timeout = httpx.Timeout(timeout_s, connect=min(30.0, timeout_s), pool=None)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = openai.AsyncOpenAI(
            base_url=endpoint.base_url, api_key=endpoint.api_key or "EMPTY", max_retries=0, timeout=timeout,
            http_client=_http_client(limits, timeout))
        self.slots = asyncio.Semaphore(concurrency)
        self.supervisor = supervisor
        self.health_lock = asyncio.Lock()
        self.health_checked_at = 0.0

    def describe(self) -> str:
        return f"{self.endpoint.role} endpoint {self.endpoint.base_url}"


class _JobState:
    def __init__(self, job: Job, backend: _Backend, progress: TaskProgress, run_id: str):
        self.job, self.backend, self.progress = job, backend, progress
        self.stats = RunStats(job.endpoint.role, job.task)
        self.params = job.params.to_dict()
        self.template = dict(run_id=run_id, role=job.endpoint.role, endpoint_id=job.endpoint.identity(),
                             task=job.task, params=self.params)
        self.pending = 0
        self.dispatched_all = False
        self.finished = False
        self.started = time.perf_counter()

    def record_for(self, item: Item) -> Record:
        if item.task != self.job.task:
            raise UserError(f"task {self.job.task}: item {item.item_id} says it belongs to task {item.task}")
        return Record(item_id=item.item_id, prompt_hash=item.prompt_hash(), **self.template)

    def maybe_finish(self) -> None:
        if self.dispatched_all and self.pending == 0 and not self.finished:
            self.finished = True
            self.stats.wall_s = time.perf_counter() - self.started
            self.progress.finish(self.stats.summary())


class Runner:
    def __init__(self, store: Store, run_id: str, concurrency: int = 16, request_timeout_s: float = 600.0,
                 max_attempts: int = 4, backoff_base_s: float = 0.5, backoff_max_s: float = 30.0,
                 progress: bool = True, supervisor_for: Optional[Callable[[str], Optional[Supervisor]]] = None):
        if concurrency < 1 or max_attempts < 1:
            raise UserError(f"runner: concurrency ({concurrency}) and max_attempts ({max_attempts}) must be >= 1")
        self.store, self.run_id = store, run_id
        self.concurrency, self.request_timeout_s, self.max_attempts = concurrency, request_timeout_s, max_attempts
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.progress = Progress(progress)
        self.supervisor_for = supervisor_for or (lambda role: None)
        self.supervisors: dict[str, Supervisor] = {}  # role -> supervisor; takes precedence over supervisor_for
        self._jitter = random.Random()

    # ------------------------------------------------------------------ public API

    def run(self, job: Job) -> RunStats:
        """Run one job to completion (blocking)."""
        return asyncio.run(self.run_jobs([job]))[(job.endpoint.role, job.task)]

    async def run_jobs(self, jobs: list[Job], interleave: bool = True,
                       concurrency: Optional[int] = None) -> dict[tuple[str, str], RunStats]:
        """Run all jobs; tasks go in order, roles concurrently, at most `concurrency` (default: the
        runner's) requests in flight per endpoint.  Raises UserError when an endpoint is down for good;
        whatever finished before that (or before a cancel) stays stored for the rerun."""
        concurrency = concurrency or self.concurrency
        seen = set()
        for job in jobs:
            key = (job.endpoint.role, job.task)
            if key in seen:
                raise UserError(f"runner: two jobs for role {key[0]} and task {key[1]}")
            seen.add(key)
        backends: dict[str, _Backend] = {}
        states = []
        for job in jobs:
            ident = job.endpoint.identity()
            if ident not in backends:
                role = job.endpoint.role
                supervisor = self.supervisors[role] if role in self.supervisors else self.supervisor_for(role)
                backends[ident] = _Backend(job.endpoint, concurrency, self.request_timeout_s, supervisor)
            total = job.total if job.total is not None else (len(job.items) if hasattr(job.items, "__len__") else None)
            states.append(_JobState(job, backends[ident], self.progress.task(job.endpoint.role, job.task, total),
                                    self.run_id))
        finished = self.store.finished_keys(self.run_id)
        self._inflight: set[asyncio.Task] = set()
        self._fatal: list[BaseException] = []
        lanes = [asyncio.create_task(self._lane(groups, finished)) for groups in self._plan_lanes(states, interleave)]
        self._lanes = lanes
        try:
            try:
                await asyncio.gather(*lanes)
            except asyncio.CancelledError:
                if not self._fatal:
                    raise
            while self._inflight and not self._fatal:
                await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
            if self._fatal:
                raise self._fatal[0]
        finally:
            leftovers = [*lanes, *self._inflight]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
            for state in states:
                if not state.finished:
                    state.progress.finish(f"stopped early; {state.stats.summary()}")
            await asyncio.gather(*(b.client.close() for b in backends.values()), return_exceptions=True)
        return {(s.job.endpoint.role, s.job.task): s.stats for s in states}

    # ------------------------------------------------------------------ scheduling

    @staticmethod
    def _plan_lanes(states: list[_JobState], interleave: bool) -> list[list[list[_JobState]]]:
        """Lanes of task groups: one lane for all roles when interleaving, else one lane per endpoint."""
        if interleave:
            groups: dict[str, list[_JobState]] = {}
            for state in states:
                groups.setdefault(state.job.task, []).append(state)
            return [list(groups.values())]
        lanes: dict[int, list[list[_JobState]]] = {}
        for state in states:
            lanes.setdefault(id(state.backend), []).append([state])
        return list(lanes.values())

    @staticmethod
    def _aligned(group: list[_JobState]) -> Iterator[tuple[Item, ...]]:
        """Items of a task group, one tuple per position; roles must see the same items in the same order."""
        if all(state.job.items is group[0].job.items for state in group):
            for item in group[0].job.items:
                yield (item,) * len(group)
            return
        iterators = [iter(state.job.items) for state in group]
        roles = [state.job.endpoint.role for state in group]
        position = 0
        while True:
            row = tuple(next(it, None) for it in iterators)
            if all(item is None for item in row):
                return
            for role, item in zip(roles, row):
                if item is None or row[0] is None or item.item_id != row[0].item_id:
                    raise UserError(f"task {group[0].job.task}: roles {', '.join(roles)} got different items at "
                                    f"position {position} (the {role} job has "
                                    f"{'none' if item is None else repr(item.item_id)})")
            position += 1
            yield row

    async def _lane(self, groups: list[list[_JobState]], finished: set[str]) -> None:
        for group in groups:
            for state in group:
                state.started = time.perf_counter()
            for row in self._aligned(group):
                for state, item in zip(group, row):
                    await self._dispatch(state, item, finished)
            for state in group:
                state.dispatched_all = True
                state.maybe_finish()

    async def _dispatch(self, state: _JobState, item: Item, finished: set[str]) -> None:
        record = state.record_for(item)
        if record.cache_key() in finished:
            state.stats.skipped += 1
            state.progress.advance()
            return
        self.store.put_item(self.run_id, item)
        await state.backend.slots.acquire()
        state.pending += 1
        state.stats.sent += 1
        task = asyncio.create_task(self._complete(state, item, record))
        self._inflight.add(task)
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None and not self._fatal:
            self._fatal.append(task.exception())
            for lane in self._lanes:
                lane.cancel()

    async def _complete(self, state: _JobState, item: Item, record: Record) -> None:
        try:
            await self._attempt_all(state.backend, item, record, state.job.params)
        finally:
            state.backend.slots.release()
            state.pending -= 1
        self.store.put_record(record)
        state.stats.attempts += record.attempts
        if record.ok:
            state.stats.ok += 1
        else:
            state.stats.errors[record.error_kind] = state.stats.errors.get(record.error_kind, 0) + 1
        state.progress.advance(error=not record.ok)
        state.maybe_finish()

    # ------------------------------------------------------------------ one item

    async def _attempt_all(self, backend: _Backend, item: Item, record: Record, params: GenParams) -> None:
        """Fill `record` with the answer, or with the last failure once retries are spent."""
        record.started_at = time.time()
        first = time.perf_counter()
        for attempt in range(1, self.max_attempts + 1):
            record.attempts = attempt
            try:
                await self._send(backend, item, record, params)
                return
            except Exception as exc:  # noqa: BLE001 - classified below; unknown kinds are re-raised
                failure = _classify(exc)
                if failure is None:
                    raise
            failed_at = time.monotonic()
            if failure.kind == "connection":
                await self._check_server(backend, failed_at)
            if not failure.retryable or attempt == self.max_attempts:
                break
            await asyncio.sleep(self._backoff(attempt, failure.retry_after))
        if failure.kind == "connection" and backend.supervisor is None:
            await self._confirm_reachable(backend)
        record.error, record.error_kind = str(failure) or failure.kind, failure.kind
        record.latency_s = time.perf_counter() - first

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        """Retry-After when the server sent one (up to backoff_max_s), else exponential with full jitter."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.backoff_max_s)
        return self._jitter.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1)))

    async def _check_server(self, backend: _Backend, failed_at: float) -> None:
        """After a connection failure, let the supervisor restart a dead server (once for all the
        requests that failed together); its UserError ends the run."""
        if backend.supervisor is None:
            return
        async with backend.health_lock:
            if backend.health_checked_at > failed_at:
                return
            await asyncio.to_thread(backend.supervisor.ensure_alive)
            backend.health_checked_at = time.monotonic()

    async def _confirm_reachable(self, backend: _Backend) -> None:
        """Without a supervisor: an item that failed for good on connection errors ends the run if the
        server no longer answers at all (down for good), else it is just this item's failure."""
        try:
            await backend.client.models.list(timeout=min(10.0, self.request_timeout_s))
        except openai.APIStatusError:
            return  # it answers, if unhappily
        except (openai.APIConnectionError, httpx.TransportError) as exc:
            raise UserError(f"{backend.describe()} is unreachable ({exc.__cause__ or exc!r}); finished items are "
                            f"stored, rerun the same command to resume") from exc

    async def _send(self, backend: _Backend, item: Item, record: Record, params: GenParams) -> None:
        # The client's generic post: the typed create() spends more CPU on building and validating
        # pydantic objects than the whole request costs against a fast server.
        # The body goes as bytes: the client deep-copies a dict body, images and all, on every attempt.
        body = {"model": backend.endpoint.model, "messages": item.messages, **params.request_kwargs()}
        body.update(body.pop("extra_body", {}))
        if params.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        start = time.perf_counter()
        if not params.stream:
            response = await backend.client.post("/chat/completions", cast_to=object, **{_RAW_BODY_ARG: payload})
            end = time.perf_counter()
            choices = response.get("choices") if isinstance(response, dict) else None
            choice = choices[0] if isinstance(choices, list) and choices else None
            message = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(message, dict):
                raise _Failure("malformed", f"response has no choices[0].message: {response!r}"[:500])
            logprobs = _logprob_entries(choice.get("logprobs")) if params.logprobs else None
            self._fill(record, message.get("content") or "", _reasoning(message), choice.get("finish_reason"),
                       response.get("usage"), logprobs, end - start, None, [])
            return

        stream = await backend.client.post("/chat/completions", cast_to=object, stream=True,
                                           stream_cls=openai.AsyncStream[object], **{_RAW_BODY_ARG: payload})
        content: list[str] = []
        reasoning: list[str] = []
        logprobs: Optional[list[dict[str, Any]]] = [] if params.logprobs else None
        itl: list[float] = []
        ttft = last_token = None
        finish, usage, end = "", None, start
        try:
            async for chunk in stream:
                now = time.perf_counter()
                if not isinstance(chunk, dict):
                    raise _Failure("malformed", f"stream chunk is not an object: {chunk!r}"[:500])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    end = now
                    delta = choice.get("delta") or {}
                    text, think = delta.get("content") or "", _reasoning(delta)
                    if text or think:
                        if ttft is None:
                            ttft = now - start
                        else:
                            itl.append(now - last_token)
                        last_token = now
                        content.append(text)
                        reasoning.append(think)
                    if logprobs is not None:
                        logprobs.extend(_logprob_entries(choice.get("logprobs")))
                    finish = choice.get("finish_reason") or finish
        finally:
            await stream.close()
        if not finish:
            raise _Failure("stream_cut", "stream ended without a finish_reason")
        self._fill(record, "".join(content), "".join(reasoning), finish, usage, logprobs, end - start, ttft, itl)

    @staticmethod
    def _fill(record: Record, text: str, reasoning: str, finish: Optional[str], usage: Optional[dict],
              logprobs: Optional[list], latency: float, ttft: Optional[float], itl: list[float]) -> None:
        record.response_text, record.reasoning_content, record.finish_reason = text, reasoning, finish or ""
        record.prompt_tokens = (usage or {}).get("prompt_tokens") or 0
        record.completion_tokens = (usage or {}).get("completion_tokens") or 0
        record.logprobs, record.latency_s, record.ttft_s, record.itl_s = logprobs, latency, ttft, itl
        record.error = record.error_kind = ""
