"""The benchmark's outputs: tables on stdout, ``bench.json``, and ``bench.png``.

The PNG has two panels: aggregate tok/s against sequences (the plain loop, slotserve, and the
HTTP servers at their client count), and the TTFT distribution of each measurement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

import msgspec

__all__ = [
    "TARGETS",
    "batching_limit",
    "markdown",
    "plot",
    "print_batching",
    "print_dispatch",
    "print_gpu_rate",
    "print_sampling",
    "print_servers",
    "print_targets",
    "write_json",
]

TARGETS = {
    "embedded_vs_plain": 0.95,
    "server_vs_llama_server": 1.0,
    "server_ttft_vs_llama_server": 1.0,
    "server_vs_llama_cpp_server": 2.5,
    "dispatch_tokens_per_s": 50_000.0,
    "gpu_rate_ratio": 0.9,
}
"""slotserve / plain loop at every N (at least); slotserve's server / llama-server in tok/s (at
least) and TTFT p50 (at most); slotserve's server / llama-cpp-python's (at least); fake tok/s;
the share of one step per token at a GPU's rate (N = 128, each way)."""


SERVER_STYLES = (
    ("llama_server", "llama-server (llama.cpp's C++ server)", "D", "llama-server"),
    ("slotserve_server", "slotserve server", "^", "slotserve\nserver"),
    ("llama_cpp_server", "llama-cpp-python server", "x", "llama-cpp-python\nserver"),
    (
        "llama_cpp_server_defaults",
        "llama-cpp-python server, its default threads",
        "+",
        "llama-cpp-python\nserver,\ndefaults",
    ),
)
"""(key in the result, name, marker, box label) of each server; a key missing from a result,
or None there, was not run (llama-server left out, or a bench.json older than it)."""


def _rounds(ratios: list[float], sep: str = " ") -> str:
    return sep.join(f"{r:.2f}" for r in ratios)


def _servers_run(s: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [style for style in SERVER_STYLES if s.get(style[0]) is not None]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


def print_batching(rows: list[dict[str, Any]], out: TextIO) -> None:
    """Sections 1 and 2: one line per N and measurement (TTFT and ITL in milliseconds)."""
    out.write("\nsections 1-2: plain batched loop (the limit) vs slotserve's embedded API\n")
    out.write(f"{'N':>4} {'what':<10} {'tokens':>6} {'tok/s':>8} {'TTFT p50':>8} {'TTFT p99':>8} "
              f"{'ITL p50':>8} {'ITL p99':>8} {'ratio':>6}  rounds\n")  # fmt: skip
    for row in rows:
        for key in ("plain", "slotserve"):
            f = row[key]
            if f is None:
                continue
            ratio = f"{row['ratio']:6.3f}" if key == "slotserve" and row["ratio"] is not None else " " * 6
            rounds = " ".join(f"{r:.3f}" for r in row["round_ratios"]) if key == "slotserve" else ""
            out.write(
                f"{row['n']:>4} {key:<10} {f['completion_tokens']:>6} {f['tokens_per_s']:>8.1f} "
                f"{_ms(f['ttft_p50_s'])} {_ms(f['ttft_p99_s'])} {_ms(f['itl_p50_s'])} {_ms(f['itl_p99_s'])} "
                f"{ratio}  {rounds}\n"
            )
    out.flush()


def batching_limit(result: dict[str, Any]) -> float | None:
    """The most a server that batches can gain over one that serves a request at a time, on
    this machine: the plain loop's tok/s at N = clients over the llama-cpp-python server's
    (same threads). None unless both were measured."""
    servers = result.get("servers")
    rows = [r for r in result.get("batching") or () if servers and r["n"] == servers["clients"]]
    if not servers or not rows or rows[0]["plain"] is None:
        return None
    return float(rows[0]["plain"]["tokens_per_s"] / servers["llama_cpp_server"]["tokens_per_s"])


def print_servers(s: dict[str, Any], out: TextIO, limit: float | None = None) -> None:
    """Section 3: the servers under the same clients (TTFT and ITL in milliseconds)."""
    out.write(f"\nsection 3: HTTP servers, {s['clients']} concurrent streaming clients, "
              f"{s['requests_per_client']} requests each; slotserve at {s['threads']} threads\n")  # fmt: skip
    if s.get("llama_server") is not None:
        out.write(f"llama-server at the same threads, {s['clients']} slots of {s['n_ctx_per_slot']} tokens "
                  f"(-np {s['clients']} --no-kv-unified): {s['llama_server_binary']}\n")  # fmt: skip
    out.write(f"{'server':<26} {'tokens':>6} {'tok/s':>8} {'TTFT p50':>8} {'TTFT p99':>8} {'ITL p50':>8}\n")
    for key, _, _, _ in _servers_run(s):
        f = s[key]
        out.write(f"{key:<26} {f['completion_tokens']:>6} {f['tokens_per_s']:>8.1f} "
                  f"{_ms(f['ttft_p50_s'])} {_ms(f['ttft_p99_s'])} {_ms(f['itl_p50_s'])}\n")  # fmt: skip
    if s.get("llama_server") is not None:
        out.write(f"slotserve / llama-server, tok/s: {s['ratio_llama_server']:.2f} "
                  f"(rounds: {_rounds(s['round_ratios_llama_server'])}); "
                  f"TTFT p50: {s['ttft_p50_ratio_llama_server']:.2f}\n")  # fmt: skip
    out.write(
        f"slotserve / llama-cpp-python's, same threads: {s['ratio']:.2f} (rounds: {_rounds(s['round_ratios'])})\n"
    )
    out.write(f"slotserve / llama-cpp-python's, its default threads: {s['ratio_defaults']:.2f} "
              f"(rounds: {_rounds(s['round_ratios_defaults'])})\n")  # fmt: skip
    if limit is not None:
        out.write(
            f"batching's limit here (plain loop at N={s['clients']} / that server, same threads): {limit:.2f}\n"
        )
    out.flush()


def print_dispatch(d: dict[str, Any], out: TextIO) -> None:
    """Section 4: tokens per second through the runtime on the free fake model."""
    out.write(f"\nsection 4: dispatch overhead, fake backend (zero compute), {d['slots']} slots\n")
    out.write(
        f"{d['tokens_per_s']:,.0f} tok/s ({d['us_per_token']:.1f} us per token); the fake's own step "
        f"{d['fake_step_share']:.0%} of the time, {d['tokens_per_s_without_fake']:,.0f} tok/s without it; "
        f"{d['steps_per_s']:,.0f} steps/s; {d['tokens_per_cpu_s']:,.0f} tok per CPU second; "
        f"passes: {', '.join(f'{x:,.0f}' for x in d['all_tokens_per_s'])}\n"
        f"the floor (a bare asyncio hand-off of a token per reader per step): "
        f"{d['floor_tokens_per_s']:,.0f} tok/s; slotserve carries {d['share_of_floor']:.0%} of it\n"
    )
    out.flush()


def print_sampling(f: dict[str, Any], out: TextIO) -> None:
    """Section 2's footnote: the sampler chain's cost per step."""
    out.write(
        f"choosing the tokens of a step of {f['n']} rows (medians of {f['steps']}; the step "
        f"{f['decode_step_s'] * 1e3:.1f} ms): argmax {f['argmax_step_s'] * 1e6:.0f} us, the default "
        f"sampler chain {f['chain_step_s'] * 1e6:.0f} us ({f['chain_per_row_us']:.0f} us a row)\n"
    )
    out.flush()


def gpu_rate_medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (N, mode): the pass of median ratio."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["n"], row["mode"]), []).append(row)
    return [sorted(g, key=lambda r: r["ratio"])[(len(g) - 1) // 2] for g in groups.values()]


def print_gpu_rate(rows: list[dict[str, Any]], out: TextIO) -> None:
    """Section 6: the share of one step per token at a GPU's step rate."""
    out.write("\nsection 6: at a GPU's rate (a fake step that sleeps), against one step per token\n")
    out.write(f"{'N':>4} {'step':>7} {'measured':>8} {'way':<9} {'tokens':>6} {'tok/s':>8} "
              f"{'limit':>8} {'ratio':>6} {'rounds':<20}\n")  # fmt: skip
    for row in gpu_rate_medians(rows):
        rounds = [r["ratio"] for r in rows if (r["n"], r["mode"]) == (row["n"], row["mode"])]
        out.write(
            f"{row['n']:>4} {row['step_s'] * 1e3:>5.1f}ms {row['step_measured_s'] * 1e3:>6.2f}ms {row['mode']:<9} "
            f"{row['tokens']:>6} {row['tokens_per_s']:>8,.0f} {row['limit_tokens_per_s']:>8,.0f} "
            f"{row['ratio']:>6.3f} {', '.join(f'{x:.3f}' for x in rounds)}\n"
        )
    out.flush()


def targets(result: dict[str, Any]) -> list[tuple[str, float, str, float, bool]]:
    """(what, measured, ">=" or "<=", target, met) for each target the run measured."""
    found = []

    def add(what: str, measured: float, key: str, op: str = ">=") -> None:
        t = TARGETS[key]
        found.append((what, measured, op, t, measured >= t if op == ">=" else measured <= t))

    for row in result.get("batching") or ():
        if row["ratio"] is not None:
            add(f"slotserve / plain loop, N={row['n']}", row["ratio"], "embedded_vs_plain")
    if servers := result.get("servers"):
        if servers.get("llama_server") is not None:
            add(
                "slotserve server / llama-server, tok/s",
                servers["ratio_llama_server"],
                "server_vs_llama_server",
            )
            add("slotserve server / llama-server, TTFT p50", servers["ttft_p50_ratio_llama_server"],
                "server_ttft_vs_llama_server", "<=")  # fmt: skip
        for what, key in (("same threads", "ratio"), ("its default threads", "ratio_defaults")):
            add(f"slotserve server / llama-cpp-python's, {what}", servers[key], "server_vs_llama_cpp_server")
    if dispatch := result.get("dispatch"):
        add("fake backend tok/s", dispatch["tokens_per_s"], "dispatch_tokens_per_s")
    for row in gpu_rate_medians(result.get("gpu_rate") or []):
        if row["n"] == 128:
            add(f"GPU rate N=128, {row['mode']} / one step per token", row["ratio"], "gpu_rate_ratio")
    return found


def print_targets(result: dict[str, Any], out: TextIO) -> None:
    """The targets against what was measured."""
    rows = targets(result)
    if not rows:
        return
    out.write("\ntargets\n")
    for what, measured, op, target, met in rows:
        out.write(f"{what:<58} {measured:>10,.3f} {op} {target:<10,g} {'met' if met else 'MISSED'}\n")
    out.flush()


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write ``result`` as indented JSON."""
    path.write_bytes(msgspec.json.format(msgspec.json.encode(result), indent=2))


def plot(result: dict[str, Any], path: Path) -> None:
    """Draw tok/s against sequences and the TTFT distributions into a PNG at ``path``."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no display needed

    fig = Figure(figsize=(13, 5), layout="constrained")
    speed, ttft = fig.subplots(1, 2)
    labels: list[str] = []
    samples: list[list[float]] = []
    rows = result.get("batching") or []
    for key, style in (("plain", "o-"), ("slotserve", "s-")):
        points = [(r["n"], r[key]) for r in rows if r[key] is not None]
        if points:
            name = "plain llama.cpp loop" if key == "plain" else "slotserve (embedded)"
            speed.plot([n for n, _ in points], [f["tokens_per_s"] for _, f in points], style, label=name)
            for n, f in points:
                labels.append(f"{key} N={n}")
                samples.append([s * 1000 for s in f["ttft_s"]])
    xs = {r["n"] for r in rows}
    if servers := result.get("servers"):
        xs.add(servers["clients"])
        for key, name, marker, box in _servers_run(servers):
            f = servers[key]
            label = f"{name} ({servers['clients']} clients)"
            speed.plot([servers["clients"]], [f["tokens_per_s"]], marker, markersize=10, label=label)
            labels.append(box)
            samples.append([s * 1000 for s in f["ttft_s"]])
    speed.set_ylim(bottom=0)
    speed.set_xscale("log", base=2)
    if xs:
        speed.set_xticks(sorted(xs), [str(x) for x in sorted(xs)])
    speed.set_xlabel("concurrent sequences (slots / clients)")
    speed.set_ylabel("aggregate tokens/s")
    speed.set_title("throughput")
    speed.grid(True, alpha=0.3)
    if speed.lines:
        speed.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=8)
    if samples:
        ttft.boxplot(samples, tick_labels=labels, showfliers=True)
        ttft.tick_params(axis="x", labelrotation=60, labelsize=8)
    ttft.set_ylabel("time to first token (ms)")
    ttft.set_title("TTFT distribution")
    ttft.grid(True, axis="y", alpha=0.3)
    model = result.get("workload", {}).get("model", "")
    fig.suptitle(f"slotserve bench: {model}, {result.get('machine', {}).get('cpu', '')}")
    fig.savefig(path, dpi=110)


def markdown(result: dict[str, Any]) -> str:
    """The README's tables of a result (sections 1 to 4), in Markdown."""
    lines = ["| N | plain loop tok/s | slotserve tok/s | ratio: median of rounds (rounds) | slotserve TTFT p50 / p99 ms | slotserve ITL p50 / p99 ms |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in result.get("batching") or ():
        p, f = row["plain"], row["slotserve"]
        if p is None or f is None:
            continue
        rounds = ", ".join(f"{r:.2f}" for r in row["round_ratios"])
        lines.append(
            f"| {row['n']} | {p['tokens_per_s']:.1f} | {f['tokens_per_s']:.1f} | {row['ratio']:.3f} ({rounds}) | "
            f"{f['ttft_p50_s'] * 1e3:.0f} / {f['ttft_p99_s'] * 1e3:.0f} | {f['itl_p50_s'] * 1e3:.1f} / {f['itl_p99_s'] * 1e3:.1f} |"
        )
    if servers := result.get("servers"):
        lines += [
            "",
            "| server | tok/s | TTFT p50 / p99 ms | ITL p50 ms | slotserve's tok/s ratio (rounds) |",
            "| --- | --- | --- | --- | --- |",
        ]
        ratio_keys = {"llama_server": ("ratio_llama_server", "round_ratios_llama_server"),
                      "llama_cpp_server": ("ratio", "round_ratios"),
                      "llama_cpp_server_defaults": ("ratio_defaults", "round_ratios_defaults")}  # fmt: skip
        for key, name, _, _ in _servers_run(servers):
            f = servers[key]
            ratio = ratio_keys.get(key)
            cell = f"{servers[ratio[0]]:.2f} ({_rounds(servers[ratio[1]], ', ')})" if ratio else ""
            lines.append(
                f"| {name} | {f['tokens_per_s']:.1f} | {f['ttft_p50_s'] * 1e3:.0f} / {f['ttft_p99_s'] * 1e3:.0f} | "
                f"{f['itl_p50_s'] * 1e3:.1f} | {cell} |"
            )
    if d := result.get("dispatch"):
        lines += ["", f"Dispatch: {d['tokens_per_s']:,.0f} tok/s ({d['us_per_token']:.1f} us per token), "
                  f"floor {d['floor_tokens_per_s']:,.0f} tok/s, share {d['share_of_floor']:.0%}."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m runtime.bench.report bench.json [--markdown]
    import json
    import sys

    source = Path(sys.argv[1])
    data = json.loads(source.read_text())
    if "--markdown" in sys.argv:
        sys.stdout.write(markdown(data))
    else:  # draw the PNG of a bench.json measured where matplotlib was missing
        plot(data, source.with_suffix(".png"))
