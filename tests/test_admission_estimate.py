"""Admission's estimate at admission: a request that finds an idle slot left for it is
predicted to start at once, as playing the queue forward says, without predicting the
requests running or ahead (the burst of N requests into N idle slots is O(N), not O(N^2))."""

from __future__ import annotations

import pytest

from runtime.core.admission import Admission
from runtime.core.channel import channel
from runtime.core.config import RuntimeConfig
from runtime.core.events import Observers
from runtime.core.messages import GenerateRequest
from runtime.core.ticket import Ticket
from runtime.core.wait_predictor import Work

STEP_S = 0.01


def _ticket(i: int) -> Ticket:
    send, _ = channel(8)
    return Ticket(
        request=GenerateRequest(prompt="x" * 8, max_tokens=10), reply=send, on_finish=lambda *_: None
    )


def _admission(slots: int, clock_s: float = 100.0) -> Admission:
    admission = Admission(RuntimeConfig(slots=slots, max_queue=16), Observers(), clock=lambda: clock_s)
    admission.bind(lambda: slots)
    admission.predictor.observe_step(STEP_S, n_tokens=4, n_prompt_tokens=0, n_sequences=4)
    return admission


async def test_requests_that_find_an_idle_slot_start_at_once_and_the_rest_as_played_forward() -> None:
    admission = _admission(slots=4)
    running = _ticket(0)
    admission.admit_nowait([running])
    with admission.mailbox.receiver() as slot:
        assert await slot.receive() is running  # a slot holds it: 3 idle slots are left
    estimates = [admission.admit_nowait([_ticket(i)]) for i in range(1, 6)]
    p = admission.predictor
    work = Work(prompt_tokens=8 / p.chars_per_token, decode_tokens=10.0)
    played = p.starts(4, [p.remaining_s(work, 0.0)], [work] * 5)
    assert [e.position for e in estimates] == [0, 1, 2, 3, 4]
    assert [e.predicted_start_s for e in estimates] == pytest.approx(played[:5])
    assert [e.predicted_start_s for e in estimates[:3]] == [0.0, 0.0, 0.0]
    assert estimates[3].predicted_start_s == pytest.approx(p.duration_s(work))  # when the first frees
    for e in estimates:
        assert e.predicted_ttft_s == pytest.approx((e.predicted_start_s or 0.0) + p.prefill_s(work))


async def test_a_burst_into_idle_slots_is_predicted_to_start_at_once() -> None:
    admission = _admission(slots=8)
    estimates = [admission.admit_nowait([_ticket(i)]) for i in range(8)]
    assert [e.position for e in estimates] == list(range(8))
    assert all(e.predicted_start_s == 0.0 for e in estimates)
