"""ModelUnit: one model's weights, ModelActor, Supervisor, slots and mailbox; the Runtime
(runtime.runtime) routes each request to the unit of the model it names.

Entering loads the weights (in a worker thread) and starts the Supervisor, which starts the
ModelActor and the slots. Leaving cancels what is still running (done_reason ``cancel``), fails
what still waits in the mailbox with RuntimeClosedError, and frees the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Literal

import anyio
import anyio.abc
import msgspec
from prometheus_client import REGISTRY, CollectorRegistry

from actors.embedder import Embedder
from actors.model import ModelActor
from actors.prompt import check_prompt_size
from actors.supervisor import Supervisor
from runtime.backends import Backend, load_backend
from runtime.core.admission import Admission
from runtime.core.channel import ChannelReceiver, ChannelSender, channel
from runtime.core.choices import MAX_CHOICES, ChoiceGroup, ChoiceStream
from runtime.core.config import RuntimeConfig
from runtime.core.errors import (
    ConfigError,
    ContextOverflowError,
    InvalidRequestError,
    QueueFullError,
    ResizeFailedError,
    RuntimeClosedError,
    RuntimeFailedError,
)
from runtime.core.events import Observer, Observers, ResizeDirection
from runtime.core.messages import (
    SEED_LIMIT,
    ChatRequest,
    Completion,
    DoneReason,
    Embeddings,
    EmbedRequest,
    GenerateRequest,
    QueueEstimate,
    RequestStats,
)
from runtime.core.records import (
    EmbeddingStatistics,
    ResizeRecord,
    RuntimeState,
    RuntimeStatistics,
    RuntimeStatus,
)
from runtime.core.sizing import probe_for, start_sizes
from runtime.core.telemetry import MemoryProbe, memory_text
from runtime.core.ticket import Reply, ResponseStream, Ticket
from runtime.load_wait import LoadWait
from runtime.metrics import RuntimeMetrics

__all__ = ["BackendLoad", "ModelUnit"]

BackendLoad = Callable[[RuntimeConfig, int], Backend]
"""Loads a model's backend with so many sequences (runs in a worker thread)."""

log = logging.getLogger("slotserve")


class ModelUnit:
    """One model served by slots. Use as ``async with ModelUnit(config) as unit`` (the Runtime
    does; its public methods are the Runtime's for one model).

    :param config: settings; ``RuntimeConfig.load()`` reads them from the environment.
    :param backend: an already loaded backend (tests pass a FakeBackend); by default the
        model of ``config`` is loaded with ``config.backend``.
    :param registry: the prometheus-client registry for this runtime's metrics (default: the
        global one); pass your own to run two runtimes in one process.
    :param observers: receivers of runtime events: objects with any of the methods of
        runtime.core.events.Observer.
    :param probe: the memory probe for sizing (tests pass a ScriptedProbe); by default the one
        ``config.memory_source`` names; None turns memory-driven sizing off.
    :param name: the registry name it is served under (None: the default model, whose status
        names it by the weights' own name); it is the ``model`` label of its metrics.
    :param load: loads the backend when ``backend`` is None.
    :param budget_lock: held while this model's memory grows (a load, a growing resize), shared
        by every unit of one Runtime so that two never grow into the same free bytes.
    :param on_idle: called when its last request in flight ends.
    :raises ModelLoadError: on entering, if the model cannot be loaded.
    """

    def __init__(
        self,
        config: RuntimeConfig | None = None,
        *,
        backend: Backend | None = None,
        registry: CollectorRegistry | None = None,
        observers: Sequence[Observer | object] = (),
        probe: MemoryProbe | Literal["config"] | None = "config",
        name: str | None = None,
        load: BackendLoad = load_backend,
        budget_lock: anyio.Lock | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.config = config or RuntimeConfig()
        self.name = name
        """The registry name (None for the default model)."""
        self.registry = REGISTRY if registry is None else registry
        """The prometheus-client registry this runtime's metrics live on."""
        self.observers = Observers(*observers)
        """Receivers of runtime events (see runtime.core.events); ``observers.add`` adds one."""
        self._metrics: RuntimeMetrics | None = None
        self._backend = backend
        self._state: RuntimeState = "loading"
        self._tg: anyio.abc.TaskGroup | None = None
        self._model: ModelActor | None = None
        self._embedder: Embedder | None = None
        self._admission = Admission(self.config, self.observers)  # the mailbox, and the predicted waits
        self.observers.add(self._admission)  # it measures the steps
        self._mailbox = self._admission.mailbox
        self._supervisor: Supervisor | None = None
        self._probe = probe
        self._slots_configured = 0
        self._in_flight: set[Ticket] = set()
        self._drained: anyio.Event | None = None  # set when the last request in flight ends
        self._outcomes: dict[DoneReason, int] = {"stop": 0, "length": 0, "cancel": 0, "error": 0}
        self.load_seconds = 0.0
        self._load = load
        self._budget_lock = budget_lock
        self._on_idle = on_idle
        self._load_wait = LoadWait(self.config.max_queue, self.config.tenant_max_queued)
        self.last_used_s = time.monotonic()
        """When a request last started or ended here (monotonic seconds): the LRU order."""

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> ModelUnit:
        try:
            return await self._start()
        except BaseException:
            self._state = "closed"
            self._mailbox.close(lambda: RuntimeClosedError("the runtime did not start"))
            if self._backend is not None:
                await anyio.to_thread.run_sync(self._backend.close)
            raise

    def _count(self) -> None:
        """Add this unit's metrics (counters, histograms and gauges on ``registry``), once."""
        if self._metrics is None:
            self._metrics = RuntimeMetrics(self)
            self.observers.add(self._metrics)

    def abandon(self, error: BaseException) -> None:
        """It will never be entered (its load was refused): close its mailbox as a failed
        start does."""
        self._state = "closed"
        self._mailbox.close(lambda: RuntimeClosedError(f"the model was not loaded: {error}"))

    async def _start(self) -> ModelUnit:
        start = time.perf_counter()
        self._count()
        cfg = self.config
        if self._backend is None:
            # One sequence first: the real count is chosen once the KV bytes per slot are known.
            self._backend = await anyio.to_thread.run_sync(self._load, cfg, 1)
        self.load_seconds = time.perf_counter() - start
        backend = self._backend
        if self._probe == "config":
            self._probe = probe_for(cfg, backend.info.gpu_layers)
        probe = self._probe
        reading = None if probe is None else await anyio.to_thread.run_sync(probe.read)
        per_slot = backend.info.kv_bytes_per_slot + backend.info.instance_bytes  # a slot's whole cost
        slots, cache_bytes = start_sizes(cfg, reading, probe, backend.info.n_seq_max, per_slot)
        pause_s = 0.0
        start_failed: ResizeDirection | None = None
        if slots != backend.info.n_seq_max:
            resized = time.perf_counter()
            try:
                await anyio.to_thread.run_sync(backend.resize, slots)
            except ResizeFailedError as exc:  # memory said yes, the device said no: serve what was built
                log.warning("a context of %d slots could not be built (%s); starting with %d", slots, exc,
                            backend.info.n_seq_max)  # fmt: skip
                start_failed = "grow" if slots > backend.info.n_seq_max else "shrink"
                slots = backend.info.n_seq_max
            pause_s = time.perf_counter() - resized
        self._slots_configured = slots if cfg.slots == "auto" else cfg.slots
        startup: tuple[ResizeRecord, ...] = ()
        if slots < self._slots_configured:  # memory did not fit the count asked for: never silent
            startup = (ResizeRecord(from_slots=self._slots_configured, to_slots=slots, reason="startup",
                                    pause_s=pause_s, drain_s=0.0, carried_bytes=0),)  # fmt: skip
        self._model = ModelActor(
            backend,
            n_batch=cfg.n_batch,
            prefill_budget_s=cfg.prefill_budget_s,
            prefill_budget_tokens=cfg.prefill_budget_tokens,
            host_cache_bytes=cache_bytes,
            on_step=self.observers.step,
        )
        self._embedder = Embedder(
            self._model, max_tokens=cfg.n_ctx_per_slot, on_batch=self.observers.embedding_batch
        )
        self._supervisor = Supervisor(
            cfg, self._model, self._mailbox, self._failed, self.observers,
            slots=slots, probe=probe, reading=reading, resizes=startup, budget_lock=self._budget_lock,
        )  # fmt: skip
        self._admission.bind(lambda: self._supervisor.slots_effective if self._supervisor else 0)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            await self._tg.start(self._supervisor.run)
        except BaseException:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            raise
        self._state = "ready"
        if startup:
            self.observers.resize("shrink", "startup", pause_s)  # counted once the series are bound
        if start_failed is not None:
            self.observers.resize_failed(start_failed, "startup")
        info = backend.info
        log.log(
            logging.WARNING if slots < self._slots_configured else logging.INFO,
            "ready: %s, slots configured %s, effective %d, x %d tokens; weights %d bytes, KV %d bytes per slot; "
            "loaded in %.2f s; %s",
            info.name, cfg.slots, slots, info.n_ctx_per_slot, info.weights_bytes, info.kv_bytes_per_slot,
            self.load_seconds, memory_text(reading),
        )  # fmt: skip
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state != "failed":
            self._state = "closed"
        for ticket in self._mailbox.close(lambda: RuntimeClosedError("the runtime is closed")):
            when = (
                "before this request started" if ticket.parked is None else "while this request was preempted"
            )
            ticket.finish("error", error=RuntimeClosedError(f"the runtime closed {when}"))
        for ticket in list(self._in_flight):
            ticket.cancel()
        assert self._tg is not None and self._backend is not None
        with anyio.move_on_after(5):  # the cancels take effect at the next step
            await self._wait_drained()
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)  # the body's own exception propagates as is
        for ticket in list(self._in_flight):  # a slot cancelled mid-request, a retry never made
            ticket.finish(
                "error", error=RuntimeClosedError("the runtime closed while this request was served")
            )
        await anyio.to_thread.run_sync(self._backend.close)

    async def drain(self, timeout_s: float, *, cancel_wait_s: float = 5.0) -> int:
        """Stop admitting and let the running requests finish (a graceful shutdown): new
        requests and those still in the mailbox are refused with RuntimeClosedError (a 503 with
        Retry-After over HTTP); the running ones get up to ``timeout_s`` seconds, then are
        cancelled (their streams end with done_reason ``cancel``, an in-band error over HTTP),
        and whatever has not ended ``cancel_wait_s`` seconds later is ended with
        RuntimeClosedError. The runtime stays up (``draining``) until it is left.

        :returns: how many requests were cut short (cancelled or ended).
        """
        if self._state != "ready":
            return 0
        self._state = "draining"
        error = RuntimeClosedError("the server is shutting down; retry on another instance or later")
        for ticket in self._mailbox.close(lambda: error, keep=lambda t: t.parked is not None):
            ticket.finish("error", error=error)  # (a preempted one, parked, stays: it resumes)
        log.warning("draining: %d request(s) running, up to %g s", len(self._in_flight), timeout_s)
        with anyio.move_on_after(timeout_s):
            await self._wait_drained()
        cut = list(self._in_flight)
        for ticket in cut:
            ticket.cancel()
        with anyio.move_on_after(cancel_wait_s):
            await self._wait_drained()
        for ticket in list(self._in_flight):
            ticket.finish("error", error=RuntimeClosedError("the server shut down while this request ran"))
        return len(cut)

    async def _wait_drained(self) -> None:
        while self._in_flight:
            drained = self._drained = anyio.Event()
            await drained.wait()

    # -- requests ------------------------------------------------------------------------------

    def generate(
        self,
        request: GenerateRequest | ChatRequest,
        *,
        admission_timeout_s: float | None = None,
        queue_event: bool = False,
    ) -> ResponseStream:
        """Admit ``request`` and return the stream of its chunks.

        With ``admission_timeout_s`` None the request is admitted now or refused now; with a
        number, a full mailbox is waited on for up to that many seconds when the stream is
        first read. The mailbox serves by ``priority``, fairly between tenants
        (runtime.core.fair_queue); the stream's ``estimate`` says where the request stood and
        when it is predicted to start, and with ``queue_event`` the stream begins with a chunk
        that carries only that (``Chunk.queue``; no text).

        :raises QueueFullError: if the mailbox is full (at once, or after the timeout).
        :raises TenantQueueFullError: if the request's tenant has ``tenant_max_queued`` waiting.
        :raises DeadlineUnmetError: if its first token is predicted after its ``deadline_ms``
            (``retry_after_s`` says when a retry is predicted to meet it).
        :raises InvalidRequestError: if max_tokens exceeds ``max_tokens_cap`` (with overflow
            ``refuse``), or it asks for log-probabilities of a backend without them.
        :raises ContextOverflowError: if the prompt's text is too long to fit the slot whatever
            it tokenizes to, or max_tokens leaves no room for a prompt (with overflow
            ``refuse``): refused before any tokenizing.
        :raises RuntimeClosedError: if the runtime is not ready (RuntimeFailedError if failed).
        """
        try:
            self._check_ready()
        except RuntimeFailedError:
            self.observers.request_rejected("failed")
            raise
        except RuntimeClosedError:
            self.observers.request_rejected("closed")
            raise
        try:
            self._check_request(request)
        except InvalidRequestError:
            self.observers.request_rejected("invalid")
            raise
        send: ChannelSender[Reply]
        receive: ChannelReceiver[Reply]
        send, receive = channel(self.config.stream_buffer)
        ticket = Ticket(request=request, reply=send, on_finish=self._request_done)
        if admission_timeout_s is None:
            try:
                estimate = self._admission.admit_nowait([ticket])
            except BaseException as exc:
                send.close()
                receive.close()
                self._rejected(exc)
                raise
            self._admitted(ticket)
            return ResponseStream(ticket, receive, estimate=estimate, queue_event=queue_event)

        async def admit() -> QueueEstimate:
            try:
                estimate = await self._admission.admit(ticket, admission_timeout_s)
            except BaseException as exc:
                send.close()
                self._rejected(exc)
                raise
            if not ticket.finished:  # the mailbox may have closed (and refused it) meanwhile
                self._admitted(ticket)
            return estimate

        return ResponseStream(ticket, receive, admit=admit, queue_event=queue_event)

    def generate_when_ready(
        self,
        request: GenerateRequest | ChatRequest,
        ready: Callable[[], Awaitable[None]],
        *,
        admission_timeout_s: float | None = None,
        queue_event: bool = False,
    ) -> ResponseStream:
        """:meth:`generate` for a model still loading: the request waits for ``ready`` (the
        load) when its stream is first read, then is admitted as :meth:`generate` admits it.
        Waiting requests count against the mailbox bound, so at most ``max_queue`` wait.

        A ``deadline_ms`` counts from this call: the wait for the load uses it up.

        :raises QueueFullError: if ``max_queue`` requests wait already (at once).
        :raises TenantQueueFullError: if the request's tenant has ``tenant_max_queued`` waiting
            (for the load or in the mailbox), at once.
        :raises DeadlineUnmetError: if the load took longer than ``deadline_ms`` (when read).
        :raises BaseException: what ``ready`` raises (the load failed, no memory), when read.
        """
        self._count()  # not entered yet (it may wait for memory): its refusals count already
        tenant = request.tenant
        refusal = self._load_wait.refusal(
            tenant, self._mailbox.statistics().depth, self._mailbox.queue.queued(tenant)
        )
        if refusal is not None:
            self.observers.request_rejected(refusal.reason)
            raise refusal
        send, receive = channel(self.config.stream_buffer)
        ticket = Ticket(request=request, reply=send, on_finish=self._request_done)
        leave = self._load_wait.enter(tenant)

        def stop_waiting() -> None:  # once: admitted, refused, or the stream closed unread
            if leave() and self._on_idle is not None and not self.busy:
                self._on_idle()

        ticket.listen(stop_waiting)  # a stream closed (or collected) before it is read

        async def admit() -> QueueEstimate:
            ticket.listen(None)
            try:
                try:
                    await ready()
                finally:
                    stop_waiting()
                self._check_ready()
                self._check_request(request)
                if admission_timeout_s is None:
                    estimate = self._admission.admit_nowait([ticket])
                else:
                    estimate = await self._admission.admit(ticket, admission_timeout_s)
            except BaseException as exc:
                send.close()
                self._rejected(exc)
                raise
            if not ticket.finished:
                self._admitted(ticket)
            return estimate

        return ResponseStream(ticket, receive, admit=admit, queue_event=queue_event)

    @property
    def waiting_for_load(self) -> int:
        """Requests waiting for the load (:meth:`generate_when_ready`), not queued yet."""
        return self._load_wait.count

    @property
    def busy(self) -> bool:
        """Whether it is loading, or requests are in flight, queued or waiting for the load."""
        return (
            self._state == "loading" or bool(self._in_flight) or self._load_wait.count > 0
            or self._mailbox.statistics().depth > 0
        )  # fmt: skip

    @property
    def resident_bytes(self) -> int:
        """Bytes it holds now: the weights (every copy) and every slot's KV cache (0 before the load)."""
        if self._backend is None or self._supervisor is None:
            return 0
        info = self._backend.info
        slots = self._supervisor.statistics().slots_effective
        return info.weights_bytes * info.weights_copies + slots * (
            info.kv_bytes_per_slot + info.instance_bytes
        )

    def generate_choices(self, request: GenerateRequest | ChatRequest, n: int) -> ChoiceStream:
        """Admit ``n`` choices of ``request`` together (OpenAI's ``n``) and return their one
        stream (chunks with their ``index``; read it inside ``async with``).

        Each choice takes a slot. The n tickets enter the mailbox at once, or none does; they
        wait there for free slots like any request. The first choice to reach a slot evaluates
        the prompt, and the others share it: their sequences get copies of its KV cells, so
        the prompt is evaluated once (runtime.core.choices). With a ``seed``, choice i samples
        with ``seed + i``; at temperature 0 every choice is the same answer.

        :raises InvalidRequestError: if ``n`` is below 1, above 128, above the slots the
            runtime has now or above ``tenant_max_slots`` (the choices run side by side); or
            as :meth:`generate`.
        :raises QueueFullError: if the mailbox has no room for all ``n`` tickets.
        :raises ContextOverflowError: as :meth:`generate`.
        :raises RuntimeClosedError: if the runtime is not ready (RuntimeFailedError if failed).
        """
        self._check_ready()
        assert self._supervisor is not None
        slots = self._supervisor.statistics().slots_effective
        if not 1 <= n <= min(MAX_CHOICES, slots):
            self.observers.request_rejected("invalid")
            raise InvalidRequestError(
                f"n is {n}; it must be 1 to {min(MAX_CHOICES, slots)}: each choice takes a slot, "
                f"and this runtime has {slots}"
            )
        cap = self.config.tenant_max_slots
        if cap and n > cap:
            self.observers.request_rejected("invalid")
            raise InvalidRequestError(
                f"n is {n}; tenant_max_slots is {cap}: the choices run side by side, each in a slot"
            )
        try:
            self._check_request(request)
        except InvalidRequestError:
            self.observers.request_rejected("invalid")
            raise
        group: ChoiceGroup[object] = ChoiceGroup(n)
        tickets: list[Ticket] = []
        receivers: list[ChannelReceiver[Reply]] = []
        for i in range(n):
            choice = request
            if i and request.seed is not None:
                choice = msgspec.structs.replace(request, seed=(request.seed + i) & SEED_LIMIT)
            send, receive = channel(self.config.stream_buffer)
            tickets.append(
                Ticket(request=choice, reply=send, on_finish=self._request_done, group=group, index=i)
            )
            receivers.append(receive)
        try:
            self._admission.admit_nowait(tickets)
        except BaseException as exc:
            for ticket, receive in zip(tickets, receivers, strict=True):
                ticket.reply.close()
                receive.close()
            self._rejected(exc)
            raise
        for ticket in tickets:
            self._admitted(ticket)
        return ChoiceStream([ResponseStream(t, r) for t, r in zip(tickets, receivers, strict=True)])

    def chat(self, request: ChatRequest, *, admission_timeout_s: float | None = None) -> ResponseStream:
        """:meth:`generate` for a chat: the messages go through the model's chat template."""
        return self.generate(request, admission_timeout_s=admission_timeout_s)

    async def complete(
        self, request: GenerateRequest | ChatRequest, *, admission_timeout_s: float | None = None
    ) -> Completion:
        """Generate and return the whole answer; raises what :meth:`generate` and streaming do."""
        return await self.generate(request, admission_timeout_s=admission_timeout_s).collect()

    async def complete_chat(
        self, request: ChatRequest, *, admission_timeout_s: float | None = None
    ) -> Completion:
        """:meth:`complete` for a chat."""
        return await self.complete(request, admission_timeout_s=admission_timeout_s)

    async def embed(
        self,
        inputs: str | Sequence[str | Sequence[int]] | EmbedRequest,
        *,
        truncate: bool = True,
        dimensions: int | None = None,
    ) -> Embeddings:
        """Embed each input: a text, or token ids (OpenAI's token arrays). Inputs waiting at the
        same time share one decode; the vectors are L2-normalised (Ollama's /api/embed, OpenAI).

        :param inputs: one text, a list of texts or token lists, or an EmbedRequest (then the
            keyword arguments are not used).
        :param truncate: cut an input longer than ``n_ctx_per_slot`` tokens to that many;
            False refuses it (Ollama's ``truncate``).
        :param dimensions: keep the first ``dimensions`` values and normalise again (1 to the
            model's ``embedding_length``); None keeps them all.
        :returns: one vector per input, with the tokens embedded and the time taken.
        :raises InvalidRequestError: if inputs is empty, an input is empty, a token id is not in
            the vocabulary, or dimensions is out of range.
        :raises ContextOverflowError: if an input is too long and ``truncate`` is False.
        :raises EmbeddingsUnsupportedError: if the model or its backend cannot embed.
        :raises RuntimeClosedError: if the runtime is not ready (RuntimeFailedError if failed).
        :raises GenerationError: if the decode failed.
        """
        n_inputs = 0
        try:
            if isinstance(inputs, EmbedRequest):
                request = inputs
            else:
                items = (inputs,) if isinstance(inputs, str) else tuple(
                    item if isinstance(item, str) else tuple(item) for item in inputs
                )  # fmt: skip
                request = EmbedRequest(inputs=items, truncate=truncate, dimensions=dimensions)
            n_inputs = len(request.inputs)
            self._check_ready()
            assert self._embedder is not None
            result = await self._embedder.run(request, self.config.n_ctx_per_slot)
        except BaseException as exc:
            self.observers.embedding_finished(n_inputs, 0, exc)
            raise
        self.observers.embedding_finished(n_inputs, result.prompt_tokens, None)
        return result

    def _check_request(self, request: GenerateRequest | ChatRequest) -> None:
        cap, n_ctx, wanted = self.config.max_tokens_limit, self.config.n_ctx_per_slot, request.max_tokens
        if wanted is not None and request.overflow == "refuse":
            if wanted >= n_ctx:  # no room for a prompt besides
                raise ContextOverflowError(1, wanted, n_ctx, at_least="any prompt is one or more")
            if wanted > cap:
                raise InvalidRequestError(f"max_tokens is {wanted:,}; the limit is {cap:,} (max_tokens_cap)")
        if request.logprobs and not self.backend.info.logprobs:
            raise InvalidRequestError(
                f"logprobs is true; the {self.backend.info.backend} backend does not give log-probabilities"
            )
        if not self.backend.info.constraints and request.constraint() is not None:
            raise InvalidRequestError(
                f"the {self.backend.info.backend} backend cannot constrain output (format, grammar, "
                "tool_choice other than none)"
            )
        check_prompt_size(request, self.config.n_ctx_per_slot, self.backend.max_token_bytes)

    def check_ready(self) -> None:
        """Raise unless it takes requests now.

        :raises RuntimeClosedError: if it is loading, draining or closed (RuntimeFailedError
            if it failed).
        """
        self._check_ready()

    def _check_ready(self) -> None:
        if self._state == "failed":
            assert self._supervisor is not None
            raise RuntimeFailedError(f"the runtime failed: {self._supervisor.failure}")
        if self._state != "ready":
            raise RuntimeClosedError(f"the runtime is {self._state}; requests need it ready")

    def _admitted(self, ticket: Ticket) -> None:
        self._in_flight.add(ticket)
        self.last_used_s = time.monotonic()
        self.observers.request_admitted()

    def _rejected(self, exc: BaseException) -> None:
        if isinstance(exc, QueueFullError):
            self.observers.request_rejected(exc.reason)
        elif isinstance(exc, RuntimeFailedError):
            self.observers.request_rejected("failed")
        elif isinstance(exc, RuntimeClosedError):
            self.observers.request_rejected("closed")

    def _request_done(
        self, ticket: Ticket, reason: DoneReason, stats: RequestStats | None, error: BaseException | None
    ) -> None:
        self._in_flight.discard(ticket)
        self._admission.ended(ticket, stats)
        if not self._in_flight and self._drained is not None:
            self._drained.set()
        self._outcomes[reason] += 1
        self.last_used_s = time.monotonic()
        self.observers.request_finished(reason, stats, error)
        if self._on_idle is not None and not self.busy:
            self._on_idle()

    def _failed(self, reason: str) -> None:
        self._state = "failed"
        error = RuntimeFailedError(f"the runtime failed: {reason}")
        for ticket in self._mailbox.close(lambda: RuntimeFailedError(f"the runtime failed: {reason}")):
            ticket.finish("error", error=error)
        for ticket in list(self._in_flight):  # in a slot: nothing steps for it any more
            ticket.finish("error", error=error)

    # -- status --------------------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        """The loaded backend.

        :raises RuntimeClosedError: before the runtime was entered.
        """
        if self._backend is None:
            raise RuntimeClosedError("the runtime has not been started")
        return self._backend

    def statistics(self) -> RuntimeStatistics:
        """The actors' own statistics records (more detail than :meth:`status`).

        :raises RuntimeClosedError: before the runtime was entered.
        """
        if self._model is None or self._supervisor is None:
            raise RuntimeClosedError("the runtime has not been started")
        return RuntimeStatistics(
            mailbox=self._mailbox.statistics(),
            model=self._model.statistics(),
            supervisor=self._supervisor.statistics(),
            embeddings=self._embedder.statistics() if self._embedder else EmbeddingStatistics(),
        )

    @property
    def state(self) -> RuntimeState:
        """What ``status().state`` says, without the rest of the snapshot."""
        return self._state

    async def preempt(self, slot: int) -> bool:
        """Park the request slot ``slot`` serves (preemption by snapshot, actors.preemption):
        its sequence saved to host memory, the slot free for the next waiting request; it
        resumes where it was when a slot takes it from the mailbox again (a request still
        evaluating its prompt is parked once it has its first token).

        :returns: whether it was parked (False: the slot is idle, its request is parked or ended
            first, it is one of n choices, the runtime is draining, or the backend cannot save
            states).
        """
        ticket = None if self._supervisor is None else self._supervisor.serving(slot)
        run = None if ticket is None else ticket.serving
        if run is None or not run.ask(give_way=True):
            return False
        return await run.decided()

    def status(self) -> RuntimeStatus:
        """A frozen snapshot: model, memory (bytes), slots, queue and request counts."""
        mailbox = self._mailbox.statistics()
        queue, depths = self._admission.queued()
        sup = self._supervisor.statistics() if self._supervisor else None
        model = self._model.statistics() if self._model else None
        info = self._backend.info if self._backend else None
        o = self._outcomes
        return RuntimeStatus(
            state=self._state,
            failure=sup.failure if sup else None,
            model=self.name or (info.name if info else self.config.model),
            backend=self.config.backend if info is None else info.backend,
            weights_bytes=info.weights_bytes if info else 0,
            kv_bytes_per_slot=info.kv_bytes_per_slot if info else 0,
            n_ctx_per_slot=self.config.n_ctx_per_slot,
            slots_configured=self._slots_configured,
            slots_auto=self.config.slots == "auto",
            slots_effective=sup.slots_effective if sup else 0,
            slots_target=sup.slots_target if sup else 0,
            slots_busy=sup.slots_busy if sup else 0,
            queue_depth=mailbox.depth,
            queue_capacity=mailbox.capacity,
            requests_admitted=mailbox.admitted,
            requests_in_flight=len(self._in_flight),
            requests_completed=o["stop"] + o["length"],
            requests_cancelled=o["cancel"],
            requests_failed=o["error"],
            requests_rejected=mailbox.rejected + self._load_wait.rejected,
            restarts=(sup.slot_restarts + sup.model_restarts) if sup else 0,
            steps=model.steps if model else 0,
            kv_cache_type=self.config.kv_cache_type,
            resizes=len(sup.resizes) if sup else 0,
            last_resize=sup.resizes[-1] if sup and sup.resizes else None,
            memory=sup.memory if sup else None,
            batched=info.batched if info else True,
            model_instances=info.instances if info else 0,
            weights_resident_bytes=info.weights_bytes * info.weights_copies if info else 0,
            queue=queue,
            queue_depths=depths,
        )

    async def shrink_to(self, slots: int) -> ResizeRecord | None:
        """Shrink to ``slots`` to make room for another model (reason ``memory_low``); waits for
        the retired slots' requests. :returns: as :meth:`resize`; None if not ready."""
        if self._state != "ready" or self._supervisor is None:
            return None
        if slots >= self._supervisor.statistics().slots_effective:
            return None  # never grows: it is down there already
        return await self._supervisor.resize(slots, "memory_low")

    async def resize(self, slots: int) -> ResizeRecord | None:
        """Change the slot count by hand, live: weights kept, no request dropped or changed.

        Shrinking waits for the retired slots to finish the requests they hold.
        :returns: what was done (pause and drain in seconds), or None if ``slots`` is current;
            if no context of ``slots`` could be built, a record whose ``error`` says why (the old
            count serves on).
        :raises ConfigError: if ``slots`` is outside 1..1,024.
        :raises RuntimeClosedError: if the runtime is not ready.
        """
        if not 1 <= slots <= 1024:
            raise ConfigError(f"slots is {slots}; it must be between 1 and 1,024")
        self._check_ready()
        assert self._supervisor is not None
        return await self._supervisor.resize(slots, "manual")
