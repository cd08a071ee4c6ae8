"""Who asks, how urgently and by when: a request's tenant, priority and deadline over HTTP.

``X-Slotserve-Tenant`` names the tenant (else the OpenAI body's ``user`` does);
``X-Slotserve-Priority`` the priority, up to ``max_client_priority``; ``X-Slotserve-Deadline-Ms``
the deadline of its first token. Without them a request is the default tenant's, at priority
0, without a deadline: HTTP clients that send none see nothing new.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from runtime.core.errors import InvalidRequestError, preview
from runtime.core.messages import PRIORITY_LIMIT, ChatRequest, GenerateRequest

__all__ = ["DEADLINE_HEADER", "PRIORITY_HEADER", "TENANT_HEADER", "with_admission"]

TENANT_HEADER = "x-slotserve-tenant"
PRIORITY_HEADER = "x-slotserve-priority"
DEADLINE_HEADER = "x-slotserve-deadline-ms"


def with_admission(
    request: GenerateRequest | ChatRequest, headers: Mapping[str, str], user: str | None, max_priority: int
) -> GenerateRequest | ChatRequest:
    """``request`` with the tenant, priority and deadline that ``headers`` (and OpenAI's
    ``user``) give; ``request`` itself when they give none.

    :raises InvalidRequestError: if the priority is not an integer, is above ``max_priority``
        (``max_client_priority``) or out of range; the deadline is not a number of
        milliseconds; or the tenant is too long or holds a NUL.
    """
    fields: dict[str, Any] = {}
    tenant = headers.get(TENANT_HEADER) or user
    if tenant:
        fields["tenant"] = tenant
    if (raw := headers.get(PRIORITY_HEADER)) is not None:
        try:
            priority = int(raw.strip())
        except ValueError:
            raise InvalidRequestError(
                f"X-Slotserve-Priority is {preview(raw)}; it must be an integer, -{PRIORITY_LIMIT:,} to {max_priority:,}"
            ) from None
        if priority > max_priority:
            raise InvalidRequestError(
                f"X-Slotserve-Priority is {priority}; this server lets callers ask for at most {max_priority} "
                "(max_client_priority)"
            )
        fields["priority"] = priority
    if (raw := headers.get(DEADLINE_HEADER)) is not None:
        try:
            fields["deadline_ms"] = float(raw.strip())
        except ValueError:
            raise InvalidRequestError(
                f"X-Slotserve-Deadline-Ms is {preview(raw)}; it must be a number of milliseconds"
            ) from None
    return msgspec.structs.replace(request, **fields) if fields else request
