"""Preemption by snapshot: a running sequence is saved to host memory, its slot serves another
request, and it resumes later, in any slot, where it was.

A slot asked to give way (:meth:`runtime.core.ticket.Ticket.preempt`: by hand, or for a request
of a higher priority, runtime.core.preemption) pauses its sequence between two steps: the step
loop takes the job out of the steps (actors.scheduler) as it is, saves the sequence's KV cells
(llama_state_seq_get_data) and parks its sampler (the chain, its random state, a grammar's
matcher). The request goes back to the mailbox with its snapshot; the slot that takes it next
loads the cells into its own sequence (unless they are still there: its old slot, untouched),
gives it the sampler and puts the job back in the steps. The caller's stream just pauses: with
greedy sampling the text is token for token that of a request never preempted.

At most as many sequences are parked at once as there are slots, so their host memory stays
within the size of the KV cache (``ModelStatistics.parked_bytes`` says how much).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio

from actors.scheduler import SequenceJob
from actors.sink import RequestSink
from runtime.core.records import PreemptionStatistics

__all__ = ["Parked", "PreemptionLedger", "Run", "Snapshot"]


@dataclass(eq=False, slots=True)
class Snapshot:
    """A paused sequence: its KV cells' state, its parked sampler, and the tokens its cells hold."""

    state: bytes
    sampler: object
    held: list[int]
    """The prompt and the answer tokens fed so far (the cells, in order)."""


@dataclass(eq=False, slots=True)
class Run:
    """A request being served, as its slot follows it (it moves to another slot on a resume)."""

    job: SequenceJob
    sink: RequestSink
    tokens: list[int]
    keep: int
    picked_ns: int
    preempt_asked: bool = False
    """A preemption was asked: the slot parks it at its next wake."""
    give_way: bool = False
    for_priority: int | None = None
    """With the ask: the priority of the waiting request it is for (the park lapses when none
    of that priority or above waits any more); None: by hand, it never lapses."""
    """With the ask: it goes back behind the requests waiting in its class (by hand), not first."""
    preemptions: int = 0
    parked_ns: int = 0
    """Time spent parked, in all."""
    _decision: anyio.Event | None = None
    _parked_last: bool = False

    @property
    def asked(self) -> bool:
        """A preemption was asked and not yet decided."""
        return self.preempt_asked

    def ask(self, *, give_way: bool = False, for_priority: int | None = None) -> bool:
        """Ask the slot to park this request at its next wake, or once it has its first token
        (runtime.core.ticket.Preemptible); False if it was asked already or has ended."""
        if self.preempt_asked or self.sink.reason is not None:
            return False  # asked already, or ended
        self.preempt_asked = True
        self.give_way = give_way
        self.for_priority = for_priority
        self._decision = anyio.Event()
        self.sink.nudge()
        return True

    async def decided(self) -> bool:
        """Wait until the slot has answered the last ask; whether the request was parked."""
        if self._decision is not None:
            await self._decision.wait()
        return self._parked_last

    def answer(self, parked: bool) -> None:
        """The slot's answer to an ask (parked, or it could not: ended, evaluating its prompt)."""
        self.preempt_asked = False
        self._parked_last = parked
        if parked:
            self.preemptions += 1
        if self._decision is not None:
            self._decision.set()


@dataclass(eq=False, slots=True)
class Parked:
    """A preempted request waiting in the mailbox to resume (``Ticket.parked``)."""

    run: Run
    snapshot: Snapshot
    since_ns: int = field(default_factory=time.perf_counter_ns)


class PreemptionLedger:
    """Counts of parks and resumes, and the snapshots held now; the event loop's own."""

    def __init__(self) -> None:
        self.preemptions = 0
        self.resumes = 0
        self.failed_resumes = 0
        self._parked: dict[int, int] = {}  # id(snapshot) -> its bytes

    @property
    def parked(self) -> int:
        """Snapshots held now."""
        return len(self._parked)

    def parked_one(self, snapshot: Snapshot) -> None:
        self.preemptions += 1
        self._parked[id(snapshot)] = len(snapshot.state)

    def released(self, snapshot: Snapshot, *, resumed: bool) -> None:
        """``snapshot`` is no longer held: resumed, or its request ended while parked."""
        if self._parked.pop(id(snapshot), None) is not None and resumed:
            self.resumes += 1

    def statistics(self) -> PreemptionStatistics:
        return PreemptionStatistics(
            preemptions=self.preemptions,
            resumes=self.resumes,
            failed_resumes=self.failed_resumes,
            parked=len(self._parked),
            parked_bytes=sum(self._parked.values()),
        )
