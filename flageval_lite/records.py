"""Typed records passed between the pipeline stages.

Data flows one way:

    RunConfig/ServeSpec -> (servers) Endpoint -> (tasks) Item -> (runner) Record
        -> (scoring) Score -> (compare) TaskComparison/Comparison -> (report) files

Each stage imports the records it consumes and produces from here and never reaches back into
an earlier stage's module.  Records are plain dataclasses so that they serialise to JSON and SQLite
without surprises (`to_dict` / `from_dict`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from .schema import checked

ROLES = ("reference", "candidate")
Role = Literal["reference", "candidate"]
# Names the pipeline stores under and the analysis reads back.
AA_ROLE = "reference_repeat"  # the reference asked again, for the A/A noise floor
PERF_TASK_PREFIX = "perf@c"
# Each perf load is preceded by one unmeasured wave of this prefix (see Pipeline.after_main); its records are no
# samples.
PERF_WARMUP_PREFIX = "perf-warmup@c"
ENDPOINTS_META = "endpoint_ids"  # role -> Endpoint.identity() of the servers the latest run of the role started


_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode


def stable_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON form of `obj` (sorted keys, no whitespace), hex, 16 chars."""
    blob = _canonical(obj)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class _Serialisable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------- run spec stage


@dataclass(frozen=True)
class FlagGemsSpec(_Serialisable):
    """How (and whether) FlagGems is switched on inside a server.

    route: "off"       -- native operators; every known route is switched off positively.
           "plugin"    -- our own vLLM general plugin calls flag_gems.enable()/only_enable().
           "fl"        -- vllm-plugin-FL (VLLM_PLUGINS=fl, USE_FLAGGEMS=1).
           "flagscale" -- FlagScale's patched vLLM (USE_FLAGGEMS=1).
           "embedded"  -- the embedded server's `--ops flaggems`.
    """

    route: str = "off"
    include: tuple[str, ...] = ()  # only_enable(include=...) when non-empty
    exclude: tuple[str, ...] = ()  # enable(unused=...)
    record: bool = True  # write a per-process op log


@dataclass(frozen=True)
class ServeSpec(_Serialisable):
    """One backend: what to start (or where to find it) and how to talk to it."""

    name: str  # human label, e.g. "native-cuda" or "flaggems"
    engine: str  # embedded | vllm | flagscale | external | stub
    model: str = ""  # local path / hub id; "" = the engine's default model
    served_model_name: str = ""  # "" = derived from the model
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port at start
    # external engine: http://host:port/v1, or a tuple of such URLs (one replica each)
    base_url: Union[str, tuple[str, ...]] = ""
    api_key: str = "EMPTY"
    dtype: str = "auto"
    device: str = "auto"
    ops: str = "aten"  # aten | flaggems (the operator stack, as the report shows it)
    flaggems: FlagGemsSpec = field(default_factory=FlagGemsSpec)
    args: tuple[str, ...] = ()  # extra engine flags passed through verbatim
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables
    gpu_memory_utilization: float = 0.0  # 0 = engine default
    cuda_visible_devices: str = ""
    # vLLM's own parallelism, passed through; a comparison needs the same values on both sides.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    startup_timeout_s: float = 900.0
    warmup: bool = True
    max_restarts: int = 2
    # identical servers of this backend (external: one per base_url); the runner spreads items over them
    replicas: int = 1
    source: str = ""  # the file this spec came from, for error messages


@dataclass(frozen=True)
class GenParams(_Serialisable):
    """Sampling parameters sent with every request of a task (identical for both backends)."""

    temperature: float = checked(0.0, low=0)
    top_p: Optional[float] = checked(None, above=0, high=1)
    max_tokens: int = checked(512, low=1)
    seed: Optional[int] = 0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: Optional[int] = checked(None, low=0, high=20)  # OpenAI's and vLLM's default upper bound
    stream: bool = True
    extra_body: tuple[tuple[str, Any], ...] = ()  # e.g. (("chat_template_kwargs", {...}),)

    def for_repeat(self, repeat: int) -> "GenParams":
        """The parameters of repeat `repeat` (0-based): its own seed, `seed + repeat`, so that sampled repeats
        differ from one another yet each one is reproducible and the same on both backends."""
        if repeat == 0 or self.seed is None:
            return self
        return dataclasses.replace(self, seed=self.seed + repeat)

    def request_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `client.chat.completions.create` (model/messages excluded)."""
        kw: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.top_p is not None:
            kw["top_p"] = self.top_p
        if self.seed is not None:
            kw["seed"] = self.seed
        if self.stop:
            kw["stop"] = list(self.stop)
        if self.logprobs:
            kw["logprobs"] = True
            if self.top_logprobs:
                kw["top_logprobs"] = self.top_logprobs
        if self.extra_body:
            kw["extra_body"] = dict(self.extra_body)
        return kw


# --------------------------------------------------------------------------- server stage


@dataclass(frozen=True)
class Endpoint(_Serialisable):
    """A live OpenAI-compatible server, as the runner sees it."""

    role: str  # reference | candidate
    label: str  # ServeSpec.name
    base_url: str  # ends in /v1
    model: str  # served model name
    api_key: str = "EMPTY"
    server_version: str = ""
    # Hash of the serve spec for managed servers, whose port changes at every start; a rerun after a
    # crash must find its answers again, so the identity rests on what was started, not where.
    spec_id: str = ""

    def identity(self) -> str:
        """Part of every cache key: two endpoints never share an answer."""
        return stable_hash([self.role, self.spec_id or self.base_url, self.model, self.server_version])


@dataclass
class ServerEvidence(_Serialisable):
    """What a started server proved about itself; goes into the run manifest and the report."""

    role: str
    spec: dict[str, Any]
    command: list[str] = field(default_factory=list)
    env_switches: dict[str, str] = field(default_factory=dict)
    # GET /version; the embedded server's carries its `batching` block (mode, max_batch, row_multiple,
    # row_invariant) and `warnings` (batching without a proven row multiple)
    version: dict[str, Any] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)  # GET /v1/models ids
    packages: dict[str, str] = field(default_factory=dict)  # seen inside the server process
    gpu: str = ""
    ops_registered: list[str] = field(default_factory=list)
    ops_called: list[str] = field(default_factory=list)
    startup_s: float = 0.0
    warmup_s: float = 0.0
    log_path: str = ""
    restarts: int = 0


# --------------------------------------------------------------------------- task stage


@dataclass(frozen=True)
class Item(_Serialisable):
    """One benchmark question, ready to send.

    `messages` are OpenAI chat messages; image parts hold data URLs.  Loaders yield items one at a
    time so a 10k-item multimodal task never sits in memory at once.
    """

    task: str
    item_id: str
    messages: list[dict[str, Any]]
    gold: Any
    meta: dict[str, Any] = field(default_factory=dict)  # subject, question_type, options, ...
    # Non-empty: the row could not become a request (a missing image, a template that fails on it).  Such an item
    # is never sent; each side stores it as a `bad_item` error, so it is counted and left out of the pairs.
    error: str = ""

    def prompt_hash(self) -> str:
        return stable_hash(self.messages)


# --------------------------------------------------------------------------- runner / store stage

ErrorKind = Literal["", "timeout", "connection", "http_4xx", "http_5xx", "rate_limit", "malformed", "stream_cut",
                    "wrong_model", "empty_choices", "bad_item"]
# The error kind of an item whose data is at fault (Item.error at build time, a gold the scorer cannot read).
BAD_ITEM = "bad_item"
# ScoreResult.detail keys by which a scorer says that *it* failed, not the answer (judge unreachable, sandbox not
# started, a library the benchmark's own scoring environment has missing from ours), and the error kind of each:
# the Score's error reads "<kind>: <detail>".
SCORER_FAULTS = {"judge_error": "judge", "sandbox_error": "sandbox", "environment_error": "environment"}
# What the report counts of an LLM judge's work per side and task (scoring/judge.py tally_judging).
JUDGING_COUNTS = ("graded", "runs", "reasked", "gave_up", "faults", "no_verdict")


@dataclass
class Record(_Serialisable):
    """One finished request (successful or failed), as stored durably by the runner."""

    run_id: str
    role: str
    endpoint_id: str  # Endpoint.identity()
    task: str
    item_id: str
    prompt_hash: str
    params: dict[str, Any]  # GenParams.to_dict()
    response_text: str = ""
    reasoning_content: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: Optional[list[dict[str, Any]]] = None  # [{token, logprob, top_logprobs:[{token, logprob}]}]
    latency_s: float = 0.0  # end-to-end
    ttft_s: Optional[float] = None
    itl_s: list[float] = field(default_factory=list)  # gaps between content chunks (streaming)
    attempts: int = 1
    error: str = ""  # non-empty = infrastructure failure, never a model answer
    error_kind: str = ""
    started_at: float = 0.0
    # The error kind of every failed attempt, in order (the last one is `error_kind` when the item failed for good)
    attempt_errors: list[str] = field(default_factory=list)
    repeat: int = 0  # which of the task's `repeats` this is (0-based); its seed is in `params`

    @property
    def ok(self) -> bool:
        return not self.error

    def cache_key(self) -> str:
        # Repeat 0 keeps the key of a run without repeats, so such runs resume as they always did.
        key: list[Any] = [self.endpoint_id, self.task, self.item_id, self.prompt_hash, self.params]
        return stable_hash(key + [self.repeat] if self.repeat else key)


# --------------------------------------------------------------------------- scoring stage

# How an item's repeats make its one Score: avg (avg@k, the mean) or pass (pass@k, any repeat right).
REPEAT_AGGREGATES = ("avg", "pass")

Outcome = Literal["correct", "wrong", "partial", "unparsed", "error"]


@dataclass(frozen=True)
class ScoreResult(_Serialisable):
    """What a scorer function returns for one response.

    value:     the item's score in [0, 1] (binary tasks use exactly 0.0 / 1.0)
    extracted: the answer the scorer read out of the response ("" when nothing could be read)
    parsed:    False when no answer could be extracted -> outcome "unparsed", value 0
    """

    value: float
    extracted: str = ""
    parsed: bool = True
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Score(_Serialisable):
    """A scored record: the unit the comparison stage pairs across backends."""

    role: str
    task: str
    item_id: str
    value: float
    outcome: str  # Outcome
    extracted: str = ""
    gold: str = ""
    response_text: str = ""
    finish_reason: str = ""
    completion_tokens: int = 0
    latency_s: float = 0.0
    ttft_s: Optional[float] = None
    error: str = ""
    group: str = ""  # sub-category for per-group breakdowns (subject, LiveBench category, ...)
    # Repeats of the item that were answered and make up `value` (their mean, or pass@k); 0 when all failed
    repeats: int = 1
    detail: dict[str, Any] = field(default_factory=dict)  # the scorer's ScoreResult.detail (judge runs, tests run)


# --------------------------------------------------------------------------- comparison stage


@dataclass
class Interval(_Serialisable):
    low: float
    high: float


@dataclass
class TaskComparison(_Serialisable):
    """Paired statistics of one benchmark row.  Scores and deltas are in points (0-100)."""

    task: str
    title: str  # row name as in the model card
    n: int
    binary: bool
    reference_score: float
    candidate_score: float
    reference_ci: Interval
    candidate_ci: Interval
    delta: float  # candidate - reference
    delta_ci: Interval  # paired 95 %
    delta_ci90: Interval  # for TOST
    p_value: float  # McNemar exact (binary) or paired permutation/bootstrap (graded)
    p_holm: float
    flips_ref_only: int  # reference right, candidate wrong
    flips_cand_only: int
    answer_agreement: float  # extracted answers equal, fraction
    output_agreement: float  # response texts identical, fraction
    mde: float  # minimum detectable effect, points
    equivalent: bool  # TOST at margin
    within_release_gate: bool  # drop <= release_gate points
    verdict: str  # consistent | inconclusive | regression | improvement
    errors_reference: int = 0
    errors_candidate: int = 0
    unparsed_reference: int = 0
    unparsed_candidate: int = 0
    divergence: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class PerfSummary(_Serialisable):
    """Per-backend latency/throughput with `vllm bench serve` definitions."""

    role: str
    requests: int
    duration_s: float
    ttft_ms_p50: Optional[float] = None
    ttft_ms_p99: Optional[float] = None
    tpot_ms_p50: Optional[float] = None
    tpot_ms_p99: Optional[float] = None
    itl_ms_p50: Optional[float] = None
    itl_ms_p99: Optional[float] = None
    e2el_ms_p50: Optional[float] = None
    e2el_ms_p99: Optional[float] = None
    output_tok_s: float = 0.0
    request_s: float = 0.0
