"""Runtime: the public entry point. It serves the default model and every model of the
registry, routing each request by the model it names.

::

    async with Runtime(RuntimeConfig(slots=4, models_dir="/models")) as rt:
        result = await rt.complete(GenerateRequest(prompt="Hello", max_tokens=32))
        other = await rt.complete(GenerateRequest(prompt="Hello"), model="qwen2.5-0.5b")

Each model is a ModelUnit (runtime.model_unit): its weights, ModelActor, Supervisor, slots and
mailbox. Entering loads the default model and starts its Supervisor; any other model loads on
its first request and unloads after its keep_alive (runtime.loaded). Leaving cancels what is
still running (done_reason ``cancel``), fails what still waits with RuntimeClosedError, and
frees every model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Literal

import anyio
import anyio.abc
from prometheus_client import REGISTRY, CollectorRegistry

from actors.model import ModelActor
from runtime.backends import Backend, load_backend
from runtime.backends.footprint import estimate_model_bytes
from runtime.core.choices import ChoiceStream
from runtime.core.config import RuntimeConfig
from runtime.core.durations import KeepAlive, parse_keep_alive
from runtime.core.errors import RuntimeClosedError, SlotserveError
from runtime.core.events import Observer, Observers
from runtime.core.messages import ChatRequest, Completion, Embeddings, EmbedRequest, GenerateRequest
from runtime.core.records import ResizeRecord, RuntimeState, RuntimeStatistics, RuntimeStatus
from runtime.core.registry import DEFAULT_NAME, ModelRegistry, ModelSpec
from runtime.core.residency import LoadedModel
from runtime.core.telemetry import MemoryProbe
from runtime.core.ticket import ResponseStream
from runtime.loaded import LoadedModels, ModelEntry
from runtime.model_unit import BackendLoad, ModelUnit

__all__ = ["Runtime"]


def _load_backend(config: RuntimeConfig, n_seq: int) -> Backend:
    return load_backend(config, n_seq)  # looked up when called: a test may replace it here


class Runtime:
    """The default model and the registry's others, served by slots. Use as
    ``async with Runtime(config) as rt``.

    Every request method takes ``model``: a registry name (None or ``default``: the default
    model); the others load on first use. Without ``model`` everything is about the default
    model, as when only one is served.

    :param config: settings; ``RuntimeConfig.load()`` reads them from the environment.
    :param backend: an already loaded backend of the default model (tests pass a FakeBackend);
        by default the model of ``config`` is loaded with ``config.backend``.
    :param registry: the prometheus-client registry for this runtime's metrics (default: the
        global one); pass your own to run two runtimes in one process.
    :param observers: receivers of runtime events: objects with any of the methods of
        runtime.core.events.Observer (every model's events).
    :param probe: the memory probe for sizing and placement (tests pass a ScriptedProbe); by
        default the one ``config.memory_source`` names; None turns memory-driven sizing off.
    :param models: the servable models (default: ``ModelRegistry.load(config)``: the default
        model and ``config.models_dir``).
    :param load: loads a model's backend (default: runtime.backends.load_backend; tests pass one
        that makes FakeBackends).
    :param estimate_bytes: the bytes a model's config will take once loaded, before loading it.
    :raises ModelLoadError: on entering, if the default model cannot be loaded.
    """

    def __init__(
        self,
        config: RuntimeConfig | None = None,
        *,
        backend: Backend | None = None,
        registry: CollectorRegistry | None = None,
        observers: Sequence[Observer | object] = (),
        probe: MemoryProbe | Literal["config"] | None = "config",
        models: ModelRegistry | None = None,
        load: BackendLoad | None = None,
        estimate_bytes: Callable[[RuntimeConfig], int] = estimate_model_bytes,
    ) -> None:
        self.config = config or RuntimeConfig()
        self.registry = REGISTRY if registry is None else registry
        """The prometheus-client registry this runtime's metrics live on."""
        self.observers = Observers(*observers)
        """Receivers of runtime events (see runtime.core.events); ``observers.add`` adds one."""
        self.models = ModelRegistry.load(self.config) if models is None else models
        """The servable models, by name."""
        self._probe = probe
        self._load = load or _load_backend
        self._budget_lock = anyio.Lock()
        self._default = ModelUnit(
            self.config, backend=backend, registry=self.registry, observers=(self.observers,),
            probe=probe, load=self._load, budget_lock=self._budget_lock,
        )  # fmt: skip
        self._loaded = LoadedModels(
            self.config, self._default, self._make_unit, estimate_bytes, self._shared_probe, self._budget_lock
        )
        self._tg: anyio.abc.TaskGroup | None = None

    def _shared_probe(self) -> MemoryProbe | None:
        """The probe every model shares: the default model's, once it has chosen one."""
        probe = self._default._probe
        return None if probe == "config" else probe

    def _make_unit(self, spec: ModelSpec, on_idle: Callable[[], None]) -> ModelUnit:
        probe = self._shared_probe() if self._probe == "config" else self._probe
        return ModelUnit(
            spec.config(self.config), registry=self.registry, observers=(self.observers,), probe=probe,
            name=spec.name, load=self._load, budget_lock=self._budget_lock, on_idle=on_idle,
        )  # fmt: skip

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Runtime:
        await self._default.__aenter__()
        try:
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
            await self._tg.start(self._loaded.run)
            for spec in self.models:  # pinned models load at start and stay
                if spec.pinned and spec.name != DEFAULT_NAME:
                    self._loaded.entry(spec, None)
        except BaseException:
            await self._default.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._tg is not None
        try:
            with anyio.CancelScope(shield=True):
                await self._loaded.close()
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
        finally:
            await self._default.__aexit__(t, e, tb)

    async def drain(self, timeout_s: float, *, cancel_wait_s: float = 5.0) -> int:
        """Stop admitting and let the running requests of every model finish (a graceful
        shutdown); see ModelUnit.drain. :returns: how many requests were cut short."""
        units = [self._default, *(m.unit for m in self._loaded_entries())]
        cut = 0

        async def one(unit: ModelUnit) -> None:
            nonlocal cut
            cut += await unit.drain(timeout_s, cancel_wait_s=cancel_wait_s)

        async with anyio.create_task_group() as tg:
            for unit in units:
                tg.start_soon(one, unit)
        return cut

    def _loaded_entries(self) -> list[ModelEntry]:
        return [e for e in (self._loaded.get(n.name) for n in self.models) if e is not None]

    # -- routing -------------------------------------------------------------------------------

    def unit(self, model: str | None = None, keep_alive: KeepAlive = None) -> tuple[ModelUnit, bool]:
        """The unit serving ``model`` and whether it is ready now (else its load has begun).

        :raises ModelNotFoundError: if ``model`` is not in the registry.
        :raises ModelMemoryError: if it cannot fit whatever is evicted (known at once).
        :raises ConfigError: if ``keep_alive`` is malformed.
        :raises RuntimeClosedError: for a registry model while the runtime is not ready
            (RuntimeFailedError if it failed).
        """
        keep_s = None if keep_alive is None else parse_keep_alive(keep_alive)
        spec = None if model is None else self.models.get(model)
        if spec is None or spec.name == DEFAULT_NAME:
            return self._default, True
        self._default.check_ready()  # draining, failed or closed: no model loads, none serves
        entry = self._loaded.entry(spec, keep_s)
        return entry.unit, entry.serving

    def generate(
        self,
        request: GenerateRequest | ChatRequest,
        *,
        model: str | None = None,
        keep_alive: KeepAlive = None,
        admission_timeout_s: float | None = None,
        queue_event: bool = False,
    ) -> ResponseStream:
        """Admit ``request`` for ``model`` and return the stream of its chunks (ModelUnit.generate).

        A model not loaded yet starts loading; the request waits for it when its stream is
        first read (within ``max_queue``), and raises there what the load raised.
        ``keep_alive`` sets how long the model stays loaded once idle after it (Ollama's).

        :raises ModelNotFoundError: if ``model`` is not in the registry.
        :raises ModelMemoryError: if the model cannot fit whatever is evicted (at once, or when
            the stream is first read if that is known only then).
        :raises QueueFullError: if the mailbox is full (at once, or after the timeout); its
            subclasses TenantQueueFullError and DeadlineUnmetError as ModelUnit.generate.
        :raises InvalidRequestError, ContextOverflowError, RuntimeClosedError: as ModelUnit.generate.
        """
        unit, ready = self.unit(model, keep_alive)
        if ready:
            return unit.generate(request, admission_timeout_s=admission_timeout_s, queue_event=queue_event)
        entry = self._loaded.get(unit.name or "")
        assert entry is not None
        return unit.generate_when_ready(
            request, entry.ready, admission_timeout_s=admission_timeout_s, queue_event=queue_event
        )

    def generate_choices(
        self, request: GenerateRequest | ChatRequest, n: int, *, model: str | None = None
    ) -> ChoiceStream:
        """Admit ``n`` choices of ``request`` together (ModelUnit.generate_choices); the model
        must be loaded.

        :raises RuntimeClosedError: if ``model`` is still loading (its load has begun).
        """
        unit, ready = self.unit(model)
        if not ready:
            raise RuntimeClosedError(f"model {model!r} is loading; try again shortly")
        return unit.generate_choices(request, n)

    def chat(
        self,
        request: ChatRequest,
        *,
        model: str | None = None,
        keep_alive: KeepAlive = None,
        admission_timeout_s: float | None = None,
    ) -> ResponseStream:
        """:meth:`generate` for a chat: the messages go through the model's chat template."""
        return self.generate(
            request, model=model, keep_alive=keep_alive, admission_timeout_s=admission_timeout_s
        )

    async def complete(
        self,
        request: GenerateRequest | ChatRequest,
        *,
        model: str | None = None,
        keep_alive: KeepAlive = None,
        admission_timeout_s: float | None = None,
    ) -> Completion:
        """Generate and return the whole answer; raises what :meth:`generate` and streaming do."""
        stream = self.generate(
            request, model=model, keep_alive=keep_alive, admission_timeout_s=admission_timeout_s
        )
        return await stream.collect()

    async def complete_chat(
        self,
        request: ChatRequest,
        *,
        model: str | None = None,
        keep_alive: KeepAlive = None,
        admission_timeout_s: float | None = None,
    ) -> Completion:
        """:meth:`complete` for a chat."""
        return await self.complete(
            request, model=model, keep_alive=keep_alive, admission_timeout_s=admission_timeout_s
        )

    async def embed(
        self,
        inputs: str | Sequence[str | Sequence[int]] | EmbedRequest,
        *,
        truncate: bool = True,
        dimensions: int | None = None,
        model: str | None = None,
        keep_alive: KeepAlive = None,
    ) -> Embeddings:
        """Embed each input with ``model`` (ModelUnit.embed), waiting for its load if it is not
        loaded.

        :raises ModelNotFoundError, ModelMemoryError: as :meth:`generate`.
        """
        unit, ready = self.unit(model, keep_alive)
        if not ready:
            entry = self._loaded.get(unit.name or "")
            assert entry is not None
            await entry.ready()
        return await unit.embed(inputs, truncate=truncate, dimensions=dimensions)

    async def load(self, model: str, keep_alive: KeepAlive = None) -> None:
        """Load ``model`` now if it is not loaded (Ollama's request with an empty prompt).

        :raises ModelNotFoundError, ModelMemoryError, ModelLoadError: if it cannot be loaded.
        """
        unit, ready = self.unit(model, keep_alive)
        if not ready:
            entry = self._loaded.get(unit.name or "")
            assert entry is not None
            await entry.ready()

    async def unload(self, model: str) -> bool:
        """Unload ``model`` as soon as it is idle (Ollama's keep_alive 0); waits for it if it is
        idle now.

        :returns: False if it is not loaded, or is pinned (the default model is).
        :raises ModelNotFoundError: if ``model`` is not in the registry.
        """
        spec = self.models.get(model)
        return await self._loaded.unload(spec.name)

    async def preempt(self, slot: int, *, model: str | None = None) -> bool:
        """Park the request running in slot ``slot`` of ``model`` (default: the default model)
        to host memory, so that the slot serves the next waiting request; it resumes where it
        was, its stream only paused (greedy output is unchanged). A request still evaluating its
        prompt is parked once it has its first token. A request of a higher priority, or of a
        tenant under its share, that has to wait does this itself (``preemption``).

        :returns: whether it was parked (False: the slot is idle, its request is parked or
            ended first, the runtime is draining, or the backend cannot save states).
        :raises ModelNotFoundError: if ``model`` is not in the registry.
        :raises RuntimeClosedError: if it is not loaded.
        """
        return await self._status_unit(model).preempt(slot)

    # -- status --------------------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        """The default model's loaded backend.

        :raises RuntimeClosedError: before the runtime was entered.
        """
        return self._default.backend

    def loaded_backend(self, model: str | None) -> Backend | None:
        """The backend of ``model`` (None: the default model) if it is loaded now, else None;
        looking never starts a load."""
        try:
            unit = self._status_unit(model)
        except SlotserveError:
            return None
        return unit.backend if unit.state != "loading" else None

    @property
    def load_seconds(self) -> float:
        """Seconds the default model's weights took to load."""
        return self._default.load_seconds

    @property
    def _model(self) -> ModelActor | None:
        """The default model's ModelActor (tests reach the step loop through it)."""
        return self._default._model

    def statistics(self, model: str | None = None) -> RuntimeStatistics:
        """The actors' own statistics records of ``model`` (more detail than :meth:`status`).

        :raises RuntimeClosedError: before the model was loaded.
        """
        return self._status_unit(model).statistics()

    @property
    def state(self) -> RuntimeState:
        """What ``status().state`` says of the default model, without the rest of the snapshot."""
        return self._default.state

    def status(self, model: str | None = None) -> RuntimeStatus:
        """A frozen snapshot of ``model`` (default: the default model): memory (bytes), slots,
        queue and request counts.

        :raises ModelNotFoundError: if ``model`` is not in the registry.
        :raises RuntimeClosedError: if it is not loading or loaded.
        """
        return self._status_unit(model).status()

    def _status_unit(self, model: str | None) -> ModelUnit:
        spec = None if model is None else self.models.get(model)
        if spec is None or spec.name == DEFAULT_NAME:
            return self._default
        entry = self._loaded.get(spec.name)
        if entry is None:
            raise RuntimeClosedError(f"model {spec.name!r} is not loaded")
        return entry.unit

    def loaded_models(self) -> list[LoadedModel]:
        """Every model loading or loaded (the default first): size, slots, keep_alive, expiry."""
        return self._loaded.listing()

    async def resize(self, slots: int, *, model: str | None = None) -> ResizeRecord | None:
        """Change the slot count of ``model`` by hand, live (ModelUnit.resize)."""
        return await self._status_unit(model).resize(slots)
