"""Embed slotserve in an async program: one model, four slots, answers streamed as they come.

Run: python examples/embed.py [--backend fake]
"""

from __future__ import annotations

import argparse

import anyio

from runtime import ChatMessage, ChatRequest, Runtime, RuntimeConfig

QUESTIONS = [
    "What is the boiling point of water in Celsius?",
    "Name a famous painting by Leonardo da Vinci.",
    "What colour do you get by mixing blue and yellow?",
    "How many legs does a spider have?",
]


async def ask(rt: Runtime, question: str, answers: dict[str, str]) -> None:
    """Stream one answer; leaving the ``async with`` early would cancel the request."""
    request = ChatRequest(
        messages=(ChatMessage(role="user", content=question),), max_tokens=48, temperature=0
    )
    parts: list[str] = []
    async with rt.chat(request) as stream:
        async for chunk in stream:
            parts.append(chunk.text)
    answers[question] = "".join(parts).strip()


async def main(backend: str) -> dict[str, str]:
    answers: dict[str, str] = {}
    async with Runtime(RuntimeConfig(backend=backend, slots=4, n_ctx_per_slot=512)) as rt:  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            for q in QUESTIONS:
                tg.start_soon(ask, rt, q, answers)
        status = rt.status()
    for q in QUESTIONS:
        print(f"Q: {q}\nA: {answers[q]}\n")
    print(
        f"{status.requests_completed} answered by {status.slots_configured} slots sharing one copy of the weights"
    )
    return answers


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="llama_cpp", choices=["llama_cpp", "fake"])
    anyio.run(main, parser.parse_args().backend)
