"""The optimized program of the bench model's train step, to compare two versions of jaxlm.

    python tools/step_hlo.py --out step.hlo [overrides ...]
    PYTHONPATH=/path/to/other/checkout python tools/step_hlo.py --out other.hlo
    cmp step.hlo other.hlo

Builds the model, optimizer and step exactly as `tools/bench_train.py` does (its default
dimensions, one CPU device), compiles the step ahead of time and writes the compiled
program's text without its source locations (the file and line each instruction was traced
from, which differ between two checkouts even when the program does not); prints its sha256
and which jaxlm it imported. A refactoring that leaves the train step alone leaves this text
byte for byte the same. `--with-locations` keeps them.
"""

from __future__ import annotations

import argparse
import hashlib
import re

import jax

import jaxlm
from jaxlm.config import load_config
from jaxlm.sharding import make_mesh
from jaxlm.step import Stepper, build


_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def without_locations(text: str) -> str:
    """The program's text less the source-location tables and each instruction's metadata={...}."""
    kept, skipping = [], False
    for line in text.splitlines():
        if line in _TABLES:
            skipping = True
        elif skipping and not line.strip():
            skipping = False
        elif not skipping:
            kept.append(re.sub(r",? metadata=\{[^{}]*\}", "", line))
    return "\n".join(kept) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="file for the compiled program's text")
    ap.add_argument("--with-locations", action="store_true", help="keep source files and lines in the text")
    ap.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    a = ap.parse_args()
    d_model, layers, heads, vocab, seq_len, batch = 384, 6, 6, 8192, 256, 8  # bench_train.py's defaults
    cfg = load_config(None, [
        "model.family=gpt2", f"model.d_model={d_model}", f"model.n_layers={layers}", f"model.n_heads={heads}",
        f"model.vocab_size={vocab}", f"model.max_seq_len={seq_len}", "model.bias=false",
        "model.tie_embeddings=true", "model.dtype=float32", f"train.seq_len={seq_len}",
        f"train.batch_size={batch}", "train.steps=1000000", "optim.schedule=constant", "optim.warmup_steps=0",
        "optim.lr=1e-3", "optim.weight_decay=0.1", "optim.grad_clip=0", "mesh.data=1", *a.overrides])
    mesh = make_mesh(cfg, jax.devices("cpu")[:1])
    model, tx, schedule = build(cfg, vocab, mesh)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    stepper.compile(stepper.abstract_state(), {"inputs": (batch, seq_len), "targets": (batch, seq_len)})
    text = stepper._train.as_text()
    if not a.with_locations:
        text = without_locations(text)
    with open(a.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{hashlib.sha256(text.encode()).hexdigest()}  {a.out}  ({len(text.splitlines())} lines; "
          f"jaxlm from {jaxlm.__file__})")


if __name__ == "__main__":
    main()
