"""Summarises benches/peers/alternate.sh: per round, c=64 matmul req/s (best delay) and c=1
matmul p50 (smallest delay) of the old and new binaries and of stock Triton, with ratios.

    python3 alternate.py RESULTS_DIR
"""

import json
import pathlib
import sys


def steps(run_dir: pathlib.Path, model: str):
    for path in sorted((run_dir / "runs").glob("*.json")):
        is_echo = path.stem.endswith("-echo")
        if (model == "echo") != is_echo:
            continue
        for step in json.loads(path.read_text())["steps"]:
            if step["ok"] > 0 and step["error_count"] == 0:
                yield path.stem, step


def c1_p50_ms(run_dir, model="matmul"):
    # The first run at c=1 is the smallest delay (run.sh measures c=1 there only).
    for _, step in steps(run_dir, model):
        if step["concurrency"] == 1:
            return step["latency_us"]["p50_us"] / 1e3
    return None


def c64_rps(run_dir):
    best = [s["ok_per_s"] for _, s in steps(run_dir, "matmul") if s["concurrency"] == 64]
    return max(best) if best else None


def load(root: pathlib.Path, name: str) -> str:
    path = root / f"{name}.load"
    return path.read_text().strip() if path.exists() else "?"


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def main() -> None:
    root = pathlib.Path(sys.argv[1])
    rounds = sorted(
        {p.name.split("-")[0] for p in root.iterdir() if p.is_dir() and p.name[0].isdigit()},
        key=int,
    )
    print(
        "| round | old c=64 req/s | new c=64 req/s | new/old | old c=1 p50 ms | new c=1 p50 ms "
        "| new/old | Triton c=1 p50 ms | new/Triton | echo c=1 p50 ms old / new / Triton "
        "| load old / new / Triton |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rounds:
        old, new, tri = (root / f"{r}-{t}" for t in ("old", "new", "triton"))
        o64, n64 = c64_rps(old), c64_rps(new)
        o1, n1, t1 = c1_p50_ms(old), c1_p50_ms(new), c1_p50_ms(tri)
        eo, en, et = (c1_p50_ms(d, "echo") for d in (old, new, tri))
        print(
            f"| {r} | {fmt(o64, '.0f')} | {fmt(n64, '.0f')} | {fmt(ratio(n64, o64), '.3f')} "
            f"| {fmt(o1, '.3f')} | {fmt(n1, '.3f')} | {fmt(ratio(n1, o1), '.3f')} "
            f"| {fmt(t1, '.3f')} | {fmt(ratio(n1, t1), '.3f')} "
            f"| {fmt(eo, '.3f')} / {fmt(en, '.3f')} / {fmt(et, '.3f')} "
            f"| {' / '.join(load(root, f'{r}-{t}') for t in ('old', 'new', 'triton'))} |"
        )


if __name__ == "__main__":
    main()
