"""SlotActor: one sequence of the context, serving one request at a time.

The slot pulls a ticket from the mailbox when it is idle, tokenizes the prompt (off the event
loop), refuses a prompt that does not fit its context, reuses the common prefix of the tokens
its sequence already holds, and hands the sequence to the ModelActor. Each token the step loop
delivers is turned into text (whole UTF-8 characters, stop strings held back) and streamed to
the caller. A caller who does not read makes the slot wait, which pauses only this sequence.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import anyio

from actors.model import ModelActor
from actors.placement import Placement, common_prefix
from actors.preemption import Parked, Run, Snapshot
from actors.prompt import INLINE_PROMPT_CHARS, PromptCancelled, prompt_chars, prompt_parts, tokenize_parts
from actors.scheduler import SequenceJob
from actors.sink import RequestSink
from actors.state_swap import swap_states
from runtime.backends.base import SamplerSpec
from runtime.backends.grammar import GrammarRows
from runtime.core.choices import ChoiceGroup
from runtime.core.config import RuntimeConfig
from runtime.core.errors import ContextOverflowError, GenerationError, InvalidRequestError
from runtime.core.events import Observers
from runtime.core.mailbox import MailboxReceiver
from runtime.core.messages import ChatRequest, Chunk, DoneReason, GenerateRequest, RequestStats
from runtime.core.records import SlotStatistics
from runtime.core.ticket import Ticket

__all__ = ["SlotActor"]


def sampler_spec(request: GenerateRequest | ChatRequest) -> SamplerSpec | None:
    """The sampler chain for ``request``; None when plain argmax gives the same token (never for
    a request with an output constraint: its row is masked first)."""
    grammar = request.constraint()
    if request.greedy and grammar is None:
        return None
    return SamplerSpec(
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        min_p=request.min_p,
        repeat_penalty=request.repeat_penalty,
        repeat_last_n=request.repeat_last_n,
        seed=secrets.randbits(32) if request.seed is None else request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        grammar=grammar,
    )


class SlotActor:
    """Serves tickets from ``receiver`` on sequence ``slot`` of ``model``'s context; finishes
    each ticket it serves (:meth:`Ticket.finish`), except on a fault of its own: then it raises
    with ``current`` set, for the Supervisor."""

    def __init__(
        self,
        slot: int,
        model: ModelActor,
        receiver: MailboxReceiver[Ticket],
        config: RuntimeConfig,
        observers: Observers,
        *,
        placement: Placement[Ticket] | None = None,
    ) -> None:
        self.slot = slot
        self._placement: Placement[Ticket] = placement or Placement(config.min_prefix_share)
        self._observers = observers
        self.model = model
        self.config = config
        self._receiver = receiver
        self._cached: list[int] = []
        self._served = 0
        self.retiring = False
        self.current: Ticket | None = None
        """The ticket being served; the Supervisor fails it if this slot crashes."""

    async def run(self, first: Ticket | None = None) -> None:
        """Serve ``first`` (a request retried after a crash), then tickets from the mailbox
        until it closes or the slot is retired. Raises only on a fault in this slot."""
        ticket: Ticket | None = first
        tokens: list[int] | None = None
        while True:
            if ticket is None:
                if self.retiring:  # retired while a crashed predecessor restarted
                    return
                got = await self._placement.take(self, self._receiver.receive, self._prepare)
                if got is None:
                    return
                ticket, tokens = got
            self.current = ticket
            try:
                await self._serve(ticket, tokens)  # on a fault, ``current`` stays set for the Supervisor
            finally:
                if ticket.parked is None:  # (a parked one's listener is its own: nothing awaited since)
                    ticket.listen(None)  # a late cancel must not reach this slot's next request
            self.current = None
            self._served += ticket.parked is None
            ticket = None
            if self.retiring:
                return

    def retire(self) -> None:
        """Take no more requests: finish the current one (if any), then return from run.

        Closing this slot's receive clone wakes an idle wait without losing a ticket that was
        already handed over (the wait returns it, and the slot serves it first).
        """
        self.retiring = True
        self._receiver.close()
        self._placement.stop(self)

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens this slot's sequence holds between requests (a finished conversation)."""
        return self._cached

    async def _prepare(self, ticket: Ticket) -> list[int] | None:
        """The prompt's tokens, for the choice of slot (actors.placement); None when there is
        no prefix to look for or the prompt cannot be tokenized (:meth:`_serve` then tries and
        reports why)."""
        if ticket.parked is not None:  # a preempted request: the slot whose cells hold it, if any
            held: list[int] = ticket.parked.snapshot.held
            return held
        if not self.config.prefix_cache or ticket.cancelled:
            return None
        try:
            return await self._tokenize(ticket)
        except Exception:
            return None

    async def _serve(self, ticket: Ticket, tokens: list[int] | None = None) -> None:
        picked_ns = time.perf_counter_ns()
        if ticket.cancelled:
            ticket.finish("cancel")
            return
        if (parked := ticket.parked) is not None:
            await self._resume(ticket, parked)
            return
        request = ticket.request
        try:
            if tokens is None:
                tokens = await self._tokenize(ticket)
            await self._prepare_constraint(request)
            max_new = self._max_new(len(tokens), request.max_tokens, stop=request.overflow == "stop")
        except PromptCancelled:
            ticket.finish("cancel")
            return
        except InvalidRequestError as exc:  # a template error, a prompt too long: a 400
            ticket.finish("error", error=exc)
            return
        except Exception as exc:  # the request's own: it fails, the slot goes on (no retry)
            ticket.finish("error", error=GenerationError(f"the prompt could not be prepared: {exc!r}"))
            return
        if ticket.finished:  # ended while it was being tokenized (the runtime failed)
            return
        seq = self.slot
        keep = common_prefix(self._cached, tokens) if self.config.prefix_cache else 0
        keep = min(keep, len(tokens) - 1)
        if self.model.host_cache is not None and self.config.prefix_cache:
            keep = await swap_states(self.model, self.model.host_cache, seq, self._cached, tokens, keep)
        self._cached = []
        sink = RequestSink(
            ticket.reply, request.stop, self.model.backend.pieces, self._observers, ticket.index
        )
        top = request.top_logprobs if request.logprobs else -1
        job = SequenceJob(seq, tokens, keep, max_new, sampler_spec(request), sink, top_logprobs=top)
        run = Run(job, sink, tokens, keep, picked_ns)
        cancel = self._listen(ticket, run)
        if ticket.group is None:
            self.model.begin(job)
        else:
            group: ChoiceGroup[SequenceJob] = ticket.group
            await group.join(job, lambda j: self._begin_choice(j, group.leader))
        if ticket.cancelled or ticket.finished:  # cancelled, or ended, while it was being tokenized
            cancel()
        await self._follow(ticket, run)

    def _listen(self, ticket: Ticket, run: Run) -> Callable[[], None]:
        """Have a cancel of ``ticket`` end ``run`` (returned), and let a request of one choice
        be preempted while it runs here."""

        def cancel() -> None:
            run.sink.end("cancel")
            self.model.drop(run.job)  # out of the next step at once

        ticket.listen(cancel)
        if ticket.group is None and self.config.preemption and self.model.can_preempt:
            ticket.serving = run
        return cancel

    async def _follow(self, ticket: Ticket, run: Run) -> None:
        """Follow ``run`` to its end and finish the ticket, or park it when a preemption is
        asked (then the ticket waits in the mailbox to resume, and this slot is free)."""
        seq, sink = self.slot, run.sink
        try:
            while sink.reason is None:
                if run.preempt_asked and sink.taken < 1:  # evaluating its prompt: park it after
                    sink.wake_on_token = True
                    await sink.wait()
                elif run.preempt_asked:
                    parked = await self._park(ticket, run)
                    run.answer(parked)
                    if parked:
                        return
                elif sink.blocked:  # the caller fell behind: wait for room (this sequence paused)
                    await sink.unblock()
                    self.model.notify()
                else:
                    await sink.wait()
        except BaseException:  # this task was cancelled: the sequence must not go on
            sink.end("cancel")
            self.model.end(seq)
            raise
        finally:
            ticket.serving = None
            if run.preempt_asked:
                run.answer(False)  # it ended first
        self._finish(ticket, run)

    def _finish(self, ticket: Ticket, run: Run) -> None:
        """Finish ``ticket`` as its sequence ended (``run.sink.reason``), keeping the
        conversation's cells for the next request."""
        seq, sink, tokens = self.slot, run.sink, run.tokens
        reason = sink.reason
        assert reason is not None  # the loop ends only with one
        if reason == "error":
            self.model.end(seq)
            assert sink.error is not None
            if not isinstance(sink.error, GenerationError):
                raise sink.error  # this sequence's own fault: the slot crashes
            ticket.finish("error", error=sink.error)
            return
        first_ns = sink.first_ns
        finished = reason != "cancel" and first_ns is not None
        out = sink.out + sink.finish_text() if finished else ""
        if finished and self.config.prefix_cache:
            # The whole conversation stays: the prompt and each answer token that was fed back
            # (all but the last one taken); cells past it (steps run ahead) are trimmed.
            self._cached = tokens + sink.generated[:-1]
        self.model.end(seq, keep=len(self._cached))
        final, stats = self._final(ticket, run, out, reason)
        ticket.finish(reason, final=final, stats=stats)

    def _final(self, ticket: Ticket, run: Run, out: str, reason: DoneReason) -> tuple[Chunk, RequestStats]:
        """The last chunk of ``run`` (with ``out``, the text not sent yet) and its stats."""
        sink, picked_ns = run.sink, run.picked_ns
        first_ns = sink.first_ns
        end_ns = time.perf_counter_ns()
        stats = RequestStats(
            slot=self.slot,
            prompt_tokens=len(run.tokens),
            prompt_tokens_cached=run.keep,
            completion_tokens=sink.taken,
            load_duration_ns=0,
            queue_duration_ns=picked_ns - ticket.admitted_ns,
            prefill_duration_ns=(first_ns or end_ns) - picked_ns,
            decode_duration_ns=end_ns - (first_ns or end_ns),
            total_duration_ns=end_ns - ticket.admitted_ns,
            time_to_first_token_ns=None if first_ns is None else first_ns - ticket.admitted_ns,
            preemptions=run.preemptions,
            preempted_duration_ns=run.parked_ns,
        )
        final = Chunk(
            text=out,
            token_ids=tuple(sink.pending),
            logprobs=tuple(sink.pending_logprobs),
            index=ticket.index,
            done=True,
            done_reason=reason,
            stats=stats,
        )
        return final, stats

    # -- preemption (actors.preemption) ------------------------------------------------------

    async def _park(self, ticket: Ticket, run: Run) -> bool:
        """Save ``run``'s sequence and put its ticket back in the mailbox to resume later;
        False (it goes on here) if it cannot pause now, ended while it paused, the mailbox is
        closed (a drain), no request above its priority waits any more (asked by the
        admission), or as many are parked as there are slots (their host memory stays within
        the KV cache's size)."""
        model = self.model
        if model.preemption.parked >= model.backend.info.n_seq_max:
            return False
        if run.for_priority is not None and not self._receiver.waits_at_least(run.for_priority):
            return False  # the request it was asked for has found a slot meanwhile (or ended)
        paused = await model.pause(run.job)
        if paused is None:
            return False
        job, sink = run.job, run.sink
        held = job.prompt + sink.generated[: job.pos - len(job.prompt)]
        snapshot = Snapshot(paused[0], paused[1], held)
        if sink.reason is not None:  # it ended while its sequence was saved (a cancel, a stop string)
            model.discard(snapshot)  # its cells stay in this sequence for _finish
            return False
        parked = Parked(run, snapshot)
        ticket.parked = parked  # (before the requeue: a slot may take it at once)
        fair_share = run.for_priority is not None and run.for_priority <= ticket.request.priority
        if not self._receiver.requeue(
            ticket, last=run.give_way, refund=not fair_share
        ):  # closed: it goes on here
            ticket.parked = None
            await model.resume(job, self.slot, snapshot, cells_kept=True)
            return False
        model.preemption.parked_one(snapshot)
        self._cached = held  # the cells hold it until the next request here trims them
        ticket.serving = None
        ticket.listen(lambda: self._drop_parked(ticket, parked))
        return True

    def _drop_parked(self, ticket: Ticket, parked: Parked) -> None:
        """A parked request was cancelled, or ended by the runtime: free its snapshot, and
        finish it if it still waits (a slot that took it meanwhile finishes it instead)."""
        if ticket.parked is not parked:
            return
        ticket.parked = None
        self._abandon(parked.snapshot)
        if self._receiver.remove(ticket):
            parked.run.parked_ns += time.perf_counter_ns() - parked.since_ns
            self._finish_unresumed(ticket, parked.run)

    def _abandon(self, snapshot: Snapshot) -> None:
        """Free a parked request's snapshot that will not be resumed."""
        self.model.discard(snapshot)
        self.model.preemption.released(snapshot, resumed=False)

    def _finish_unresumed(self, ticket: Ticket, run: Run) -> None:
        """Finish a parked request that was cancelled before it resumed."""
        final, stats = self._final(ticket, run, "", "cancel")
        ticket.finish("cancel", final=final, stats=stats)

    async def _resume(self, ticket: Ticket, parked: Parked) -> None:
        """Resume a preempted request in this slot's sequence where it was, and follow it."""
        run, snapshot = parked.run, parked.snapshot
        ticket.listen(None)
        ticket.parked = None
        run.parked_ns += time.perf_counter_ns() - parked.since_ns
        model = self.model
        if ticket.cancelled or ticket.finished:
            self._abandon(snapshot)
            self._finish_unresumed(ticket, run)
            return
        kept = bool(self._cached) and self._cached == snapshot.held
        self._cached = []
        try:
            await model.resume(run.job, self.slot, snapshot, cells_kept=kept)
        except Exception as exc:
            model.preemption.failed_resumes += 1
            model.preemption.released(snapshot, resumed=False)
            self.model.end(self.slot)
            run.sink.end("error")
            ticket.finish("error", error=GenerationError(f"the preempted request could not resume: {exc!r}"))
            return
        model.preemption.released(snapshot, resumed=True)
        cancel = self._listen(ticket, run)
        if ticket.cancelled or ticket.finished:
            cancel()
        await self._follow(ticket, run)

    def _begin_choice(self, job: SequenceJob, leader: SequenceJob) -> None:
        """Begin one choice of a request's n (runtime.core.choices): each but the first shares
        the first one's prompt evaluation where it can (actors.scheduler)."""
        if job.done:
            return  # cancelled while the choices gathered
        if job is not leader:
            job.leader = leader
        self.model.begin(job)

    async def _tokenize(self, ticket: Ticket) -> list[int]:
        """The prompt's tokens (actors.prompt): a short prompt's here, a longer one's in one
        worker-thread call that stops between two pieces on a cancel."""
        backend, request, n_ctx = self.model.backend, ticket.request, self.config.n_ctx_per_slot

        def work() -> list[int]:
            return tokenize_parts(backend, prompt_parts(backend, request), n_ctx, lambda: ticket.cancelled)

        if backend.inline_tokenize and prompt_chars(request) <= INLINE_PROMPT_CHARS:
            return work()
        return await anyio.to_thread.run_sync(work)

    async def _prepare_constraint(self, request: GenerateRequest | ChatRequest) -> None:
        """Compile the request's output constraint against the vocabulary in a worker thread
        (runtime.backends.grammar), not in a step: every row would wait for it.

        :raises InvalidRequestError: if it does not compile against this vocabulary.
        """
        rows = getattr(self.model.backend, "grammar", None)
        if isinstance(rows, GrammarRows) and (grammar := request.constraint()) is not None:
            await anyio.to_thread.run_sync(rows.prepare, grammar)

    def _max_new(self, n_prompt: int, max_tokens: int | None, *, stop: bool) -> int:
        """Tokens the request may generate; with ``stop``, ``max_tokens`` is only an upper bound
        (the room the context has left and the cap bound it too)."""
        n_ctx = self.config.n_ctx_per_slot
        cap = self.config.max_tokens_limit
        wanted = min(cap, n_ctx - n_prompt) if max_tokens is None else max_tokens
        if stop:
            wanted = min(wanted, cap, n_ctx - n_prompt)
        if wanted < 1 or n_prompt + wanted > n_ctx:
            raise ContextOverflowError(n_prompt, max(wanted, 1), n_ctx)
        return wanted

    def release(self) -> None:
        """Forget the request of a crash (the Supervisor has failed it): the slot is not busy."""
        self.current = None

    def statistics(self) -> SlotStatistics:
        """A snapshot of this slot."""
        return SlotStatistics(
            slot=self.slot,
            busy=self.current is not None,
            served=self._served,
            cached_tokens=len(self._cached),
        )
