"""Writes RESULTS.md for benches/peers/run.sh from the `unimodel bench --json` reports.

    python3 report.py RUNS_DIR --started ... > RESULTS.md

Standard library only. Each report's label is "PEER CONFIG[ echo]"; matmul reports hold a
c=1 and/or a c=64 step.
"""

import argparse
import json
import os
import pathlib
import platform


def load(runs: pathlib.Path) -> list[dict]:
    rows = []
    for path in sorted(runs.glob("*.json")):
        report = json.loads(path.read_text())
        parts = report["label"].split(" ")
        peer, config = parts[0], parts[1] if len(parts) > 1 else ""
        model = "echo" if path.stem.endswith("-echo") else "matmul"
        for step in report["steps"]:
            lat = step["latency_us"]
            rows.append(
                {
                    "peer": peer,
                    "config": config,
                    "model": model,
                    "c": step["concurrency"],
                    "rps": step["ok_per_s"],
                    "p50": lat["p50_us"] / 1e3,
                    "p90": lat["p90_us"] / 1e3,
                    "p99": lat["p99_us"] / 1e3,
                    "requests": step["requests"],
                    "errors": step["error_count"],
                    "error_kinds": step["errors"],
                }
            )
    return rows


def best(rows, peer, model, c, key, lowest=False):
    """The row of `peer` with the best `key` (highest, or lowest) at concurrency `c`."""
    mine = [r for r in rows if r["peer"] == peer and r["model"] == model and r["c"] == c]
    mine = [r for r in mine if r["requests"] > r["errors"]]
    if not mine:
        return None
    return (min if lowest else max)(mine, key=lambda r: r[key])


def first_config(rows, peer, model, c):
    """The row of the first (least delay) configuration measured at `c`."""
    mine = [r for r in rows if r["peer"] == peer and r["model"] == model and r["c"] == c]
    return mine[0] if mine else None


def ratio_line(name, ours, theirs, key, target, higher_is_better=True):
    if ours is None or theirs is None:
        return f"| {name} | n/a | {target} | not measured |"
    a, b = ours[key], theirs[key]
    if higher_is_better:
        r = a / b if b else float("inf")
        met = r >= float(target.rstrip("x").lstrip("≥ "))
        shown = f"{r:.2f}x ({a:,.0f} vs {b:,.0f} req/s)"
    else:
        r = b / a if a else float("inf")
        met = a <= b
        shown = f"{r:.2f}x ({a:.3f} vs {b:.3f} ms p50)"
    return f"| {name} | {shown} | {target} | {'met' if met else 'MISSED'} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", type=pathlib.Path)
    parser.add_argument("--started", default="")
    parser.add_argument("--load-before", default="")
    parser.add_argument("--load-after", default="")
    parser.add_argument("--duration", default="")
    parser.add_argument("--warmup", default="")
    parser.add_argument("--quick", default="0")
    args = parser.parse_args()
    rows = load(args.runs)

    cpu = "unknown CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    print("# Peer comparison\n")
    print(
        f"Run {args.started} on {platform.node() or 'this machine'}: {os.cpu_count()} CPUs "
        f"({cpu}), Linux {platform.release()}; client and server share the CPUs, loopback only. "
        f"{'Quick mode, ' if args.quick == '1' else ''}{args.warmup} s warm-up and "
        f"{args.duration} s measured per step. Load average before/after: "
        f"{args.load_before} / {args.load_after} (above the CPU count means other work "
        f"shared the machine). Numbers from one run: compare ratios, not absolutes.\n"
    )
    print("Reproduce: `benches/peers/run.sh` (or `--quick`).\n")
    print("## Targets\n")
    print("| comparison | measured | target | |")
    print("|---|---|---|---|")
    um64 = best(rows, "unimodel", "matmul", 64, "rps")
    print(
        ratio_line(
            "matmul c=64 throughput, UniModel / stock Triton (best delay of each)",
            um64,
            best(rows, "triton", "matmul", 64, "rps"),
            "rps",
            "≥ 2x",
        )
    )
    print(
        ratio_line(
            "matmul c=64 throughput, UniModel / LitServe",
            um64,
            best(rows, "litserve", "matmul", 64, "rps"),
            "rps",
            "≥ 30x",
        )
    )
    um1 = first_config(rows, "unimodel", "matmul", 1)
    print(
        ratio_line(
            "matmul c=1 p50, stock Triton (no delay) / UniModel (no delay)",
            um1,
            first_config(rows, "triton", "matmul", 1),
            "p50",
            "≥ 1x",
            higher_is_better=False,
        )
    )
    print(
        ratio_line(
            "matmul c=1 p50, FastAPI / UniModel (no delay)",
            um1,
            first_config(rows, "fastapi", "matmul", 1),
            "p50",
            "≥ 1x",
            higher_is_better=False,
        )
    )
    um_echo = first_config(rows, "unimodel", "echo", 1)
    for peer, name in (("triton", "stock Triton"), ("fastapi", "FastAPI")):
        print(
            ratio_line(
                f"echo c=1 p50, {name} / UniModel",
                um_echo,
                first_config(rows, peer, "echo", 1),
                "p50",
                "≥ 1x",
                higher_is_better=False,
            )
        )
    print("\n## Every step\n")
    print("Latency in ms; req/s counts answered requests. `config` is the batching delay.\n")
    print("| server | config | model | c | req/s | p50 | p90 | p99 | requests | errors |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        errors = ", ".join(f"{k} x{n}" for k, n in r["error_kinds"].items()) or "0"
        print(
            f"| {r['peer']} | {r['config']} | {r['model']} | {r['c']} | {r['rps']:,.0f} | "
            f"{r['p50']:.3f} | {r['p90']:.3f} | {r['p99']:.3f} | {r['requests']} | {errors} |"
        )
    print("\n![latency against throughput](peers.png)")


if __name__ == "__main__":
    main()
