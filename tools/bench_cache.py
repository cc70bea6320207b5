"""Peak memory and speed of a token-cache build on a generated corpus of a given size.

    python tools/bench_cache.py --mb 50 [--mode jsonl|single|files] [--workdir DIR] [--vocab 4096]

Writes a deterministic synthetic corpus of `--mb` MB of text into the work directory (kept
and reused when --workdir is given, else a temporary one that is removed):

- `jsonl`: one `.jsonl` file of many documents (lengths drawn around 4 KB, a few up to 200 KB);
- `single`: one text file that is a single document (no data.doc_separator), the case a
  streaming build has to cut itself;
- `files`: a directory of text files of 10 MB each, one document per file;
- several, comma-separated (`jsonl,single`): a mixture of them, sharing the size equally.

The text is paragraphs of sentences drawn from a fixed bank of sentences of made-up words
(Zipf-distributed), so it tokenizes like prose. A BPE tokenizer (`--vocab` pieces) is
trained once on a 2 MB sample by this process and passed as data.tokenizer; then a fresh
child process builds the train and validation token cache (`jaxlm.data.cache`, as
`jaxlm data` does) into an empty cache directory and reports its own peak RSS (ru_maxrss
and /proc VmHWM), the seconds taken, its CPU seconds (user + system, whole process: a
steadier measure than wall time on a busy machine) and MB/s of text. `--train-tokenizer` lets the child
train the tokenizer itself instead (data.tokenizer_max_bytes=--tokenizer-mb).

Prints one JSON line with the results (and the CPU model) on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1_000_000
_SEED = 1234


def _bank(seed: int = _SEED, n_words: int = 3000, n_sentences: int = 40_000) -> list[str]:
    """Sentences of made-up words, word frequencies roughly Zipf-like."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4))))
                    for _ in range(n_words)})
    rng.shuffle(words)
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
    out = []
    for _ in range(n_sentences):
        ws = rng.choices(words, cum_weights=cum_weights, k=rng.randint(4, 22))
        for i in range(1, len(ws) - 1):
            if rng.random() < 0.08:
                ws[i] += ","
        if rng.random() < 0.05:
            ws.insert(rng.randrange(len(ws)), str(rng.randint(1, 2025)))
        out.append(ws[0].capitalize() + " " + " ".join(ws[1:]) + rng.choice(".......?!"))
    return out


class TextSource:
    """Deterministic paragraphs drawn from the sentence bank."""

    def __init__(self, seed: int = _SEED):
        import numpy as np

        self.bank = _bank(seed)
        self.rng = np.random.default_rng(seed)

    def text(self, n_chars: int) -> str:
        """About `n_chars` characters (at least one paragraph) of paragraphs joined by blank lines."""
        paragraphs, size = [], 0
        while size < n_chars:
            idx = self.rng.integers(0, len(self.bank), size=self.rng.integers(2, 9))
            para = " ".join(self.bank[i] for i in idx)
            paragraphs.append(para)
            size += len(para) + 2
        return "\n\n".join(paragraphs)


def write_corpus(directory: str, mb: float, mode: str, seed: int = _SEED) -> tuple[str, dict]:
    """Write `mb` MB of generated text in `mode` under `directory`; (data.source, extra DataConfig settings).

    `mode` may name several modes, comma-separated: each gets an equal share of the text in a
    directory of its own and the source is their mixture.
    """
    modes = mode.split(",")
    if len(modes) > 1:
        parts = [write_corpus(os.path.join(directory, m), mb / len(modes), m, seed + i) for i, m in enumerate(modes)]
        return "; ".join(src for src, _ in parts), {k: v for _, extra in parts for k, v in extra.items()}
    os.makedirs(directory, exist_ok=True)
    src, target = TextSource(seed), int(mb * MB)
    if mode == "jsonl":
        path = os.path.join(directory, "corpus.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            written = 0
            while written < target:
                n = int(min(max(src.rng.lognormal(8.0, 0.8), 200), 200_000))
                doc = src.text(min(n, target - written))
                f.write(json.dumps({"text": doc}) + "\n")
                written += len(doc)
        return f"jsonl:{path}", {}
    if mode == "single":
        path = os.path.join(directory, "corpus.txt")
        _write_text(path, src, target)
        return f"text:{path}", {}
    if mode == "files":
        per_file = 10 * MB
        for i in range((target + per_file - 1) // per_file):
            _write_text(os.path.join(directory, f"doc{i:04d}.txt"), src, min(per_file, target - i * per_file))
        return f"text:{directory}/doc*.txt", {}
    raise SystemExit(f"unknown --mode {mode!r}: use jsonl, single or files")


def _write_text(path: str, src: TextSource, n_chars: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < n_chars:
            block = src.text(min(1 * MB, n_chars - written))
            f.write(block + "\n\n" if written + len(block) < n_chars else block + "\n")
            written += len(block) + 2


def train_small_tokenizer(path: str, vocab: int, sample_mb: float = 2) -> str:
    """A BPE tokenizer trained (once) on `sample_mb` MB of generated text, saved at `path`."""
    if not os.path.isfile(path):
        sys.path.insert(0, ROOT)
        from jaxlm.data.tokenizer import train_tokenizer

        text = TextSource(seed=_SEED + 1).text(int(sample_mb * MB))
        train_tokenizer([text], vocab, max_bytes=int(sample_mb * MB)).save(path)
    return path


def cpu_model() -> str:
    """lscpu's model name, family and model."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    get = lambda k: info.get(k, "?").strip()  # noqa: E731
    return f"{get('Model name')} (family {get('CPU family')}, model {get('Model')}, {get('CPU(s)')} CPUs)"


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(settings: dict) -> None:
    """Build the train and validation token cache of `settings` (DataConfig fields); print a JSON line."""
    import jaxlm
    from jaxlm.config import DataConfig
    from jaxlm.data import cache

    cfg = DataConfig(**settings)
    t0 = time.perf_counter()
    train_parts, _, valid_parts = cache.parts(cfg)
    tok = cache.get_tokenizer(cfg, train_parts, log=lambda m: None)
    t_tok = time.perf_counter() - t0
    built = [cache.tokens(cfg, tok, p, "train", log=lambda m: None)[1] for p in train_parts]
    built += [cache.tokens(cfg, tok, p, "valid", log=lambda m: None)[1] for p in valid_parts]
    dt = time.perf_counter() - t0
    n_bytes = sum(m["bytes"] for m in built)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": round(dt, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
                      "tokenizer_seconds": round(t_tok, 2), "bytes": n_bytes,
                      "tokens": sum(m["tokens"] for m in built), "documents": sum(m["documents"] for m in built),
                      "mb_per_s": round(n_bytes / MB / dt, 2),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "vm_hwm_mb": round(_vm_hwm_mb(), 1), "jaxlm": os.path.dirname(jaxlm.__file__)}), flush=True)


def measure(source: str, extra: dict, cache_dir: str, tokenizer: str | None, tokenizer_mb: float,
            env: dict | None = None) -> dict:
    """Run the build in a fresh child process; its report plus RUSAGE_CHILDREN's peak as a cross-check."""
    settings = {"source": source, "cache_dir": cache_dir, **extra}
    if tokenizer:
        settings["tokenizer"] = tokenizer
    else:
        settings["tokenizer_max_bytes"] = int(tokenizer_mb * MB)
    code = (f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'tools')!r}); import bench_cache; "
            f"bench_cache.child({settings!r})")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"cache build failed:\n{out.stdout}\n{out.stderr}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    report["children_max_rss_mb"] = round(after / 1024, 1) if after > before else None
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=50, help="MB of text to generate")
    p.add_argument("--mode", default="jsonl", help="jsonl, single or files, or several comma-separated (a mixture)")
    p.add_argument("--workdir", help="keep the corpus and tokenizer here (reused); default: a temporary dir")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--train-tokenizer", action="store_true", help="the child trains the tokenizer itself")
    p.add_argument("--tokenizer-mb", type=float, default=20, help="data.tokenizer_max_bytes with --train-tokenizer")
    args = p.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="bench-cache-")
    try:
        corpus = os.path.join(work, f"corpus-{args.mode.replace(',', '+')}-{args.mb:g}mb")
        t0 = time.perf_counter()
        marker = os.path.join(corpus, "done.json")
        if os.path.isfile(marker):
            with open(marker) as f:
                source, extra = json.load(f)
        else:
            shutil.rmtree(corpus, ignore_errors=True)
            source, extra = write_corpus(corpus, args.mb, args.mode)
            with open(marker, "w") as f:
                json.dump([source, extra], f)
        t_gen = time.perf_counter() - t0
        tok = None if args.train_tokenizer else train_small_tokenizer(
            os.path.join(work, f"bench-{args.vocab}.model"), args.vocab)
        cache_dir = tempfile.mkdtemp(prefix="cache-", dir=work)
        report = measure(source, extra, cache_dir, tok, args.tokenizer_mb)
        shutil.rmtree(cache_dir, ignore_errors=True)
        report.update(mb=args.mb, mode=args.mode, vocab=args.vocab, generate_seconds=round(t_gen, 1),
                      cpu=cpu_model())
        print(json.dumps(report))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
