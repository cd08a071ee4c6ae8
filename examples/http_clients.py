"""Start ``slotserve serve`` and talk to it with the official ``ollama`` and ``openai`` clients.

Run: python examples/http_clients.py [--backend fake] [--port 11434]

The server is a drop-in for both: point an Ollama client at its host, an OpenAI client at its
``/v1`` base URL (any API key). Requests from both share the same slots and queue.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import ollama
import openai

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that is free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(backend: str, port: int) -> subprocess.Popen[bytes]:
    """``slotserve serve`` in a child process, configured through SLOTSERVE_* variables."""
    env = os.environ | {"SLOTSERVE_BACKEND": backend, "SLOTSERVE_PORT": str(port), "SLOTSERVE_SLOTS": "2",
                        "SLOTSERVE_N_CTX_PER_SLOT": "1024"}  # fmt: skip
    # the server's log (uvicorn's access log too) goes to stderr; stdout is this script's own
    return subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve"], cwd=ROOT, env=env, stdout=sys.stderr
    )


async def wait_ready(url: str, server: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    """Poll /health until it answers 200 (it says 503 ``loading`` while the model loads)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.returncode}")
            try:
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            await anyio.sleep(0.1)
    raise TimeoutError(f"the server was not ready within {timeout_s} s")


async def talk(url: str) -> None:
    """One conversation through each API, one of them streamed."""
    question = "What colour is the sky on a clear day?"
    async with ollama.AsyncClient(host=url) as oc:
        model = (await oc.list()).models[0].model or "default"
        print(f"served model: {model}")
        messages = [{"role": "user", "content": question}]
        reply = await oc.chat(model=model, messages=messages, options={"temperature": 0, "num_predict": 24})
        print(f"ollama chat: {reply.message.content!r} ({reply.eval_count} tokens, {reply.done_reason})")
        print("ollama generate, streamed: ", end="")
        async for part in await oc.generate(model=model, prompt="Count to five:", stream=True,
                                            options={"temperature": 0, "num_predict": 16}):  # fmt: skip
            print(part.response, end="", flush=True)
        print()
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0) as ac:
        answer = await ac.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24
        )
        usage = answer.usage.completion_tokens if answer.usage else 0
        print(f"openai chat: {answer.choices[0].message.content!r} ({usage} tokens)")
        print("openai completion, streamed: ", end="")
        stream = await ac.completions.create(model=model, prompt="The three primary colours are",
                                             temperature=0, max_tokens=16, stream=True)  # fmt: skip
        async for chunk in stream:
            print(chunk.choices[0].text, end="", flush=True)
        print()


async def main(backend: str, port: int) -> None:
    url = f"http://127.0.0.1:{port}"
    server = start_server(backend, port)
    try:
        await wait_ready(url, server)
        await talk(url)
    finally:
        server.send_signal(signal.SIGINT)  # a graceful stop, as Ctrl-C
        server.wait(timeout=30)
    print(f"server stopped with status {server.returncode}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="llama_cpp", choices=["llama_cpp", "fake"])
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    args = parser.parse_args()
    anyio.run(main, args.backend, args.port or free_port())
