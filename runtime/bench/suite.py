"""``slotserve bench``: run the chosen sections in one process, one after another.

1. plain     the limit: N sequences batched by a plain llama.cpp loop (runtime.bench.plain)
2. embedded  slotserve's embedded API at the same N (runtime.bench.embedded), side by side with 1;
             then what llama.cpp's sampler chain costs a step of 8 rows (runtime.bench.sampling)
3. servers   llama.cpp's C++ server and llama-cpp-python's against ``slotserve serve`` (runtime.bench.servers)
4. dispatch  the runtime's own cost per token, on the fake backend (runtime.bench.dispatch)
5. memory    weights, KV per slot and resident memory per slot count (runtime.bench.memory)
6. gpurate   the runtime at a GPU's step rate, embedded and over HTTP (runtime.bench.gpu_rate)
7. structured 4 JSON-schema-bound requests against 4 free ones, and the grammar engines compared
             (runtime.bench.structured, runtime.bench.grammar_engines)
8. ray       ``slotserve serve --ray`` against ``slotserve serve``, and Ray's start-up and memory
             (runtime.bench.ray_hop; the ray extra)
9. admission fairness between tenants, weights, the predicted start, deadlines (runtime.bench.admission)

Each section prints its table when it ends; at the end ``bench.json`` and ``bench.png`` are
written to the output folder. With section 3, llama-server is found (or built: minutes) first,
before any section runs.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Any, TextIO

import anyio
import msgspec

from runtime.bench.options import BenchOptions
from runtime.bench.report import (
    batching_limit,
    plot,
    print_batching,
    print_dispatch,
    print_gpu_rate,
    print_sampling,
    print_servers,
    print_targets,
    write_json,
)
from runtime.bench.workload import machine

__all__ = ["run_bench"]


def _plain(record: Any) -> Any:
    return msgspec.to_builtins(record)


async def run_bench(options: BenchOptions, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Run ``options.sections``; print each table, write ``bench.json`` and ``bench.png`` to
    ``options.out_dir`` and return what was written.

    :raises ModelLoadError: if the model cannot be loaded.
    :raises RuntimeError: if a server of section 3 does not start, or llama-server is to be
        built and the build fails.
    :raises FileNotFoundError: if ``options.llama_server`` is a path to no executable file.
    """
    options.out_dir.mkdir(parents=True, exist_ok=True)
    chosen = set(options.sections)
    result: dict[str, Any] = {
        "machine": machine(),
        "workload": _plain(options.workload),
        "n_list": list(options.n_list),
        "sections": list(options.sections),
    }
    out.write(f"slotserve bench: {', '.join(options.sections)}; N = {', '.join(map(str, options.n_list))}; "
              f"{options.workload.max_tokens} tokens a request, {options.workload.repeats} round(s); "
              f"{result['machine']['cores']} cores, load {result['machine']['load_average_1m']:.2f}\n")  # fmt: skip
    llama_server = None
    if "servers" in chosen:
        from runtime.bench.llama_server import find_llama_server

        def say(message: str) -> None:
            out.write(f"llama-server: {message}\n")
            out.flush()

        llama_server = await anyio.to_thread.run_sync(
            lambda: find_llama_server(options.llama_server, say=say)
        )
    if chosen & {"plain", "embedded"}:
        from runtime.bench.batching import measure_batching

        rows = await measure_batching(
            options.workload, options.n_list, plain="plain" in chosen, slotserve="embedded" in chosen
        )
        result["batching"] = _plain(rows)
        print_batching(result["batching"], out)
        if "embedded" in chosen:
            from runtime.bench.sampling import measure_sampling

            chains = await anyio.to_thread.run_sync(measure_sampling, options.workload)
            result["sampling"] = _plain(chains)
            print_sampling(result["sampling"], out)
    if "servers" in chosen:
        from runtime.bench.servers import measure_servers

        logging.getLogger("httpx").setLevel(logging.WARNING)  # else a line per request with -v

        servers = await measure_servers(
            options.workload,
            options.clients,
            options.requests_per_client,
            log_dir=options.out_dir,
            llama_server=llama_server,
        )
        result["servers"] = _plain(servers)
        print_servers(result["servers"], out, batching_limit(result))
    if "dispatch" in chosen:
        from runtime.bench.dispatch import measure_dispatch

        dispatch = await measure_dispatch(
            options.dispatch_slots, options.dispatch_tokens, max(options.workload.repeats, 1)
        )
        result["dispatch"] = _plain(dispatch)
        print_dispatch(result["dispatch"], out)
    if "memory" in chosen:
        from runtime.bench.memory import measure_memory

        out.write("\nsection 5: memory\n")
        out.flush()
        result["memory"] = await anyio.to_thread.run_sync(measure_memory, options.n_list)
    if "gpurate" in chosen:
        from runtime.bench.gpu_rate import measure_gpu_rate

        passes = await measure_gpu_rate(options.workload.max_tokens, rounds=max(options.workload.repeats, 1))
        result["gpu_rate"] = _plain(passes)
        print_gpu_rate(result["gpu_rate"], out)
    if "structured" in chosen:
        from runtime.bench.structured import measure_structured, print_structured

        figures = await measure_structured(options.workload, rounds=max(options.workload.repeats, 1))
        result["structured"] = _plain(figures)
        print_structured(result["structured"], out)
    if "ray" in chosen:
        from runtime.bench.ray_hop import measure_ray_hop, print_ray_hop

        if importlib.util.find_spec("ray") is None:
            out.write("\nsection 8: Ray is not installed (the ray extra): left out\n")
        else:
            hop = await measure_ray_hop(
                options.workload, options.clients, options.requests_per_client, log_dir=options.out_dir
            )
            result["ray_hop"] = _plain(hop)
            print_ray_hop(result["ray_hop"], out)
    if "admission" in chosen:
        from runtime.bench.admission import measure_admission, print_admission

        admission = await measure_admission()
        result["admission"] = _plain(admission)
        print_admission(admission, out)
    result["load_average_1m_after"] = machine()["load_average_1m"]
    print_targets(result, out)
    write_json(result, options.out_dir / "bench.json")
    written = [options.out_dir / "bench.json"]
    if importlib.util.find_spec("matplotlib") is None:
        out.write("\nmatplotlib is not installed (the bench extra): no PNG\n")
    else:
        await anyio.to_thread.run_sync(plot, result, options.out_dir / "bench.png")
        written.append(options.out_dir / "bench.png")
    out.write(f"\nwrote {' and '.join(map(str, written))}\n")
    return result
