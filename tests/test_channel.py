"""runtime.core.channel: the bounded channel of the callers' reply streams."""

from __future__ import annotations

import anyio
import pytest

from runtime.core.channel import ChannelReceiver, ChannelSender, channel


def _pair(capacity: int) -> tuple[ChannelSender[int], ChannelReceiver[int]]:
    send: ChannelSender[int]
    receive: ChannelReceiver[int]
    send, receive = channel(capacity)
    return send, receive


async def test_items_come_out_in_order_up_to_the_capacity() -> None:
    send, receive = _pair(2)
    send.send_nowait(1)
    send.send_nowait(2)
    with pytest.raises(anyio.WouldBlock):
        send.send_nowait(3)
    assert [await receive.receive(), receive.receive_nowait()] == [1, 2]
    with pytest.raises(anyio.WouldBlock):
        receive.receive_nowait()


async def test_a_waiting_receiver_gets_the_next_item() -> None:
    send, receive = _pair(1)
    got: list[int] = []

    async def reader() -> None:
        got.append(await receive.receive())

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.wait_all_tasks_blocked()
        send.send_nowait(7)
    assert got == [7]


async def test_a_full_channel_makes_send_wait_for_room() -> None:
    send, receive = _pair(1)
    send.send_nowait(1)
    done = anyio.Event()

    async def writer() -> None:
        await send.send(2)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set()
        assert receive.receive_nowait() == 1
        await done.wait()
    assert receive.receive_nowait() == 2


async def test_closing_the_sender_ends_the_stream_after_the_buffer() -> None:
    send, receive = _pair(4)
    send.send_nowait(1)
    send.close()
    assert await receive.receive() == 1
    with pytest.raises(anyio.EndOfStream):
        await receive.receive()
    with pytest.raises(anyio.ClosedResourceError):
        send.send_nowait(2)


async def test_closing_the_receiver_breaks_the_sender_and_wakes_a_wait() -> None:
    send, receive = _pair(1)
    errors: list[type[BaseException]] = []

    async def reader() -> None:
        try:
            await receive.receive()
        except anyio.ClosedResourceError as exc:
            errors.append(type(exc))

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.wait_all_tasks_blocked()
        receive.close()
    assert errors == [anyio.ClosedResourceError]
    with pytest.raises(anyio.BrokenResourceError):
        send.send_nowait(1)


async def test_a_cancelled_receive_leaves_the_channel_usable() -> None:
    send, receive = _pair(1)
    with anyio.move_on_after(0.01) as scope:
        await receive.receive()
    assert scope.cancelled_caught
    send.send_nowait(3)
    assert await receive.receive() == 3


async def test_two_receivers_at_once_are_refused() -> None:
    _send, receive = _pair(1)
    errors: list[BaseException] = []

    async def reader() -> None:
        try:
            await receive.receive()
        except anyio.BusyResourceError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(reader)
        await anyio.wait_all_tasks_blocked()
        assert len(errors) == 1
        tg.cancel_scope.cancel()


def test_a_channel_holds_at_least_one_item() -> None:
    with pytest.raises(ValueError, match="capacity is 0"):
        channel(0)


async def test_the_last_item_goes_past_the_capacity_and_closes() -> None:
    send, receive = _pair(1)
    send.send_nowait(1)
    send.send_last(2)
    assert [await receive.receive(), await receive.receive()] == [1, 2]
    with pytest.raises(anyio.EndOfStream):
        await receive.receive()
    receive.close()
    send2, receive2 = _pair(1)
    receive2.close()
    with pytest.raises(anyio.BrokenResourceError):
        send2.send_last(3)
    with pytest.raises(anyio.ClosedResourceError):
        send2.send_nowait(4)  # send_last closed this end even though it failed
