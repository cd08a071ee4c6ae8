"""A request ends in one place, once: Ticket.finish."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from runtime import GenerateRequest, GenerationError
from runtime.core.channel import channel
from runtime.core.messages import Chunk
from runtime.core.ticket import ResponseStream, Ticket


def make() -> tuple[Ticket, ResponseStream, list[tuple[Any, ...]]]:
    finished: list[tuple[Any, ...]] = []
    send, receive = channel(2)
    ticket = Ticket(
        request=GenerateRequest(prompt="x", max_tokens=1),
        reply=send,
        on_finish=lambda t, reason, stats, error: finished.append((reason, stats, error)),
    )
    return ticket, ResponseStream(ticket, receive), finished


async def test_finish_happens_once_whoever_calls_it() -> None:
    ticket, stream, finished = make()
    error = GenerationError("slot 0 failed")
    assert ticket.finish("error", error=error) is True
    assert ticket.finish("cancel") is False  # a second ender changes nothing
    assert ticket.finish("stop", final=Chunk(text="late", token_ids=(), done=True)) is False
    assert finished == [("error", None, error)]
    with pytest.raises(GenerationError, match="slot 0 failed"):
        await stream.__anext__()


async def test_a_cancel_reaches_the_listener_until_the_request_finishes() -> None:
    ticket, stream, finished = make()
    calls: list[str] = []
    ticket.listen(lambda: calls.append("cancel"))
    await stream.aclose()  # the caller leaves: the ticket is cancelled once
    ticket.cancel()
    assert calls == ["cancel"] and ticket.cancelled
    ticket.finish("cancel")
    assert finished == [("cancel", None, None)]

    later, later_stream, _ = make()  # the stream kept: collecting it would cancel
    later.finish("stop")
    later.listen(lambda: calls.append("too late"))
    later.cancel()
    assert calls == ["cancel"] and not later.cancelled
    await later_stream.aclose()


async def test_sent_counts_the_chunks_on_the_reply_channel() -> None:
    ticket, stream, _ = make()
    ticket.reply.send_nowait(Chunk(text="a", token_ids=(1,)))
    ticket.reply.send_nowait(Chunk(text="b", token_ids=(2,)))
    assert ticket.sent == 2
    with pytest.raises(anyio.WouldBlock):
        ticket.reply.send_nowait(Chunk(text="c", token_ids=(3,)))
    assert ticket.sent == 2
    assert (await stream.__anext__()).text == "a"
