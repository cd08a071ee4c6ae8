"""LoadWait: the requests waiting for a model's load share the mailbox's bounds, each leaves
once, and every refusal is counted."""

from __future__ import annotations

from runtime.core.errors import QueueFullError, TenantQueueFullError
from runtime.load_wait import LoadWait


def test_the_wait_and_the_mailbox_share_max_queue_and_each_tenants_cap() -> None:
    wait = LoadWait(max_queue=3, tenant_max_queued=2)
    leave_a = wait.enter("a")
    assert wait.refusal("a", queued=0, tenant_queued=0) is None
    refused = wait.refusal("a", queued=1, tenant_queued=1)  # 1 waiting + 1 queued: a's cap of 2
    assert isinstance(refused, TenantQueueFullError) and refused.reason == "tenant_cap"
    assert wait.refusal("b", queued=1, tenant_queued=0) is None
    full = wait.refusal("b", queued=2, tenant_queued=0)  # 1 waiting + 2 queued: max_queue
    assert type(full) is QueueFullError
    assert (wait.count, wait.rejected) == (1, 2)
    assert leave_a() and not leave_a()  # once
    assert wait.count == 0 and wait.refusal("a", queued=1, tenant_queued=1) is None


def test_a_tenant_cap_of_0_is_no_cap() -> None:
    wait = LoadWait(max_queue=100, tenant_max_queued=0)
    leaves = [wait.enter("a") for _ in range(50)]
    assert wait.refusal("a", queued=49, tenant_queued=49) is None
    assert isinstance(wait.refusal("a", queued=50, tenant_queued=50), QueueFullError)
    assert all(leave() for leave in leaves) and wait.count == 0
