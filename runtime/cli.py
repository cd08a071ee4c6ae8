"""The ``slotserve`` command: ``run`` (the main job), ``generate`` (stream one answer),
``serve`` (the HTTP server), ``convert`` (a GGUF for ctransformers' older loader),
``bench`` (throughput, latency and memory against llama.cpp's own loop and server).

Every option also reads its ``SLOTSERVE_*`` environment variable (see RuntimeConfig).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import msgspec

from runtime.bench.options import add_arguments as add_bench_arguments
from runtime.core.config import RuntimeConfig, read_toml
from runtime.core.errors import ConfigError, SlotserveError
from runtime.core.messages import ChatMessage, ChatRequest, GenerateRequest
from runtime.core.registry import ModelRegistry
from runtime.main_job import DEFAULT_PROMPTS, run_job
from runtime.runtime import Runtime
from runtime.server.settings import ServerSettings

__all__ = ["build_parser", "main"]


def _slots(text: str) -> int | str:
    """``--slots``: a number, or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None


def _config_options(p: argparse.ArgumentParser, slots_default: int | None = None) -> None:
    """The runtime's options; ``slots_default`` is the command's own slot count, used where
    neither ``--slots``, SLOTSERVE_SLOTS nor the TOML file sets one."""
    p.add_argument("--model", help="'default' (embedded SmolLM2-135M) or a GGUF path [SLOTSERVE_MODEL]")
    p.add_argument("--backend", choices=["llama_cpp", "ctransformers", "fake"], help="[SLOTSERVE_BACKEND]")
    p.add_argument("--slots", type=_slots, help="concurrent sequences, or auto [SLOTSERVE_SLOTS]")
    p.set_defaults(slots_default=slots_default)
    p.add_argument(
        "--max-queue", type=int, dest="max_queue", help="requests that may wait [SLOTSERVE_MAX_QUEUE]"
    )
    p.add_argument("--n-ctx-per-slot", type=int, dest="n_ctx_per_slot", help="[SLOTSERVE_N_CTX_PER_SLOT]")
    p.add_argument("--threads", type=int, help="CPU threads, 0 = all [SLOTSERVE_THREADS]")
    p.add_argument("--config", type=Path, help="a TOML file of settings (the runtime's and the server's)")
    p.add_argument(
        "--models-dir",
        dest="models_dir",
        help="serve every GGUF in this folder by its stem [SLOTSERVE_MODELS_DIR]",
    )
    p.add_argument(
        "--max-loaded-models", type=int, dest="max_loaded_models", help="[SLOTSERVE_MAX_LOADED_MODELS]"
    )
    p.add_argument(
        "--keep-alive", dest="keep_alive", help="idle time before a model unloads [SLOTSERVE_KEEP_ALIVE]"
    )


def _config(args: argparse.Namespace) -> RuntimeConfig:
    keys = ("model", "backend", "slots", "max_queue", "n_ctx_per_slot", "threads", "models_dir",
            "max_loaded_models", "keep_alive")  # fmt: skip
    overrides = {k: getattr(args, k) for k in keys}
    default = getattr(args, "slots_default", None)
    if args.slots is None and default is not None and not _slots_set_elsewhere(args.config):
        overrides["slots"] = default
    return RuntimeConfig.load(args.config, others=(*ServerSettings.__struct_fields__, "models"), **overrides)


def _slots_set_elsewhere(config: Path | None) -> bool:
    """Whether SLOTSERVE_SLOTS or the TOML file sets the slot count (they go before a command's
    own default)."""
    return "SLOTSERVE_SLOTS" in os.environ or "slots" in read_toml(config)


def _runtime(args: argparse.Namespace) -> Runtime:
    """The Runtime of the options: the default model, ``--models-dir`` and the TOML file's
    ``[models.NAME]`` tables."""
    config = _config(args)
    return Runtime(config, models=ModelRegistry.load(config, read_toml(args.config).get("models")))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``slotserve`` command."""
    parser = argparse.ArgumentParser(prog="slotserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the main job: prompts at once through the slots, then one at a time")
    _config_options(run)
    run.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="a JSON list of prompts")
    run.add_argument("--max-tokens", type=int, default=64, dest="max_tokens")
    run.add_argument("--json", type=Path, help="also write the report to this JSON file")

    gen = sub.add_parser("generate", help="stream one answer to stdout")
    _config_options(gen, slots_default=1)
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    gen.add_argument("--max-tokens", type=int, default=256, dest="max_tokens")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--seed", type=int)

    srv = sub.add_parser("serve", help="HTTP server: Ollama- and OpenAI-compatible API, /health, /metrics")
    _config_options(srv)
    srv.add_argument("--host", help="address to bind (default 127.0.0.1: this host only) [SLOTSERVE_HOST]")
    srv.add_argument("--port", type=int, help="TCP port (default 11434, Ollama's) [SLOTSERVE_PORT]")
    srv.add_argument("--max-body-bytes", type=int, dest="max_body_bytes", help="[SLOTSERVE_MAX_BODY_BYTES]")
    srv.add_argument("--model-name", dest="model_name", help="name to serve it as [SLOTSERVE_MODEL_NAME]")
    srv.add_argument("--ray", action="store_true", help="serve from replicas on Ray Serve (the ray extra)")
    srv.add_argument("--replicas", type=int, default=1, help="with --ray: Engine replicas, one per GPU")
    srv.add_argument(
        "--address", help="with --ray: the Ray cluster (auto, ray://host:10001); default: a local one"
    )
    srv.add_argument("--replica-cpus", type=float, default=1.0, dest="replica_cpus",
                     help="with --ray: logical CPUs each replica reserves")  # fmt: skip

    bench = sub.add_parser(
        "bench",
        help="benchmarks: table, JSON and PNG (see runtime/bench/suite.py)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_bench_arguments(bench)

    conv = sub.add_parser("convert", help="write a GGUF model in a form an older loader accepts")
    conv.add_argument("--for", dest="target_backend", choices=["ctransformers"], required=True)
    conv.add_argument("source", help="'default' (the embedded SmolLM2-135M) or a GGUF path")
    conv.add_argument("target", type=Path, help="the GGUF file to write")
    return parser


async def _generate(args: argparse.Namespace) -> None:
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    request: GenerateRequest | ChatRequest
    if args.raw:
        request = GenerateRequest(prompt=args.prompt, **sampling)
    else:
        request = ChatRequest(messages=(ChatMessage(role="user", content=args.prompt),), **sampling)
    async with _runtime(args) as rt, rt.generate(request) as stream:
        async for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    sys.stdout.write("\n")


async def _run(args: argparse.Namespace) -> None:
    report = await run_job(_config(args), args.prompts, args.max_tokens)
    if args.json:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(report)))


async def _serve(args: argparse.Namespace) -> None:
    from runtime.server.serve import serve  # starlette and uvicorn load only here

    keys = ("host", "port", "max_body_bytes", "model_name")
    settings = ServerSettings.load(args.config, **{k: getattr(args, k) for k in keys})
    if args.ray:
        if args.replicas < 1:
            raise ConfigError(f"--replicas is {args.replicas}; it must be 1 or more")
        try:
            from runtime.ray_serve.launch import serve_on_ray
        except ImportError as exc:
            raise ConfigError(f"--ray needs Ray Serve: pip install 'slotserve[ray]' ({exc})") from None
        await serve_on_ray(_config(args), settings, replicas=args.replicas, address=args.address,
                           cpus_per_replica=args.replica_cpus)  # fmt: skip
        return
    if args.replicas != 1 or args.address is not None:
        raise ConfigError("--replicas and --address go with --ray")
    await serve(_runtime(args), settings)


async def _bench(args: argparse.Namespace) -> None:
    from runtime.bench.options import options_from
    from runtime.bench.suite import run_bench  # llama_cpp, httpx and matplotlib load only here

    await run_bench(options_from(args))


async def _convert(args: argparse.Namespace) -> None:
    from runtime.backends.ctransformers.convert import convert_for_ctransformers
    from runtime.backends.model_files import resolve_model

    source = resolve_model(args.source)
    written = await anyio.to_thread.run_sync(convert_for_ctransformers, source, args.target)
    print(f"wrote {written} for {args.target_backend}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``slotserve``; returns the exit status (2 for a slotserve error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    commands = {"run": _run, "generate": _generate, "serve": _serve, "convert": _convert, "bench": _bench}
    try:
        anyio.run(commands[args.command], args)
    except SlotserveError as exc:
        print(f"slotserve: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
