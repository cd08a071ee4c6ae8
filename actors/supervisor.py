"""Supervisor: starts the ModelActor then the slots, restarts what fails, stops in reverse.

Restarts are one-for-one: a slot that crashes fails its own request with SlotFailedError and
is replaced by a fresh SlotActor on the same sequence; its siblings never notice. A failed
step fails the requests in it and the step loop starts again. More than ``restart_intensity``
restarts within ``restart_period_s`` seconds put the runtime into the failed state: the
mailbox closes, queued requests fail with RuntimeFailedError, and so does every new one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio
import msgspec

from actors.model import ModelActor
from actors.slot import OnDone, SlotActor, SlotStatistics
from runtime.config import RuntimeConfig
from runtime.errors import SlotFailedError
from runtime.events import Observers
from runtime.mailbox import Mailbox
from runtime.policies import restart_allowed
from runtime.ticket import Ticket

__all__ = ["Supervisor", "SupervisorStatistics"]

log = logging.getLogger("slotserve.supervisor")


class SupervisorStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Slot counts, restarts by actor, and the failure that stopped the runtime, if any."""

    slots_configured: int
    slots_effective: int
    slots_busy: int
    slot_restarts: int
    model_restarts: int
    failure: str | None
    slots: tuple[SlotStatistics, ...]


class Supervisor:
    """Owns the actors' tasks. ``run`` returns once they are started (``task_status``).

    :param on_done: called once for every ticket a slot finishes, fails or cancels.
    :param on_failed: called once when the restart intensity is exceeded, with the reason.
    """

    def __init__(
        self,
        config: RuntimeConfig,
        model: ModelActor,
        mailbox: Mailbox[Ticket],
        on_done: OnDone,
        on_failed: Callable[[str], None],
        observers: Observers,
    ) -> None:
        self.config = config
        self._observers = observers
        self.model = model
        self.mailbox = mailbox
        self._on_done = on_done
        self._on_failed = on_failed
        self._slots: dict[int, SlotActor] = {}
        self._restarts: list[float] = []
        self._slot_restarts = 0
        self._model_restarts = 0
        self.failure: str | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the ModelActor and ``config.slots`` SlotActors until cancelled."""
        async with anyio.create_task_group() as tg:
            await tg.start(self._supervise_model)
            for slot in range(self.config.slots):
                await tg.start(self._supervise_slot, slot)  # returns once it waits for work
            task_status.started()

    async def _supervise_model(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        started = False
        while True:
            try:
                if started:
                    await self.model.run()
                else:
                    started = True
                    await self.model.run(task_status=task_status)
                return
            except Exception as exc:
                log.error("model step failed: %r; restarting the step loop", exc)
                self._model_restarts += 1
                self._observers.restart("model")
                if not self._restart(f"model step failed: {exc!r}"):
                    return

    async def _supervise_slot(self, slot: int, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        receiver = self.mailbox.receiver()
        task_status.started()
        with receiver:
            while True:
                actor = SlotActor(slot, self.model, receiver, self.config, self._on_done, self._observers)
                self._slots[slot] = actor
                try:
                    await actor.run()
                    return  # the mailbox closed
                except Exception as exc:
                    log.error("slot %d crashed: %r; restarting it", slot, exc)
                    self._slot_restarts += 1
                    self._observers.restart("slot")
                    self.model.end(slot)
                    ticket = actor.current
                    if ticket is not None:
                        error = SlotFailedError(f"slot {slot} failed while serving this request: {exc!r}")
                        actor.fail(ticket, error)
                    if not self._restart(f"slot {slot} crashed: {exc!r}"):
                        return

    def _restart(self, reason: str) -> bool:
        """Count a restart; fail the runtime and return False past the restart intensity."""
        now = time.monotonic()
        allowed = restart_allowed(
            self._restarts, now, self.config.restart_intensity, self.config.restart_period_s
        )
        self._restarts.append(now)
        if not allowed and self.failure is None:
            self.failure = (
                f"more than {self.config.restart_intensity} restarts within "
                f"{self.config.restart_period_s:g} s; the last: {reason}"
            )
            log.critical("runtime failed: %s", self.failure)
            self._on_failed(self.failure)
        return allowed and self.failure is None

    def statistics(self) -> SupervisorStatistics:
        """A snapshot of the slots and restart counts."""
        slots = tuple(s.statistics() for s in self._slots.values())
        return SupervisorStatistics(
            slots_configured=self.config.slots,
            slots_effective=len(self._slots),
            slots_busy=sum(s.busy for s in slots),
            slot_restarts=self._slot_restarts,
            model_restarts=self._model_restarts,
            failure=self.failure,
            slots=slots,
        )


