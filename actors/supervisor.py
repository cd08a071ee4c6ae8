"""Supervisor: starts the ModelActor then the slots, restarts what fails, resizes the slot
count from memory telemetry, stops in reverse.

Restarts are one-for-one: a slot that crashes is replaced by a fresh SlotActor on the same
sequence after a jittered backoff; its siblings never notice. Its request is retried once on
the new slot if nothing had been streamed yet, else failed with SlotFailedError; a request that
crashes a slot twice is failed. A failed step fails the requests in it and the step loop starts
again. More than ``restart_intensity`` restarts within ``restart_period_s`` seconds put the
runtime into the failed state.

Resizing: a new count means a new llama.cpp context (weights kept). Growing carries every
sequence across and starts new slots. Shrinking retires the highest slots: they take no new
requests, finish the ones they hold (the drain point), and then the context is replaced,
carrying the sequences of the slots that stay; no request is cancelled or changed.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import anyio
import anyio.abc

from actors.model import ModelActor
from actors.placement import Placement
from actors.slot import SlotActor
from runtime.core.config import RuntimeConfig
from runtime.core.errors import ResizeFailedError, SlotFailedError
from runtime.core.events import Observers
from runtime.core.mailbox import Mailbox, MailboxReceiver
from runtime.core.policies import backoff_s, headroom_bytes, resize_due, restart_allowed, target_slots
from runtime.core.records import MemoryReading, ResizeReason, ResizeRecord, SupervisorStatistics
from runtime.core.sizing import host_cache_rebound, host_cache_reserve
from runtime.core.telemetry import MemoryProbe, memory_text
from runtime.core.ticket import Ticket

__all__ = ["Supervisor"]

log = logging.getLogger("slotserve.supervisor")


class Supervisor:
    """Owns the actors' tasks. ``run`` returns once they are started (``task_status``).

    :param slots: the slot count to start with.
    :param probe: memory readings for live resizing (None: no live resizing).
    :param reading: the reading the start was sized from, shown until the first new one.
    :param resizes: resizes made before it started (the ``startup`` reduction).
    :param on_failed: called once when the restart intensity is exceeded, with the reason.
    :param budget_lock: shared by every model of one Runtime; a growing resize holds it (and
        reads memory again under it), so two models never grow into the same free bytes.
    """

    def __init__(
        self,
        config: RuntimeConfig,
        model: ModelActor,
        mailbox: Mailbox[Ticket],
        on_failed: Callable[[str], None],
        observers: Observers,
        *,
        slots: int,
        probe: MemoryProbe | None = None,
        reading: MemoryReading | None = None,
        resizes: tuple[ResizeRecord, ...] = (),
        budget_lock: anyio.Lock | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.mailbox = mailbox
        self._observers = observers
        self._on_failed = on_failed
        self._probe = probe
        self._n = slots
        self._target = slots
        self._slots: dict[int, SlotActor] = {}
        self.placement: Placement[Ticket] = Placement(config.min_prefix_share, by_prefix=config.prefix_cache)
        """Which idle slot takes each request (by the prompt's prefix in its cells)."""
        self._receivers: dict[int, MailboxReceiver[Ticket]] = {}
        self._stopped: dict[int, anyio.Event] = {}
        self._restarts: list[float] = []
        self._slot_restarts = 0
        self._model_restarts = 0
        self._resizes: list[ResizeRecord] = list(resizes)
        self._last_resize_s: float | None = None
        self._resize_lock = anyio.Lock()
        self._reading = reading
        self._rng = random.Random()
        self._tg: anyio.abc.TaskGroup | None = None
        self._budget_lock = budget_lock
        self.failure: str | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the ModelActor, the slots and the memory watch until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self._supervise_model)
            for slot in range(self._n):
                await tg.start(self._supervise_slot, slot)  # returns once it waits for work
            if self._probe is not None and self.config.resize_interval_s > 0:
                tg.start_soon(self._watch_memory)
            task_status.started()

    # -- restarts ------------------------------------------------------------------------------

    async def _supervise_model(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        started = False
        while True:
            try:
                if started:
                    await self.model.run()
                else:
                    started = True
                    await self.model.run(task_status=task_status)
            except Exception as exc:
                log.exception("model step failed; restarting the step loop")
                self._model_restarts += 1
                self._observers.restart("model")
                if not await self._restart(f"model step failed: {exc!r}"):
                    return
            else:
                return

    async def _supervise_slot(self, slot: int, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        receiver = self._receivers[slot] = self.mailbox.receiver()
        stopped = self._stopped[slot] = anyio.Event()
        task_status.started()
        retry: Ticket | None = None
        try:
            with receiver:
                while True:
                    retiring = slot in self._slots and self._slots[slot].retiring  # retired mid-restart
                    actor = SlotActor(
                        slot, self.model, receiver, self.config, self._observers, placement=self.placement
                    )
                    actor.retiring = retiring
                    self._slots[slot] = actor
                    try:
                        await actor.run(first=retry)
                    except Exception as exc:
                        retry = self._crashed(actor, exc)
                        if not await self._restart(f"slot {slot} crashed: {exc!r}"):
                            if retry is not None:
                                retry.finish("error", error=SlotFailedError(f"slot {slot} failed: {exc!r}"))
                            return
                    else:
                        return  # the mailbox closed, or the slot was retired
        finally:
            self._slots.pop(slot, None)
            stopped.set()

    def _crashed(self, actor: SlotActor, exc: Exception) -> Ticket | None:
        """Handle a slot crash; return its request if it should be retried on the new slot."""
        log.error("slot %d crashed: %r; restarting it", actor.slot, exc, exc_info=exc)
        self._slot_restarts += 1
        self._observers.restart("slot")
        self.model.end(actor.slot)
        ticket = actor.current
        if ticket is None or ticket.finished:
            actor.release()
            return None
        ticket.crashes += 1
        if ticket.sent == 0 and ticket.crashes < 2 and not ticket.cancelled:
            return ticket  # nothing reached the caller yet: one more try
        ticket.finish(
            "error",
            error=SlotFailedError(
                f"slot {actor.slot} failed while serving this request ({ticket.crashes} crash(es)): {exc!r}"
            ),
        )
        actor.release()
        return None

    async def _restart(self, reason: str) -> bool:
        """Count a restart and wait a jittered backoff; past the restart intensity, fail the
        runtime and return False."""
        now = time.monotonic()
        cfg = self.config
        allowed = restart_allowed(self._restarts, now, cfg.restart_intensity, cfg.restart_period_s)
        recent = sum(1 for t in self._restarts if now - t < cfg.restart_period_s)
        self._restarts.append(now)
        if not allowed:
            self._give_up(
                f"more than {cfg.restart_intensity} restarts within {cfg.restart_period_s:g} s; the last: {reason}"
            )
        if not allowed or self.failure is not None:
            return False
        await anyio.sleep(backoff_s(recent + 1, cfg.restart_backoff_s, cfg.restart_backoff_max_s, self._rng))
        return True

    # -- resizing ------------------------------------------------------------------------------

    async def resize(self, slots: int, reason: ResizeReason) -> ResizeRecord | None:
        """Change the slot count to ``slots``; returns what was done (None if nothing to do).

        Waits for retiring slots to finish their requests when shrinking.
        :raises RuntimeError: if the supervisor is not running.
        """
        if self._tg is None:
            raise RuntimeError("the supervisor is not running")
        async with self._resize_lock:
            old = self._n
            if slots == old or self.failure is not None:
                return None
            self._target = slots
            memory = "" if reason == "manual" else f"; {memory_text(self._reading)}"
            log.warning("resizing from %d to %d slots (%s)%s", old, slots, reason, memory)
            drain_start = time.perf_counter()
            for slot in range(slots, old):
                self._slots[slot].retire()
            for slot in range(slots, old):
                await self._stopped[slot].wait()
                self.model.end(slot)
            drain_s = time.perf_counter() - drain_start if slots < old else 0.0
            try:
                pause_s, carried = await self.model.resize(slots)
            except ResizeFailedError as exc:
                return await self._resize_failed(old, slots, reason, drain_s, exc)
            except Exception as exc:  # not even the old count could be built again
                self._give_up(f"resizing from {old} to {slots} slots lost the context: {exc!r}")
                raise
            record = ResizeRecord(
                from_slots=old,
                to_slots=slots,
                reason=reason,
                pause_s=pause_s,
                drain_s=drain_s,
                carried_bytes=carried,
            )
            self._n = slots
            self._resizes.append(record)
            self._last_resize_s = time.monotonic()
            for slot in range(old, slots):
                await self._tg.start(self._supervise_slot, slot)
            self._observers.resize("grow" if slots > old else "shrink", reason, pause_s)
            log.warning(
                "resized from %d to %d slots (%s): drain %.3f s, pause %.3f s, %d bytes carried",
                old, slots, reason, drain_s, pause_s, carried,
            )  # fmt: skip
            return record

    async def _resize_failed(
        self, old: int, slots: int, reason: ResizeReason, drain_s: float, exc: ResizeFailedError
    ) -> ResizeRecord:
        """The backend serves on at ``old``: record why, and bring back the slots retired for it."""
        assert self._tg is not None
        record = ResizeRecord(
            from_slots=old, to_slots=old, reason=reason, pause_s=0.0, drain_s=drain_s, carried_bytes=0,
            error=str(exc),
        )  # fmt: skip
        self._resizes.append(record)
        self._last_resize_s = time.monotonic()  # the cooldown holds before the next try
        self._target = old
        for slot in range(slots, old):
            await self._tg.start(self._supervise_slot, slot)
        self._observers.resize_failed("grow" if slots > old else "shrink", reason)
        log.error(
            "resizing from %d to %d slots (%s) failed: %s; serving on with %d", old, slots, reason, exc, old
        )
        return record

    def _give_up(self, reason: str) -> None:
        """The runtime cannot serve any more (too many restarts, or the context is gone): record
        the first reason and tell the Runtime once."""
        if self.failure is None:
            self.failure = reason
            log.critical("runtime failed: %s", reason)
            self._on_failed(reason)

    def fit(self, free_bytes: int, total_bytes: int) -> int:
        """The slot count that a reading of ``free_bytes`` of ``total_bytes`` calls for (see
        runtime.core.policies.target_slots): between min_slots and max_slots for ``auto``, at
        most the configured count otherwise."""
        cfg = self.config
        return target_slots(
            free_bytes,
            self._n,
            self.model.backend.info.kv_bytes_per_slot + self.model.backend.info.instance_bytes,
            headroom_bytes(total_bytes, cfg.memory_headroom_fraction, cfg.memory_headroom_bytes),
            cfg.min_slots,
            cfg.max_slots if cfg.slots == "auto" else cfg.slots,  # a set count is a ceiling
            cfg.resize_hysteresis,
        )

    def _host_reserve(self, reading: MemoryReading) -> int:
        """Free bytes of ``reading`` kept for the host-RAM prompt cache (runtime.core.sizing),
        after its bound follows the reading (down, and back up to the bound it started with)."""
        cache = self.model.host_cache
        if cache is None:
            return 0
        cache.set_bound(host_cache_rebound(self.config, reading, cache.ceiling_bytes, cache.held_bytes))
        return host_cache_reserve(reading, cache.bound_bytes, cache.held_bytes)

    async def _watch_memory(self) -> None:
        assert self._probe is not None
        while True:
            await anyio.sleep(self.config.resize_interval_s)
            reading = await anyio.to_thread.run_sync(self._probe.read)
            if reading is None:
                continue  # unknown is not zero: never shrink on a failed reading
            self._reading = reading  # shown in status(), known or not
            if reading.free_bytes is None or reading.total_bytes is None:
                continue  # a device that holds KV is unknown: it may be the tightest
            target = self.fit(reading.free_bytes - self._host_reserve(reading), reading.total_bytes)
            self._target = target if not self._resize_lock.locked() else self._target
            now = time.monotonic()
            if resize_due(target, self._n, self._last_resize_s, now, self.config.resize_cooldown_s):
                try:
                    if target > self._n and self._budget_lock is not None:
                        await self._grow_within_budget()
                    else:
                        await self.resize(target, "memory_low" if target < self._n else "memory_available")
                except Exception:  # the runtime has failed (see resize); the watch ends, nothing escapes
                    return

    async def _grow_within_budget(self) -> None:
        """Grow to what a fresh reading allows, holding the shared budget lock: another model
        loading or growing meanwhile is seen in the reading, not raced."""
        assert self._budget_lock is not None and self._probe is not None
        async with self._budget_lock:
            reading = await anyio.to_thread.run_sync(self._probe.read)
            if reading is None or reading.free_bytes is None or reading.total_bytes is None:
                return
            self._reading = reading
            target = self.fit(reading.free_bytes - self._host_reserve(reading), reading.total_bytes)
            if target > self._n:
                await self.resize(target, "memory_available")

    def serving(self, slot: int) -> Ticket | None:
        """The request slot ``slot`` serves now (None: idle, or no such slot)."""
        actor = self._slots.get(slot)
        return None if actor is None else actor.current

    @property
    def slots_effective(self) -> int:
        """The slots running now (``statistics().slots_effective``, without the snapshot)."""
        return self._n

    def statistics(self) -> SupervisorStatistics:
        """A snapshot of the slots, restarts, resizes and the last memory reading."""
        slots = tuple(s.statistics() for s in self._slots.values())
        return SupervisorStatistics(
            slots_effective=self._n,
            slots_target=self._target,
            slots_busy=sum(s.busy for s in slots),
            slot_restarts=self._slot_restarts,
            model_restarts=self._model_restarts,
            resizes=tuple(self._resizes),
            memory=self._reading,
            failure=self.failure,
            slots=slots,
            placement=self.placement.statistics(),
        )
