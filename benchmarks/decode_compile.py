"""Does torch.compile of the decode step pay? Generation process CPU time, eager vs compiled.

    python -m benchmarks.decode_compile                 # both shapes, 3 timed rounds each
    python -m benchmarks.decode_compile --shape a --rounds 5

One round is `rollout.generate` on the shape's prompts (benchmarks/shapes.py: B prompts x G, up to
max_new_tokens, temperature 1). `compiled` wraps the model's forward in
`torch.compile(dynamic=True)` (the KV cache grows by one position a step, so shapes are dynamic);
its first round includes the compilation. Each variant runs in its own process, one torch thread,
on the same saved model and seeds, so both sample the same tokens (checked: the completion token
counts must agree). Columns: CPU-seconds of the first round, the median CPU-seconds of the timed
rounds, and eager / compiled (above 1 means compiling pays).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker(model_dir: str, shape_name: str, compiled: bool, rounds: int) -> None:
    """One variant in this process; prints one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.shapes import SHAPES, prompt_ids, prompt_messages
    from rlft import rollout

    torch.set_num_threads(1)
    shape = SHAPES[shape_name]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = prompt_ids(tok, prompt_messages(shape, shape.prompts))
    sampling = rollout.SamplingParams(temperature=1.0, max_new_tokens=shape.max_new_tokens)
    if compiled:
        model.forward = torch.compile(model.forward, dynamic=True)
    times, tokens = [], []
    for r in range(rounds + 1):
        start = _cpu()
        out = rollout.generate(model, tok, ids, sampling, shape.group_size, rollout.seed_generator(0, r))
        times.append(_cpu() - start)
        tokens.append(int(out.completion_mask.sum()))
    print(json.dumps({"first": times[0], "median": statistics.median(times[1:]), "tokens": tokens}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["a", "b"], nargs="*", default=["a", "b"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", nargs=3, metavar=("MODEL_DIR", "SHAPE", "COMPILED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args.worker[0], args.worker[1], args.worker[2] == "1", args.rounds)
        return
    from benchmarks.shapes import SHAPES, save_model

    table = Table(title="generation, process CPU-s per round (one torch thread)")
    for column in ("shape", "eager: first", "eager: median", "compiled: first (compiles)", "compiled: median",
                   "eager / compiled"):
        table.add_column(column, justify="right")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shape:
            model_dir = save_model(SHAPES[name], Path(tmp) / name)
            res = {}
            for compiled in (False, True):
                cmd = [sys.executable, "-m", "benchmarks.decode_compile", "--rounds", str(args.rounds),
                       "--worker", str(model_dir), name, "1" if compiled else "0"]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                res[compiled] = json.loads(out.strip().splitlines()[-1])
            if res[False]["tokens"] != res[True]["tokens"]:
                Console().print(f"shape {name}: the variants sampled different tokens: {res}")
            table.add_row(name, f"{res[False]['first']:.2f}", f"{res[False]['median']:.3f}",
                          f"{res[True]['first']:.2f}", f"{res[True]['median']:.3f}",
                          f"{res[False]['median'] / res[True]['median']:.2f}x")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
