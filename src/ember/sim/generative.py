"""Generative requests in the engine: arrival, continuous batching per instance, and what they measured.

A generative model's requests wait in the model's queue (``Model.queue`` holds ``(ttft deadline,
prompt tokens, arrival)`` for the code that counts work, and :class:`GenRun` the sequences beside it,
in the same order). Each of its instances keeps a batch of running sequences. When the instance's
device frees, the model proposes the instance's next step (:func:`propose`, planned by
``tokens.plan_step``) and the device scheduler chooses among it and the other residents' batches
(:func:`run_chosen`: several instances of one model on a device take turns, as the device runs
one step or batch at a time); a step ends with a ``STEP`` event (:func:`step_done`). Tiers, loads, placement,
keep-alive and the autoscaler are the engine's, as for one-shot models: an instance holding
sequences counts as running, so nothing demotes or evicts it mid-generation.

Counting: a request's time to first token (TTFT) ends with the step that finished its prefill;
its time per output token (TPOT) is ``(finish - first token) / (output tokens - 1)``, vLLM's
definition. It meets its objectives when both do; refused requests meet neither. A preempted
sequence keeps its first-token time and its tokens, and recomputes its cache when it rejoins.

Functions of the :class:`~ember.sim.engine.Engine` they act on, split from it by concept.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ember.policies import Candidate
from ember.sim.control import retire
from ember.sim.faas import ask_keepalive
from ember.sim.instances import scale
from ember.sim.state import Device as _Device
from ember.sim.state import Instance as _Instance
from ember.sim.state import Model as _Model
from ember.sim.tokens import AdmissionView, GenSpec, GenStats, StepPlan, StepView, admit, plan_step

if TYPE_CHECKING:
    from ember.sim.engine import Engine

__all__ = ["STEP", "GenRun", "Step", "arrive", "propose", "run_chosen", "step_done"]

#: The engine's event kind for a step that ends (after state.py's LOAD..EXPIRE).
STEP = 5
#: Queued sequences a step's plan looks at (a step admits no more than its token budget allows anyway).
LOOKAHEAD = 64


class Seq:
    """One generative request. ``produced`` and ``kv`` are as of ``c0``, the instance's decode count
    when it started decoding; while decoding, each step adds one to both."""

    __slots__ = ("arrival", "c0", "deadline", "epoch", "first_at", "kv", "need", "order", "output", "produced",
                 "prompt")  # fmt: skip

    def __init__(self, arrival: float, deadline: float, prompt: int, output: int, order: int) -> None:
        self.arrival, self.deadline, self.prompt, self.output, self.order = arrival, deadline, prompt, output, order
        self.produced = self.kv = self.need = self.c0 = self.epoch = 0
        self.first_at: float | None = None


@dataclass
class Batch:
    """An instance's running sequences in the order they joined (decoding ones, then those mid-prefill)."""

    seqs: list[Seq] = field(default_factory=list)
    decoding: int = 0
    #: Decode steps run; each decoding sequence's counters move with it.
    counter: int = 0
    #: Cache held: by decoding sequences (growing one a step each) and reserved by those mid-prefill.
    kv_decoding: int = 0
    kv_prefilling: int = 0
    #: (decode count at which it finishes, order, epoch, sequence) of each decoding sequence.
    finish: list[tuple[int, int, int, Seq]] = field(default_factory=list)

    @property
    def kv(self) -> int:
        return self.kv_decoding + self.kv_prefilling


@dataclass(frozen=True)
class Step:
    """A step an instance proposes: the plan, its predicted seconds and the device scheduler's view."""

    model: _Model
    inst: _Instance
    plan: StepPlan
    seconds: float
    candidate: Candidate


_DECODE_ONLY = StepPlan(0, (), ())


class GenRun:
    """The engine's generative state: each model's queued sequences, each instance's batch, the tally."""

    def __init__(self) -> None:
        self.waiting: dict[int, deque[Seq]] = {}
        self.batches: dict[str, Batch] = {}
        self.stats = GenStats([], [])
        self.order = itertools.count()

    def queue(self, m: _Model) -> deque[Seq]:
        q = self.waiting.get(m.idx)
        if q is None:
            q = self.waiting[m.idx] = deque()
        return q

    def batch(self, inst: _Instance) -> Batch:
        b = self.batches.get(inst.key)
        if b is None:
            b = self.batches[inst.key] = Batch()
        return b


def _spec(m: _Model) -> GenSpec:
    gen = m.spec.generation
    assert gen is not None
    return gen


def arrive(e: Engine, m: _Model, prompt: int, output: int) -> None:
    now, g, gen = e.now, e.gen, _spec(m)
    m.arrivals += 1
    if e.learns and not m.queue and not m.running:
        m.histogram = m.histogram.observe(now - m.last_used)  # an idle period ends
        m.prewarmed = False
    deadline = now + gen.ttft_slo_s
    if not gen.fits(prompt, output):
        g.stats.too_long += 1
        _refuse(e, m)
        return
    if e.p.admission and not admit(_admission_view(e, m, prompt, deadline), gen.step, gen.step_tokens):
        _refuse(e, m)
        scale(e, m)
        return
    g.queue(m).append(Seq(now, deadline, prompt, output, next(g.order)))
    m.queue.append((deadline, prompt, now))
    m.version += 1
    e.outstanding += 1
    if len(m.queue) + m.running > len(m.instances):
        scale(e, m)
    for inst in m.instances:
        dev = inst.device
        dev.pending[m.idx] = m
        if not dev.busy and inst.ready_at <= now:
            e._offer(dev)


def _refuse(e: Engine, m: _Model) -> None:
    e.refused += 1
    e.gen.stats.refused += 1
    if e.record:
        e.events.append((e.now, "refuse", m.name))


def _admission_view(e: Engine, m: _Model, prompt: int, deadline: float) -> AdmissionView:
    gen, g = _spec(m), e.gen
    queued = sum(s.need or s.prompt + s.produced for s in g.queue(m))
    batches = [g.batch(x) for x in m.instances]
    least = min(batches, key=lambda b: (len(b.seqs), b.kv), default=Batch())
    for b in batches:
        queued += sum(s.need for s in b.seqs[b.decoding :])
    return AdmissionView(
        e.now, deadline, prompt, e._start_delay(m), queued, len(batches), len(least.seqs), least.kv,
        m.max_batch, gen.tpot_slo_s,
    )  # fmt: skip


def propose(e: Engine, m: _Model, dev: _Device) -> list[Step]:
    """The next step of each of ``m``'s ready instances on ``dev`` that has something to run now."""
    now, steps = e.now, []
    for inst in m.instances:
        if inst.device is dev and inst.ready_at <= now:
            step = _propose(e, m, inst)
            if step is not None:
                steps.append(step)
    return steps


def _propose(e: Engine, m: _Model, inst: _Instance) -> Step | None:
    now, g = e.now, e.gen
    b = g.batch(inst)
    waiting = g.queue(m)
    if not b.seqs and (not waiting or inst.retiring):
        return None
    gen = _spec(m)
    # Queued sequences that could join (none on an instance that is moving away: it drains).
    room = min(m.max_batch - len(b.seqs), LOOKAHEAD) if waiting and not inst.retiring else 0
    fits = b.kv + b.decoding <= gen.kv_budget_tokens
    if room <= 0 and b.decoding == len(b.seqs) and fits:
        if not b.seqs:
            return None
        # Only decodes: the common step, planned without a view.
        seconds = gen.step.decode_s(b.decoding, b.kv_decoding)
        candidate = Candidate(inst.key, now + gen.tpot_slo_s, seconds, 0.0, b.decoding)
        return Step(m, inst, _DECODE_ONLY, seconds, candidate)
    else:
        view = StepView(
            b.decoding, b.kv, gen.kv_budget_tokens, m.max_batch, gen.step_tokens,
            tuple(s.need for s in b.seqs[b.decoding :]),
            tuple(s.prompt + s.produced for s in itertools.islice(waiting, max(room, 0))),
            () if fits else tuple(_held(b, s) for s in reversed(b.seqs)),
        )  # fmt: skip
        plan = plan_step(view)
        if not plan.preempt and not plan.admit and not b.seqs:
            return None  # the queue's head does not fit this instance's cache now
    decoding, kv = b.decoding, b.kv_decoding
    if plan.preempt:
        gone = b.seqs[len(b.seqs) - plan.preempt :]
        decoding -= sum(1 for s in gone if not s.need)
        kv -= sum(_held(b, s) for s in gone if not s.need)
    tokens = sum(plan.chunks) + sum(plan.admit)
    seconds = gen.step.step_s(decoding, kv, tokens)
    due = [s.deadline for s in itertools.islice(waiting, len(plan.admit))]
    due += [s.deadline for s in b.seqs[b.decoding :] if s.first_at is None]
    if decoding:
        due.append(now + gen.tpot_slo_s)
    earliest = min(due) if due else now + gen.tpot_slo_s
    requests = len(b.seqs) - plan.preempt + len(plan.admit)
    return Step(m, inst, plan, seconds, Candidate(inst.key, earliest, seconds, 0.0, max(requests, 1)))


def _held(b: Batch, s: Seq) -> int:
    """The cache ``s`` holds now (its reservation while it prefills)."""
    return s.kv if s.need else s.kv + b.counter - s.c0


def run_chosen(e: Engine, dev: _Device, steps: list[Step], proposals: list[tuple[_Model, _Instance, int, int]]) -> None:
    """The device scheduler picks among generative steps and one-shot batches; start the one chosen."""
    if len(steps) == 1 and not proposals:
        _start(e, dev, steps[0])
        return
    one_shot = {m.name: (m, inst, take) for m, inst, take, _ in proposals}
    candidates = tuple(s.candidate for s in steps) + tuple(e._candidate(m, t, r) for m, _, t, r in proposals)
    chosen = e.p.devices.choose(e.now, candidates)
    if chosen is None:
        return
    for s in steps:
        if s.candidate is chosen:
            _start(e, dev, s)
            return
    m, inst, take = one_shot[chosen.model]
    m.version += 1
    e._start_batch(dev, inst, [m.queue.popleft() for _ in range(take)])


def _start(e: Engine, dev: _Device, step: Step) -> None:
    m, inst, plan, g = step.model, step.inst, step.plan, e.gen
    b, waiting = g.batch(inst), g.queue(m)
    preempted: list[Seq] = []
    for _ in range(plan.preempt):
        s = b.seqs.pop()
        preempted.append(s)
        if s.need:
            b.kv_prefilling -= s.kv
        else:
            s.produced += b.counter - s.c0
            b.kv_decoding -= s.kv + b.counter - s.c0
            b.decoding -= 1
            s.epoch += 1  # its finish entry is stale
        s.need = s.kv = 0
        m.running -= 1
        g.stats.preemptions += 1
    for s, take in zip(b.seqs[b.decoding :], plan.chunks, strict=True):
        s.need -= take
    for take in plan.admit:
        s = waiting.popleft()
        m.queue.popleft()
        s.kv = s.prompt + s.produced
        s.need = s.kv - take
        if s.arrival < inst.ready_at and not s.produced:  # it waited for this instance's load
            e.cold[inst.source.value] = e.cold.get(inst.source.value, 0) + 1
        b.kv_prefilling += s.kv
        b.seqs.append(s)
        m.running += 1
    for s in preempted:  # back to the queue's front, oldest first, after the plan took the queued ones it names
        waiting.appendleft(s)
        m.queue.appendleft((s.deadline, s.prompt, s.arrival))
    if plan.preempt or plan.admit:
        m.version += 1
    seconds = step.seconds
    dev.busy, inst.running = True, True
    dev.running_bytes = inst.bytes
    inst.busy_s += seconds
    g.stats.steps += 1
    if e.record:
        tokens = sum(plan.chunks) + sum(plan.admit)
        # The cache the step ends with, before finished sequences free theirs: at most the budget.
        e.events.append((e.now, "step", inst.key, dev.id, b.decoding, tokens, b.kv + b.decoding, seconds))
    e._push(e.now + seconds, STEP, (inst, b.decoding))


def step_done(e: Engine, obj: tuple[_Instance, int]) -> None:
    inst, decoded = obj
    now, m, dev, g = e.now, inst.model, inst.device, e.gen
    gen = _spec(m)
    b = g.batch(inst)
    if decoded:
        b.counter += 1
        b.kv_decoding += decoded
    finish = b.finish
    while finish and finish[0][0] <= b.counter:
        _, _, epoch, s = heapq.heappop(finish)
        if epoch == s.epoch:
            b.kv_decoding -= s.kv + b.counter - s.c0
            b.decoding -= 1
            b.seqs.remove(s)
            _answer(e, m, gen, s)
    first = b.decoding
    for s in list(b.seqs[first:]):  # those whose prefill ended with this step: a token each
        if s.need:
            break
        s.produced += 1
        if s.first_at is None:
            s.first_at = now
        b.kv_prefilling -= s.kv
        if s.produced >= s.output:
            b.seqs.remove(s)
            _answer(e, m, gen, s)
            continue
        s.c0 = b.counter
        b.kv_decoding += s.kv
        b.decoding += 1
        heapq.heappush(finish, (s.c0 + s.output - s.produced, s.order, s.epoch, s))
    inst.running = bool(b.seqs)
    inst.last_used = m.last_used = now
    dev.busy, dev.running_bytes = False, 0
    if not inst.running and inst.retiring and retire(e, inst):
        e._offer(dev)
        return
    if m.queue or b.seqs:
        dev.pending[m.idx] = m
    e._offer(dev)
    if e.p.exact_keepalive and not inst.running:
        ask_keepalive(e, inst, 0.0)


def _answer(e: Engine, m: _Model, gen: GenSpec, s: Seq) -> None:
    now, st = e.now, e.gen.stats
    assert s.first_at is not None
    m.running -= 1
    e.outstanding -= 1
    ttft = s.first_at - s.arrival
    st.ttft_s.append(ttft)
    st.requests += 1
    st.prompt_tokens += s.prompt
    st.output_tokens += s.output
    ttft_ok = ttft <= gen.ttft_slo_s
    tpot_ok = True
    if s.output > 1:
        tpot = (now - s.first_at) / (s.output - 1)
        st.tpot_s.append(tpot)
        tpot_ok = tpot <= gen.tpot_slo_s
    st.ttft_met += ttft_ok
    st.tpot_met += tpot_ok
    e.latencies.append(now - s.arrival)
    if ttft_ok and tpot_ok:
        st.both_met += 1
        e.met += 1
    else:
        e.missed[m.name] = e.missed.get(m.name, 0) + 1
    if e.record:
        e.events.append((now, "finish", m.name, s.order, ttft, now - s.arrival))
