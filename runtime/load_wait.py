"""The requests waiting for their model's load, before they reach its mailbox: how many, each
tenant's, and how many were refused because that wait was full. They count against the
mailbox's bounds (``max_queue``, ``tenant_max_queued``) as if they were queued already."""

from __future__ import annotations

from collections.abc import Callable

from runtime.core.errors import QueueFullError, TenantQueueFullError

__all__ = ["LoadWait"]


class LoadWait:
    """:param max_queue: the mailbox's bound, shared with those queued there.
    :param tenant_max_queued: each tenant's bound, shared likewise (0: none)."""

    def __init__(self, max_queue: int, tenant_max_queued: int) -> None:
        self._max_queue = max_queue
        self._tenant_cap = tenant_max_queued
        self.count = 0
        """Requests waiting now."""
        self._by_tenant: dict[str, int] = {}
        self.rejected = 0
        """Requests refused here (counted in ``status().requests_rejected``)."""

    def refusal(self, tenant: str, queued: int, tenant_queued: int) -> QueueFullError | None:
        """Why a request of ``tenant`` cannot wait, with ``queued`` requests in the mailbox and
        ``tenant_queued`` of them the tenant's (counted as refused); None if it can."""
        refusal: QueueFullError | None = None
        if self.count + queued >= self._max_queue:
            refusal = QueueFullError(self._max_queue)
        elif self._tenant_cap and self._by_tenant.get(tenant, 0) + tenant_queued >= self._tenant_cap:
            refusal = TenantQueueFullError(tenant, self._tenant_cap)
        if refusal is not None:
            self.rejected += 1
        return refusal

    def enter(self, tenant: str) -> Callable[[], bool]:
        """A request of ``tenant`` starts waiting; call what this returns when it stops (it
        returns True the first time, and does nothing after)."""
        self.count += 1
        self._by_tenant[tenant] = self._by_tenant.get(tenant, 0) + 1
        waiting = True

        def leave() -> bool:
            nonlocal waiting
            if not waiting:
                return False
            waiting = False
            self.count -= 1
            if (left := self._by_tenant[tenant] - 1) > 0:
                self._by_tenant[tenant] = left
            else:
                del self._by_tenant[tenant]
            return True

        return leave
