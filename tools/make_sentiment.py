"""A sentiment task made from sentence templates, for fine-tuning and multiple-choice scoring.

Each sentence says how someone found something, with an adjective that carries the sentiment
("The knight thought the feast was noble."). The adjectives are split: the training and
validation examples use one set, the task file (the test) only the held-out ones, so a model
must carry what it learned about the training words to words it has never been fine-tuned on;
a model that read English before (the quickstart's Shakespeare) may know them.

Writes into DIR:
- train.jsonl, valid.jsonl: {"prompt", "completion"} (completion " positive" or " negative");
- chat.jsonl: the same training examples as {"messages": [user, assistant]};
- task.jsonl: {"context", "choices": [" positive", " negative"], "label"} on held-out adjectives.

    python tools/make_sentiment.py DIR [--train 2000] [--valid 200] [--test 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random

POSITIVE = ("good fair sweet noble gentle kind brave merry true happy glorious worthy lovely honest "
            "valiant gracious blessed wise rich excellent").split()
NEGATIVE = ("bad foul bitter vile cruel cowardly sad false wretched base rotten wicked ugly dishonest "
            "villainous loathsome cursed foolish poor dreadful").split()
HELD_OUT = {"fair", "noble", "valiant", "gracious", "excellent", "foul", "vile", "wretched", "villainous",
            "dreadful"}
PEOPLE = "the king|the queen|my lord|the lady|the knight|the fool|the duke|the soldier|her father|his friend".split("|")
THINGS = "the feast|the play|the letter|the battle|the song|the journey|the wine|the speech|the crown|the night".split("|")
FORMS = ("{p} thought {t} was {a}.", "{p} said that {t} was {a}.", "To {p}, {t} seemed {a}.",
         "{t} was {a}, said {p}.", "{p} found {t} most {a}.")
PROMPT = "Review: {s}\nSentiment:"
CHOICES = [" positive", " negative"]


def sentence(rng: random.Random, adjectives: list[str]) -> tuple[str, int]:
    adj = rng.choice(adjectives)
    label = 0 if adj in POSITIVE else 1
    s = rng.choice(FORMS).format(p=rng.choice(PEOPLE), t=rng.choice(THINGS), a=adj)
    return s[0].upper() + s[1:], label


def write(directory: str, n_train: int = 2000, n_valid: int = 200, n_test: int = 400, seed: int = 0) -> dict:
    """Write the four files; returns their paths by name."""
    rng = random.Random(seed)
    seen = [a for a in POSITIVE + NEGATIVE if a not in HELD_OUT]
    held = sorted(HELD_OUT)
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, f"{name}.jsonl") for name in ("train", "valid", "chat", "task")}
    train = [sentence(rng, seen) for _ in range(n_train)]
    valid = [sentence(rng, seen) for _ in range(n_valid)]
    test = [sentence(rng, held) for _ in range(n_test)]
    rows = {
        "train": [{"prompt": PROMPT.format(s=s), "completion": CHOICES[y]} for s, y in train],
        "valid": [{"prompt": PROMPT.format(s=s), "completion": CHOICES[y]} for s, y in valid],
        "chat": [{"messages": [{"role": "user", "content": f"How does this sound: {s}"},
                               {"role": "assistant", "content": CHOICES[y].strip()}]} for s, y in train],
        "task": [{"context": PROMPT.format(s=s), "choices": CHOICES, "label": y} for s, y in test],
    }
    for name, records in rows.items():
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--valid", type=int, default=200)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for name, path in write(a.dir, a.train, a.valid, a.test, a.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
