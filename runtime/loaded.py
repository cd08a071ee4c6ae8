"""LoadedModels: which models of the registry are loaded now, beside the default one.

A model loads on its first request: the request waits (within its mailbox bound) while the
load runs in the background, and /health stays 200. Loads, evictions and growing resizes hold
one lock, the memory budget's: under it memory is read afresh, the plan is made
(runtime.core.residency.plan_room: shrink idle slots of others, then evict idle models least
recently used first; never a busy, loading or pinned one) and the model is loaded, so two
models never take the same free bytes. A plan that must wait for busy models waits for the next
change (a request ending, a model unloading); one that cannot ever fit fails the request at once
with ModelMemoryError (bytes needed and free).

keep_alive (Ollama's): a model unloads once it has been idle that long (0: as soon as it is
idle; ``math.inf``: never). Each request may set it; otherwise the model's own, else
``RuntimeConfig.keep_alive``. The default model, and every ``pinned`` one, stays loaded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc

from runtime.core.config import RuntimeConfig
from runtime.core.errors import ConfigError, ModelMemoryError, RuntimeClosedError
from runtime.core.policies import headroom_bytes
from runtime.core.registry import DEFAULT_NAME, ModelSpec
from runtime.core.residency import Fits, LoadedModel, NoRoom, Resident, plan_room
from runtime.core.telemetry import MemoryProbe
from runtime.model_unit import ModelUnit

__all__ = ["LoadedModels", "ModelEntry"]

log = logging.getLogger("slotserve.models")


@dataclass(eq=False)
class ModelEntry:
    """One model other than the default, from its first request until it is unloaded."""

    spec: ModelSpec
    unit: ModelUnit
    keep_alive_s: float
    loaded: anyio.Event = field(default_factory=anyio.Event)
    """Set when the load has ended, loaded or not (then ``error`` says why)."""
    stop: anyio.Event = field(default_factory=anyio.Event)
    closed: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None

    async def ready(self) -> None:
        """Wait for the load.

        :raises BaseException: why it did not load (ModelMemoryError, ModelLoadError).
        """
        await self.loaded.wait()
        if self.error is not None:
            raise self.error

    @property
    def serving(self) -> bool:
        """Loaded, and not being unloaded."""
        return self.loaded.is_set() and self.error is None and not self.stop.is_set()


class LoadedModels:
    """The models loaded besides ``default`` (see the module docstring); ``run`` hosts them.

    :param make_unit: builds the (not yet loaded) unit of a spec, with the callback for its
        ``on_idle``.
    :param estimate_bytes: bytes a model's config will take once loaded (blocking; run in a
        worker thread).
    :param probe: the memory probe in use (None: memory is not read; only the cap binds).
    """

    def __init__(
        self,
        config: RuntimeConfig,
        default: ModelUnit,
        make_unit: Callable[[ModelSpec, Callable[[], None]], ModelUnit],
        estimate_bytes: Callable[[RuntimeConfig], int],
        probe: Callable[[], MemoryProbe | None],
        budget_lock: anyio.Lock,
    ) -> None:
        self.config = config
        self._default = default
        self._make_unit = make_unit
        self._estimate = estimate_bytes
        self._probe = probe
        self._lock = budget_lock
        self._entries: dict[str, ModelEntry] = {}
        self._changed = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing = False
        self._last_free: int | None = None
        self._known_bytes: dict[str, int] = {}
        """Model name -> the bytes it was estimated to need (for the early refusal)."""

    # -- hosting -------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Host the loaded models and expire them by keep_alive, until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._expire)
                task_status.started()
        finally:
            self._tg = None

    async def close(self) -> None:
        """Unload every model (their requests cancelled as the Runtime's close does); no
        model loads after this."""
        self._closing = True
        entries = list(self._entries.values())
        for entry in entries:
            entry.stop.set()
        self._signal()  # a load waiting for room gives up
        for entry in entries:
            await entry.closed.wait()

    async def _host(self, entry: ModelEntry, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        started = False
        try:
            async with entry.unit:
                entry.loaded.set()
                started = True
                task_status.started()
                self._signal()
                await entry.stop.wait()
        except ConfigError as exc:  # memory went away while it loaded: not one slot fits any more
            log.warning("model %r could not be loaded: %s", entry.spec.name, exc)
            name, needed = entry.spec.name, self._known_bytes.get(entry.spec.name, 0)
            entry.error = ModelMemoryError(name, needed, self._last_free or 0, 0)
        except Exception as exc:
            log.exception("model %r %s", entry.spec.name, "failed" if started else "could not be loaded")
            entry.error = exc
        finally:
            entry.loaded.set()
            entry.closed.set()
            if self._entries.get(entry.spec.name) is entry:
                del self._entries[entry.spec.name]
            self._signal()
            if not started:
                task_status.started()

    def _signal(self) -> None:
        """Something that placement waits on changed: a request ended, a model (un)loaded."""
        self._changed.set()
        self._changed = anyio.Event()

    # -- routing -------------------------------------------------------------------------------

    def entry(self, spec: ModelSpec, keep_alive_s: float | None) -> ModelEntry:
        """The entry of ``spec``, its load started if it is not loaded; a request's
        ``keep_alive_s`` (None: the model's default) becomes the model's.

        :raises ModelMemoryError: at once, if the model cannot fit whatever is evicted (as far
            as the last memory reading tells).
        :raises RuntimeClosedError: if the runtime is not running.
        """
        entry = self._entries.get(spec.name)
        keep = spec.keep_alive(self.config) if keep_alive_s is None else keep_alive_s
        if entry is None or entry.stop.is_set():
            if self._tg is None or self._closing:
                raise RuntimeClosedError("the runtime is not running; models load while it runs")
            self._refuse_early(spec)
            unit = self._make_unit(spec, self._signal)
            entry = self._entries[spec.name] = ModelEntry(spec=spec, unit=unit, keep_alive_s=keep)
            self._tg.start_soon(self._load, entry)
        entry.keep_alive_s = math.inf if spec.pinned else keep
        return entry

    def _refuse_early(self, spec: ModelSpec) -> None:
        """Refuse at once a model that the last plan already knew cannot fit (no reading in a
        thread on this path; the load's plan reads memory afresh)."""
        known = self._known_bytes.get(spec.name)
        if known is None or self._last_free is None:
            return
        plan = plan_room(known, self._last_free, self._residents(exclude=None), self.config.max_loaded_models)
        if isinstance(plan, NoRoom):
            raise ModelMemoryError(spec.name, plan.needed_bytes, plan.free_bytes, plan.reclaimable_bytes)

    async def _load(self, entry: ModelEntry) -> None:
        """Make room for ``entry`` and load it (or fail its waiting requests with why not)."""
        name = entry.spec.name
        try:
            needed = await anyio.to_thread.run_sync(self._estimate, entry.unit.config)
            self._known_bytes[name] = needed
            while not entry.stop.is_set():
                changed = self._changed
                if await self._place(entry, needed):
                    return
                await changed.wait()
        except Exception as exc:
            entry.error = exc
            log.warning("model %r not loaded: %s", name, exc)
        finally:
            if not entry.loaded.is_set():  # refused, or the runtime closed first: never entered
                entry.error = entry.error or RuntimeClosedError("the runtime closed before the model loaded")
                if self._entries.get(name) is entry:
                    del self._entries[name]
                entry.unit.abandon(entry.error)
                entry.loaded.set()
                entry.closed.set()

    async def _place(self, entry: ModelEntry, needed: int) -> bool:
        """Under the budget lock: plan, make room and load; False if the plan is to wait.

        :raises ModelMemoryError: if nothing can make room.
        """
        async with self._lock:
            while True:
                free = await self._free_bytes()
                plan = plan_room(needed, free, self._residents(exclude=entry), self.config.max_loaded_models)
                if isinstance(plan, NoRoom):
                    raise ModelMemoryError(
                        entry.spec.name, plan.needed_bytes, plan.free_bytes, plan.reclaimable_bytes
                    )
                if not isinstance(plan, Fits):
                    log.info("model %r waits for room: %s", entry.spec.name, plan.reason)
                    return False
                if await self._make_room(plan):
                    break
            assert self._tg is not None
            await self._tg.start(self._host, entry)
            return True

    async def _free_bytes(self) -> int | None:
        """Bytes free for models now, after the headroom: negative when less than the headroom
        is free (evictions must make up for that too); None: not known."""
        probe = self._probe()
        reading = None if probe is None else await anyio.to_thread.run_sync(probe.read)
        if reading is None or reading.free_bytes is None or reading.total_bytes is None:
            self._last_free = None
            return None
        cfg = self.config
        headroom = headroom_bytes(
            reading.total_bytes, cfg.memory_headroom_fraction, cfg.memory_headroom_bytes
        )
        self._last_free = reading.free_bytes - headroom  # below 0: the headroom is eaten into already
        return self._last_free

    def _units(self) -> dict[str, tuple[ModelUnit, bool]]:
        """Every loaded unit (the default one too) by name, with whether it is pinned."""
        units = {DEFAULT_NAME: (self._default, True)}
        for name, e in self._entries.items():
            if e.serving:
                units[name] = (e.unit, e.spec.pinned)
        return units

    def _residents(self, exclude: ModelEntry | None) -> list[Resident]:
        out = []
        for name, (unit, pinned) in self._units().items():
            if (exclude is not None and unit is exclude.unit) or unit.state == "loading":
                continue
            status = unit.status()
            resident = Resident(
                name=name, resident_bytes=unit.resident_bytes,
                slot_bytes=status.kv_bytes_per_slot + unit.backend.info.instance_bytes,
                slots=status.slots_effective, busy_slots=status.slots_busy,
                min_slots=unit.config.min_slots if unit.state == "ready" else status.slots_effective,
                busy=unit.busy, pinned=pinned, last_used_s=unit.last_used_s,
            )  # fmt: skip
            out.append(resident)
        return out

    async def _make_room(self, plan: Fits) -> bool:
        """Carry out ``plan``; False if a model to evict took a request meanwhile (plan again)."""
        units = self._units()
        for name, slots in plan.shrinks.items():
            log.warning("shrinking model %r to %d slots to make room", name, slots)
            unit = units[name][0]
            await unit.shrink_to(slots)
            if unit.state == "ready" and unit.status().slots_effective > slots:
                return False  # the shrink did not happen (its resize failed): plan again
        for name in plan.evictions:
            entry = self._entries.get(name)
            if entry is None or not entry.serving:
                continue  # gone already (its keep_alive ran out)
            if entry.unit.busy:  # a request came while the shrinks above waited
                return False
            log.warning("evicting idle model %r to make room", name)
            await self._unload(entry)
        return True

    async def _unload(self, entry: ModelEntry) -> None:
        entry.stop.set()
        await entry.closed.wait()

    # -- keep_alive ----------------------------------------------------------------------------

    def expires_at_s(self, entry: ModelEntry) -> float:
        """When (monotonic seconds) an idle ``entry`` unloads; ``math.inf`` for never or busy."""
        if entry.spec.pinned or entry.unit.busy or not entry.serving:
            return math.inf
        return entry.unit.last_used_s + entry.keep_alive_s

    async def _expire(self) -> None:
        while True:
            changed = self._changed
            now = time.monotonic()
            due = [e for e in self._entries.values() if self.expires_at_s(e) <= now]
            for entry in due:
                async with self._lock:
                    if self.expires_at_s(entry) <= time.monotonic():  # still idle, still due
                        log.info(
                            "model %r unloads: idle for keep_alive %g s", entry.spec.name, entry.keep_alive_s
                        )
                        await self._unload(entry)
            if due:
                continue
            next_s = min((self.expires_at_s(e) for e in self._entries.values()), default=math.inf)
            with anyio.move_on_after(max(0.0, next_s - now)):
                await changed.wait()

    async def unload(self, name: str) -> bool:
        """Unload ``name`` as soon as it is idle (Ollama's keep_alive 0); waits for it when it is
        idle now. :returns: False if it is not loaded or is pinned."""
        entry = self._entries.get(name)
        if entry is None or entry.spec.pinned:
            return False
        entry.keep_alive_s = 0.0
        self._signal()
        if not entry.unit.busy:
            await entry.closed.wait()
        return True

    # -- status --------------------------------------------------------------------------------

    def get(self, name: str) -> ModelEntry | None:
        """The entry of ``name`` while it is loading or loaded."""
        return self._entries.get(name)

    def listing(self) -> list[LoadedModel]:
        """Every model loading or loaded, the default first."""
        wall = time.time() - time.monotonic()
        out = [
            _loaded(
                DEFAULT_NAME, self._default, pinned=True, keep_alive_s=math.inf, expires_s=math.inf, wall=wall
            )
        ]
        for name, e in self._entries.items():
            expires = self.expires_at_s(e)
            if math.isfinite(e.keep_alive_s) and not e.spec.pinned and not math.isfinite(expires):
                expires = time.monotonic() + e.keep_alive_s  # busy: Ollama shows now + keep_alive
            out.append(_loaded(name, e.unit, pinned=e.spec.pinned, keep_alive_s=e.keep_alive_s, expires_s=expires,
                               wall=wall))  # fmt: skip
        return out


def _loaded(
    name: str, unit: ModelUnit, *, pinned: bool, keep_alive_s: float, expires_s: float, wall: float
) -> LoadedModel:
    status = unit.status()
    size = unit.resident_bytes
    on_gpu = unit.state != "loading" and unit.backend.info.gpu_layers > 0
    return LoadedModel(
        name=name, state=status.state, path=unit.config.model, size_bytes=size, size_vram_bytes=size if on_gpu else 0,
        slots=status.slots_effective, slots_busy=status.slots_busy, n_ctx_per_slot=unit.config.n_ctx_per_slot,
        pinned=pinned, keep_alive_s=keep_alive_s,
        expires_at_unix_s=wall + expires_s if math.isfinite(expires_s) else None,
        queue_depth=status.queue_depth + unit.waiting_for_load, queue=status.queue,
    )  # fmt: skip
