"""A two-choice cloze task from held-out text: which word comes next, the text's own or a random one.

Each example takes up to --context-chars characters of the text ending right before a word, and offers
that word and a distractor drawn from the same text's words (by frequency, never the right one), each
with its leading space; the label is where the right word landed. The default reads the last 10% of a
text file (`--start 0.9`), the quickstart's validation part of Tiny Shakespeare, which a model trained
on the first 90% has never seen. Accuracy rises with a model's grasp of the text, so a small sweep
sees it move, unlike real downstream tasks at these sizes (docs/scaling.md, "Accuracy against loss").

    python tools/make_cloze.py experiments/data/tinyshakespeare.txt OUT.jsonl [--n 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np


def make(text: str, n: int, context_chars: int = 200, seed: int = 0) -> list[dict]:
    words = [(m.start(), m.group()) for m in re.finditer(r"[A-Za-z]+", text)]
    vocab, counts = np.unique([w.lower() for _, w in words], return_counts=True)
    rng = np.random.default_rng(seed)
    picks = rng.choice(np.arange(20, len(words)), size=min(n, len(words) - 20), replace=False)
    out = []
    for i in sorted(picks):
        at, word = words[i]
        if text[at - 1] != " ":
            continue  # the choice carries its leading space; a word after a newline would not
        wrong = word
        while wrong.lower() == word.lower():
            wrong = str(rng.choice(vocab, p=counts / counts.sum()))
        if word[0].isupper():  # the same capitalisation, so case does not give the answer away
            wrong = wrong.upper() if word.isupper() and len(word) > 1 else wrong.capitalize()
        choices = [" " + word, " " + wrong]
        label = int(rng.integers(2))
        if label:
            choices.reverse()
        out.append({"context": text[max(0, at - 1 - context_chars):at - 1], "choices": choices, "label": label})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("text")
    ap.add_argument("out")
    ap.add_argument("--start", type=float, default=0.9, help="use the text from this fraction on (default 0.9)")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--context-chars", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    rows = make(text[int(len(text) * a.start):], a.n, a.context_chars, a.seed)
    with open(a.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(rows)} examples: {a.out}")


if __name__ == "__main__":
    main()
