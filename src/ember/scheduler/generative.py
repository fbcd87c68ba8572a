"""The serving loop of one generative model: admit, seat, stream, learn.

A generative request lives for many decode steps, so it is not batched here: the worker batches
every sequence it runs, step by step (continuous batching). The runner decides who may start and
where. :meth:`GenerativeRunner.generate` is an async generator of the worker's chunks:

1. *Admission* (``policies.token_admission``), when the deployment refuses unmeetable requests or
   the caller gave a timeout: the predicted time to first token (the wait for a load or a seat, then
   the prefill of its predicted prompt tokens) must fit the TTFT objective (or the timeout), and the
   running batch with it added must stay within the TPOT objective. Otherwise DeadlineUnmeetable
   (429) at once, with ``Retry-After``; a refusal of a model that is not hot starts its promotion.
   A refusal by measured speed is never permanent: a probe is admitted when that evidence is due.
   With ``on_unmeetable="best_effort"`` (and no timeout) every request is served, late if need be.
2. *A seat.* Each hot instance runs at most ``max_num_seqs`` sequences, holding at most its KV
   budget in tokens. Requests wait first come, first served for a seat (at most ``max_queue`` of
   them wait; more are Overloaded, 503); a model that is not hot is promoted through the same
   promoter the one-shot runner uses (shared with every caller), and a waiting request whose first
   token can no longer come in time is refused then (in refuse mode, or past its timeout), not at
   the load's end. The instance is the one with a free seat running the fewest sequences, then with
   the most KV room, then by id.
3. *The stream.* Chunks pass through as the worker yields them; closing the iterator early (a client
   that left) closes the worker's stream, which cancels the sequence there. A worker that dies
   before the first token is retried once elsewhere; after it, the stream ends with the error.
4. *Learning.* The first chunk gives the prompt's real token count (the bytes -> tokens ratio) and its
   prefill time (from dispatch to first token; not on an instance's first stream after a load); each
   later chunk a decode step time at the batch size and mean context running there then; each end
   the answer's length. All feed the model's :class:`TokenLatencyModel`.

The timeout a caller gives bounds the time to the first token. While a stream runs, the model is
busy: the controller does not demote it, and an instance moved away is unloaded only after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

from ember.clock import Clock
from ember.cluster.base import WorkerHandle
from ember.config import Deployment
from ember.errors import DeadlineUnmeetable, EmberError, InvalidInput, Overloaded, WorkerCrashed
from ember.generation import GenerateRequest, SamplingParams, TokenChunk
from ember.metrics import Metrics
from ember.policies._frozen import evolve
from ember.policies.batching import BatchPolicy
from ember.policies.latency import LatencyModel
from ember.policies.tiers import Tier
from ember.policies.token_admission import TokenAdmission, TokenRequest, token_admission
from ember.policies.token_latency import TokenLatencyModel
from ember.scheduler.refusals import late, unmeetable
from ember.scheduler.runner import MAX_IDLE_GAPS, Promoter
from ember.state import GenerationStatistics, Measured, RunnerStatistics, choose_seat, token_request

__all__ = ["GenerativeRunner"]

_log = logging.getLogger(__name__)

#: Seconds of output counted in ``tokens_per_s``.
RATE_WINDOW_S = 60
#: What the deploy-time warm-up generates: a short prompt, a few greedy tokens.
WARMUP_PROMPT = "Hello! Please say something short."
WARMUP_TOKENS = 8


class _Generates(Protocol):
    """The worker handle's ``generate`` (``cluster.base.WorkerHandle``)."""

    def generate(self, key: str, request: GenerateRequest) -> AsyncIterator[TokenChunk]: ...


@dataclass(eq=False)
class _Sequence:
    """One admitted request, from admission until its stream ends."""

    request: GenerateRequest
    arrival: float
    #: When its first token is due (TTFT objective or the caller's timeout).
    deadline: float
    hard: bool
    #: Refused while waiting once its first token can no longer come in time.
    strict: bool
    #: Predicted prompt tokens until the first chunk says, then the real count.
    prompt_tokens: int
    completion_tokens: int = 0
    first_at: float | None = None
    last_at: float = 0.0
    finish: str | None = None

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def max_tokens(self) -> int:
        return self.request.params.max_tokens


@dataclass
class _Counters:
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    slo_met: int = 0
    answered: int = 0
    ttft_met: int = 0
    tpot_met: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    last_active: float = 0.0


class GenerativeRunner:
    """Admission, seats and streams of one generative model (the module's doc says how)."""

    def __init__(self, deployment: Deployment, clock: Clock, promoter: Promoter, metrics: Metrics) -> None:
        self.deployment = deployment
        self._clock = clock
        self._promoter = promoter
        self._metrics = metrics
        self._model = TokenLatencyModel()
        self._stats = _Counters(last_active=clock.now())
        #: Sequences running, by instance id; when each busy instance last became busy.
        self._running: dict[str, list[_Sequence]] = {}
        self._busy_since: dict[str, float] = {}
        self._busy_s: dict[str, float] = {}
        self._idle_gaps: list[float] = []
        #: Requests waiting for a seat, first come first served.
        self._waiting: deque[_Sequence] = deque()
        #: Set (then replaced) when a seat frees, an instance comes or goes, or the runner stops.
        self._changed = asyncio.Event()
        #: Instances loaded since their last stream: that first prefill is not a steady one.
        self._fresh: set[str] = set()
        #: Output tokens per whole second, for ``tokens_per_s``.
        self._rate: deque[tuple[int, int]] = deque()
        name = deployment.name
        # Each metric's child for this model, looked up once.
        self._ttft = metrics.ttft.labels(name)
        self._tpot = metrics.tpot.labels(name)
        self._e2e = metrics.e2e.labels(name)
        self._prompt_counter = metrics.prompt_tokens.labels(name)
        self._generation_counter = metrics.generation_tokens.labels(name)
        self._running_gauge = metrics.running.labels(name)
        self._waiting_gauge = metrics.waiting.labels(name)
        self._slo_total = metrics.slo_total.labels(name)
        self._slo_met = metrics.slo_met.labels(name)
        self._slo_attainment = metrics.slo_attainment.labels(name)
        self._stopped: EmberError | None = None
        #: Warm-up streams running (they keep the model busy, as requests do).
        self._warming = 0

    # -- what the controller and the service ask (``state.Runner``) ---------------------------------

    @property
    def latency(self) -> LatencyModel:
        """Decode steps by batch size and the loads per tier, as a one-shot model's latency model."""
        return self._model.steps

    @property
    def tokens(self) -> TokenLatencyModel:
        """The token latency model as measured so far."""
        return self._model

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._warming) or any(self._running.values())

    def restore_latency(self, latency: LatencyModel) -> None:
        self._model = evolve(self._model, steps=latency)

    def observe_load(self, tier: Tier, seconds: float) -> None:
        self._model = self._model.observe_load(tier, seconds)

    def instance_loaded(self, instance_id: str) -> None:
        self._fresh.add(instance_id)
        self._notify()

    def update(self, deployment: Deployment) -> None:
        self.deployment = deployment

    def set_policy(self, policy: BatchPolicy) -> None:
        """Generative models are batched by their worker, step by step: no batching policy applies."""

    def start(self) -> None:
        self._stopped = None

    async def stop(self, error: EmberError) -> None:
        """Refuse what waits with ``error``; running streams end with it at their next chunk."""
        self._stopped = error
        self._notify()

    def statistics(self) -> RunnerStatistics:
        s = self._stats
        running = sum(len(seqs) for seqs in self._running.values()) + self._warming
        generation = GenerationStatistics(
            answered=s.answered,
            ttft_met=s.ttft_met,
            tpot_met=s.tpot_met,
            prompt_tokens=s.prompt_tokens,
            generation_tokens=s.generation_tokens,
            tokens_per_s=self._tokens_per_s(),
            running=running,
            waiting=len(self._waiting),
        )
        return RunnerStatistics(
            requests=s.requests,
            succeeded=s.succeeded,
            failed=s.failed,
            slo_met=s.slo_met,
            rows=s.generation_tokens,
            last_active=s.last_active,
            queued=len(self._waiting),
            running=running,
            busy_instances=frozenset(i for i, seqs in self._running.items() if seqs),
            latency=self._model.steps,
            generation=generation,
        )

    def drain(self) -> Measured:
        now = self._clock.now()
        for instance, since in self._busy_since.items():
            self._busy_s[instance] = self._busy_s.get(instance, 0.0) + now - since
            self._busy_since[instance] = now
        measured = Measured(tuple(self._idle_gaps), self._busy_s)
        self._idle_gaps, self._busy_s = [], {}
        return measured

    # -- requests ----------------------------------------------------------------------------------

    async def generate(
        self, request: GenerateRequest, timeout_s: float | None = None
    ) -> AsyncGenerator[TokenChunk, None]:
        """The request's chunks as the worker makes them (see the module's doc); refusals raise before
        the first chunk."""
        if self._stopped is not None:
            raise self._stopped
        self._check(request)
        seq = self._admit(request, timeout_s)
        done = False
        try:
            for attempt in (0, 1):
                instance = await self._seat(seq)
                stream = self._stream(instance, seq)
                try:
                    async for chunk in stream:
                        # Ran to its end once its finish comes: the consumer may close the stream there.
                        done = done or chunk.finish_reason is not None
                        yield chunk
                    done = True
                    return
                except WorkerCrashed as exc:
                    self._promoter.lost_instance(self.deployment.name, instance)
                    if seq.first_at is not None or attempt:
                        raise
                    _log.warning("retrying a sequence of %s elsewhere: %s", self.deployment.name, exc.message)
                finally:
                    await stream.aclose()  # a consumer that left: the worker's sequence is cancelled now
        finally:
            self._account(seq, done)

    async def warm_up(self, instance: WorkerHandle, sizes: tuple[int, ...] = ()) -> int:
        """Generate a few greedy tokens on ``instance`` to seed the token latency model (as synthetic
        evidence: it shapes predictions, never a refusal); twice on a fresh instance, the first not
        counted. Returns the streams measured; a model that refuses the warm-up is left alone."""
        request = GenerateRequest(SamplingParams(WARMUP_TOKENS, temperature=0.0, ignore_eos=True), prompt=WARMUP_PROMPT)
        runs = 2 if instance.id in self._fresh else 1
        self._fresh.discard(instance.id)
        measured = 0
        self._warming += 1  # busy meanwhile: not demoted under its own warm-up
        try:
            for run in range(runs):
                seq = _Sequence(request, self._clock.now(), math.inf, False, False, 1)
                try:
                    async for chunk in cast(_Generates, instance).generate(self.deployment.key, request):
                        self._learn(seq, chunk, 1, first_counts=run == runs - 1, warmup=True)
                except EmberError as exc:
                    _log.info("the warm-up of %s stopped: %s", self.deployment.name, exc.message)
                    break
                measured += run == runs - 1
        finally:
            self._warming -= 1
            self._stats.last_active = self._clock.now()
        return measured

    def _check(self, request: GenerateRequest) -> None:
        # max_tokens == max_model_len is the gateway's default for a request that asks for no limit:
        # the sequence runs until prompt and answer fill the model's length, then ends with "length".
        limit = self.deployment.max_model_len
        if limit is not None and request.params.max_tokens > limit:
            raise InvalidInput(
                f"max_tokens is {request.params.max_tokens}, but model '{self.deployment.name}' holds at most "
                f"{limit} tokens of prompt and answer together (its max_model_len); ask for fewer tokens"
            )

    def _admit(self, request: GenerateRequest, timeout_s: float | None) -> _Sequence:
        d = self.deployment
        now = self._clock.now()
        hard = timeout_s is not None
        deadline = now + (timeout_s if timeout_s is not None else d.ttft_slo_ms / 1000.0)
        tokens = self._model.prompt_tokens(request.size_hint())
        strict = hard or d.on_unmeetable == "refuse"
        if strict:
            view = self._view(now, deadline, tokens)
            decided = token_admission(view, self._model)
            if decided.verdict == "refuse":
                self._refused(view, decided)
                raise self._unmeetable(view, decided, hard)
            strict = decided.verdict == "admit" or hard
        if len(self._waiting) >= d.max_queue:
            raise Overloaded(
                f"model '{d.name}' has {len(self._waiting)} requests waiting for a seat (its limit, --max-queue); "
                "retry after the Retry-After delay or deploy it with a larger --max-queue",
                retry_after_s=1.0,
            )
        if not self.busy and self._stats.requests and len(self._idle_gaps) < MAX_IDLE_GAPS:
            self._idle_gaps.append(now - self._stats.last_active)
        self._stats.requests += 1
        self._stats.last_active = now
        return _Sequence(request, now, deadline, hard, strict, tokens)

    def _view(self, now: float, deadline: float, tokens: int) -> TokenRequest:
        """Admission's view of a request of ``tokens`` arriving ``now`` (``state.token_request``)."""
        d = self.deployment
        hot = self._promoter.hot_instances(d.name)
        return token_request(
            now,
            deadline,
            d.tpot_slo_ms / 1000.0,
            tokens,
            self._model,
            instances={w.id: self._running.get(w.id, []) for w in hot},
            waiting=len(self._waiting),
            max_num_seqs=d.max_num_seqs,
            kv_tokens=self._kv_tokens,
            load_s=0.0 if hot else self._promoter.start_delay_s(d.name),
        )

    def _choose(self, hot: tuple[WorkerHandle, ...], tokens: int) -> WorkerHandle | None:
        """The instance a sequence of ``tokens`` starts on now (``state.choose_seat``), or None."""
        by_id = {w.id: w for w in hot}
        running = {w.id: self._running.get(w.id, []) for w in hot}
        chosen = choose_seat(running, tokens, self.deployment.max_num_seqs, self._kv_tokens)
        return None if chosen is None else by_id[chosen]

    @property
    def _kv_tokens(self) -> int:
        """The KV budget of one instance, in tokens: every seat at full length."""
        d = self.deployment
        return d.max_num_seqs * (d.max_model_len or 0)

    async def _seat(self, seq: _Sequence) -> WorkerHandle:
        """Wait for a seat on a hot instance, first come first served; promote the model if none is hot."""
        name = self.deployment.name
        self._waiting.append(seq)
        self._waiting_gauge.set(len(self._waiting))
        try:
            while True:
                if self._stopped is not None:
                    raise self._stopped
                hot = self._promoter.hot_instances(name)
                if not hot:
                    promotion = asyncio.ensure_future(self._promoter.ensure_hot(name))
                    try:
                        await self._wait(seq, promotion)
                        if promotion.done():
                            promotion.result()  # a failed promotion fails the request
                    finally:
                        if not promotion.done():
                            promotion.cancel()  # the promotion itself is shielded: it goes on
                    continue
                if self._waiting[0] is seq:
                    instance = self._choose(hot, seq.prompt_tokens)
                    if instance is not None:
                        return instance
                await self._wait(seq)
        finally:
            self._waiting.remove(seq)
            self._notify()

    async def _wait(self, seq: _Sequence, also: asyncio.Future[Any] | None = None) -> None:
        """Until something changes or ``also`` ends; a strict request whose first token can no longer
        come in time is refused (its latest start: the deadline less what its prefill is known to take)."""
        latest = seq.deadline - self._model.admission_prefill_s(seq.prompt_tokens) if seq.strict else math.inf
        now = self._clock.now()
        if now >= latest:
            raise self._late(seq)
        changed = asyncio.ensure_future(self._changed.wait())
        mine: list[asyncio.Future[Any]] = [changed]
        if math.isfinite(latest):
            mine.append(asyncio.ensure_future(self._clock.sleep(latest - now)))
        try:
            await asyncio.wait([*mine, *([also] if also is not None else [])], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in mine:
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter

    async def _stream(self, instance: WorkerHandle, seq: _Sequence) -> AsyncGenerator[TokenChunk, None]:
        """The worker's chunks for ``seq`` on ``instance``, learned from; the seat is held meanwhile."""
        now = self._clock.now()
        running = self._running.setdefault(instance.id, [])
        if not running:
            self._busy_since[instance.id] = now
        running.append(seq)
        self._running_gauge.inc()
        fresh = instance.id in self._fresh
        self._fresh.discard(instance.id)
        seq.last_at = now  # dispatched: the prefill time counts from here
        stream = cast(_Generates, instance).generate(self.deployment.key, seq.request)
        try:
            async for chunk in stream:
                context = sum(s.context for s in running) // len(running)
                self._learn(seq, chunk, len(running), context, first_counts=not fresh)
                yield chunk
                if self._stopped is not None:
                    raise self._stopped
        finally:
            if isinstance(stream, AsyncGenerator):  # closing it cancels the sequence on the worker
                with contextlib.suppress(EmberError):
                    await stream.aclose()
            running.remove(seq)
            if not running:
                end = self._clock.now()
                self._busy_s[instance.id] = (
                    self._busy_s.get(instance.id, 0.0) + end - self._busy_since.pop(instance.id, end)
                )
            self._stats.last_active = self._clock.now()
            self._notify()

    def _learn(
        self,
        seq: _Sequence,
        chunk: TokenChunk,
        batch: int,
        context: int = 0,
        *,
        first_counts: bool,
        warmup: bool = False,
    ) -> None:
        """Fold what ``chunk`` says into the token latency model and the counters; ``batch`` sequences ran
        with ``context`` tokens each on average (0: ``seq``'s own)."""
        now = self._clock.now()
        model = self._model
        new = max(0, chunk.completion_tokens - seq.completion_tokens)
        if seq.first_at is None:
            seq.first_at = now
            if chunk.prompt_tokens:
                model = model.observe_prompt(seq.request.size_hint(), chunk.prompt_tokens)
                seq.prompt_tokens = chunk.prompt_tokens
                if not warmup:
                    self._stats.prompt_tokens += chunk.prompt_tokens
                    self._prompt_counter.inc(chunk.prompt_tokens)
            if first_counts:
                model = model.observe_prefill(seq.prompt_tokens, now - seq.last_at, now, warmup=warmup)
            if not warmup:
                self._ttft.observe(now - seq.arrival)
        elif new:
            per_token = (now - seq.last_at) / new
            model = model.observe_step(batch, context or seq.context, per_token, now, warmup=warmup)
            if not warmup:
                for _ in range(new):
                    self._tpot.observe(per_token)
        if chunk.finish_reason is not None and not warmup:  # the warm-up's length is its own choice
            model = model.observe_completion(chunk.completion_tokens)
            seq.finish = chunk.finish_reason
        self._model = model
        seq.completion_tokens = max(seq.completion_tokens, chunk.completion_tokens)
        seq.last_at = now
        if new and not warmup:
            self._stats.generation_tokens += new
            self._generation_counter.inc(new)
            self._count_rate(now, new)

    # -- accounting --------------------------------------------------------------------------------

    def _account(self, seq: _Sequence, done: bool) -> None:
        """Count a stream that ended: done (to its finish), or not (failed, or its client left).

        Attainment counts the streams that ran to their end and those that failed before their first
        token (against both objectives); a stream whose client left after tokens came is not judged."""
        s = self._stats
        if not done:
            s.failed += 1
            if seq.first_at is None:
                self._judge(False, False)
            return
        s.succeeded += 1
        d = self.deployment
        assert seq.first_at is not None
        ttft_ok = seq.first_at - seq.arrival <= d.ttft_slo_ms / 1000.0
        tokens = seq.completion_tokens
        tpot_ok = tokens <= 1 or (seq.last_at - seq.first_at) / (tokens - 1) <= d.tpot_slo_ms / 1000.0
        self._judge(ttft_ok, tpot_ok)
        self._e2e.observe(seq.last_at - seq.arrival)
        if seq.finish in ("stop", "length"):
            self._metrics.request_success.labels(d.name, seq.finish).inc()

    def _judge(self, ttft_ok: bool, tpot_ok: bool) -> None:
        s = self._stats
        s.answered += 1
        s.ttft_met += ttft_ok
        s.tpot_met += tpot_ok
        s.slo_met += ttft_ok and tpot_ok
        self._slo_total.inc()
        if ttft_ok and tpot_ok:
            self._slo_met.inc()
        self._slo_attainment.set(s.slo_met / s.answered)

    def _refused(self, view: TokenRequest, decided: TokenAdmission) -> None:
        """Count a refusal at admission (against both objectives), and on the evidence that justified it."""
        if decided.on == "ttft" and decided.too_slow:
            self._model = self._model.observe_refusal_prefill(view.prompt_tokens)
        elif decided.on == "tpot":
            self._model = self._model.observe_refusal_step(view.batch + 1, view.context)
        self._stats.requests += 1
        self._stats.failed += 1
        self._judge(False, False)

    def _count_rate(self, now: float, tokens: int) -> None:
        second = int(now)
        if self._rate and self._rate[-1][0] == second:
            self._rate[-1] = (second, self._rate[-1][1] + tokens)
        else:
            self._rate.append((second, tokens))
        while self._rate and self._rate[0][0] <= second - RATE_WINDOW_S:
            self._rate.popleft()

    def _tokens_per_s(self) -> float:
        now = int(self._clock.now())
        recent = sum(tokens for second, tokens in self._rate if second > now - RATE_WINDOW_S)
        return recent / RATE_WINDOW_S

    def _notify(self) -> None:
        """Wake whoever waits for a seat, and show the running and waiting counts."""
        self._changed.set()
        self._changed = asyncio.Event()
        self._running_gauge.set(sum(len(seqs) for seqs in self._running.values()))
        self._waiting_gauge.set(len(self._waiting))

    # -- refusals ----------------------------------------------------------------------------------

    def _unmeetable(self, view: TokenRequest, decided: TokenAdmission, hard: bool) -> DeadlineUnmeetable:
        name = self.deployment.name
        loading = not self._promoter.hot_instances(name) and self._promoter.start_delay_s(name) > 0
        if loading:
            self._promoter.prewarm(name)  # so that the retry finds it loaded
        return unmeetable(self.deployment, self._model, view, decided, hard=hard, loading=loading)

    def _late(self, seq: _Sequence) -> DeadlineUnmeetable:
        loading = not self._promoter.hot_instances(self.deployment.name)
        waited_s = self._clock.now() - seq.arrival
        return late(self.deployment, waited_s, hard=seq.hard, loading=loading)
