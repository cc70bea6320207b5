"""Token cache build throughput, against the tokenizer library's own batch encoding, by 1 and 2 processes.

    python tools/bench_cache_build.py [--gb 1.0] [--tokenizer bpe,bytelevel] [--workdir DIR]

1. Writes a corpus of at least `--gb` GB into the work directory (kept and reused): copies of
   the Gutenberg training books (`$JAXLM_SHARED_DATA/gutenberg-en`), one file per copy, each
   copy with its books in its own shuffled order and the paragraphs of each book shuffled too,
   books separated by "\\n\\n\\n\\n" (data.doc_separator).
2. Trains each tokenizer once on the original books (`jaxlm tokenizer train`, 5 MB sample):
   `bpe` is a sentencepiece BPE of 8192 pieces, `bytelevel` a GPT-2-style tokenizer.json of
   8192 (Hugging Face `tokenizers`).
3. Reference, on one core (`taskset`): the library's own batch call on the same books, 8 books
   per call, timing the calls alone: sentencepiece `encode(texts, num_threads=1)`,
   `tokenizers` `encode_batch(texts)` (RAYON_NUM_THREADS=1). For the BPE, also on the pieces
   jaxlm encodes (books cut before a space every 2,048 characters), the fair measure of what
   jaxlm adds (reading, cutting, joining ids, writing); the other tokenizer encodes whole books
   in jaxlm too.
4. `jaxlm data` into an empty cache directory: one process on core 0, then two processes on
   cores 0 and 1 joined through jax.distributed on 127.0.0.1 (as SLURM or mpirun would start
   them: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). Each process's peak RSS
   comes from wait4; the build time from its "token cache: built" lines. The two builds'
   tokens.bin files are compared byte for byte.

Prints a table and writes `results.json` into the work directory.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEP = "\n\n\n\n"


def _corpus(work: str, gb: float, shared: str) -> list[str]:
    books = []
    for path in sorted(glob.glob(os.path.join(shared, "gutenberg-en", "train_*.txt"))):
        with open(path, encoding="utf-8") as f:
            books += f.read().split(SEP)
    size = sum(len(b.encode("utf-8")) for b in books)
    copies = max(1, -(-int(gb * 1e9) // size))
    os.makedirs(os.path.join(work, "corpus"), exist_ok=True)
    paths = []
    for c in range(copies):
        path = os.path.join(work, "corpus", f"copy_{c:03d}.txt")
        paths.append(path)
        if os.path.exists(path):
            continue
        rng = random.Random(c)
        order = rng.sample(books, len(books))
        shuffled = []
        for book in order:
            paras = book.split("\n\n")
            rng.shuffle(paras)
            shuffled.append("\n\n".join(paras))
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(SEP.join(shuffled))
        os.replace(path + ".tmp", path)
    return paths


def _config(work: str, source: str) -> str:
    """A config file naming `source` and the separator (a value of newlines only cannot be an override)."""
    path = os.path.join(work, f"config-{abs(hash(source)) % 10**8}.yaml")
    with open(path, "w") as f:
        f.write(f"data:\n  source: {json.dumps(source)}\n  doc_separator: {json.dumps(SEP)}\n")
    return path


def _tokenizer(work: str, kind: str, shared: str) -> str:
    out = os.path.join(work, f"tok-{kind}" + (".json" if kind == "bytelevel" else ".model"))
    if not os.path.exists(out):
        cfg = _config(work, f"text:{shared}/gutenberg-en/train_*.txt")
        subprocess.run([sys.executable, "-m", "jaxlm.cli", "tokenizer", "train", cfg, "data.tokenizer_vocab=8192",
                        f"data.tokenizer_type={'bytelevel' if kind == 'bytelevel' else 'bpe'}",
                        "data.tokenizer_max_bytes=5000000", "--output", out], check=True, cwd=ROOT)
    return out


def _reference(paths: list[str], tok_path: str, mode: str) -> dict:
    """In a child on one core: the library's own batch encoding of every book, timed. `mode` "whole":
    8 whole books per call; "pieces": the pieces jaxlm encodes (each book cut before a space every
    2,048 characters, `jaxlm.data.build._cut`), the pieces of 8 books per call."""
    from jaxlm.data.build import _PIECE_CHARS, _cut
    from jaxlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    if tok.kind == "sentencepiece":
        encode = lambda texts: tok.sp.encode(texts, num_threads=1)  # noqa: E731
    else:
        encode = lambda texts: [e.ids for e in tok.fast.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
    seconds = n_bytes = n_tokens = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            books = [b for b in f.read().split(SEP) if b]
        for i in range(0, len(books), 8):
            batch = books[i:i + 8]
            texts = batch if mode == "whole" else [p for b in batch for p in _cut(b, _PIECE_CHARS)]
            t0 = time.perf_counter()
            ids = encode(texts)
            seconds += time.perf_counter() - t0
            n_bytes += sum(len(b.encode("utf-8")) for b in batch)
            n_tokens += sum(map(len, ids))
    return {"mode": mode, "seconds": seconds, "bytes": n_bytes, "tokens": n_tokens, "mb_s": n_bytes / 1e6 / seconds}


def _spawn(argv: list[str], core: int, env: dict, log: str) -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", str(core)] + argv, env=env, cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def _wait(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.append({"rc": p.returncode, "peak_rss_mib": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime})
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(work: str, tok_path: str, n: int, tag: str) -> dict:
    cache = os.path.join(work, f"cache-{tag}-{n}p")
    subprocess.run(["rm", "-rf", cache], check=True)
    argv = [sys.executable, "-m", "jaxlm.cli", "data", _config(work, f"text:{work}/corpus/copy_*.txt"),
            f"data.tokenizer={tok_path}", f"data.cache_dir={cache}", "data.valid_fraction=0.01"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "OMPI_", "SLURM_"))}
    env.update(JAX_PLATFORMS="cpu", RAYON_NUM_THREADS="1")
    port, logs = _free_port(), []
    t0 = time.perf_counter()
    procs = []
    for i in range(n):
        e = dict(env, **({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(n),
                          "JAX_PROCESS_ID": str(i)} if n > 1 else {}))
        logs.append(os.path.join(work, f"log-{tag}-{n}p-{i}.txt"))
        procs.append(_spawn(argv, i, e, logs[-1]))
    usage = _wait(procs)
    wall = time.perf_counter() - t0
    text = open(logs[0]).read()
    if any(u["rc"] for u in usage):
        raise SystemExit(f"jaxlm data failed ({[u['rc'] for u in usage]}):\n{text[-3000:]}")
    built = [float(s) for s in re.findall(r"token cache: built \S+ of .* in ([\d.]+)s", text)]
    files = sorted(glob.glob(os.path.join(cache, "tokens", "*", "tokens.bin")))
    n_bytes = sum(json.load(open(os.path.join(os.path.dirname(f), "manifest.json")))["bytes"] for f in files)
    return {"processes": n, "wall_s": wall, "build_s": sum(built), "bytes": n_bytes,
            "mb_s": n_bytes / 1e6 / sum(built), "per_process": usage, "files": files}


def _same(a: list[str], b: list[str]) -> bool:
    import filecmp

    return len(a) == len(b) and all(filecmp.cmp(x, y, shallow=False) for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--tokenizer", default="bpe,bytelevel")
    ap.add_argument("--workdir", default="/tmp/jaxlm-bench-cache-build")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_reference(args.child[2:], args.child[1], args.child[0])))
        return
    shared = os.environ.get("JAXLM_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
    work = os.path.abspath(args.workdir)
    paths = _corpus(work, args.gb, shared)
    total = sum(os.path.getsize(p) for p in paths)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    print(f"corpus: {len(paths)} files, {total / 1e9:.2f} GB; CPU: {model}", flush=True)
    results = {"corpus_bytes": total, "cpu": model}
    for kind in args.tokenizer.split(","):
        tok = _tokenizer(work, kind, shared)
        refs = {}
        for mode in ("whole", "pieces") if kind == "bpe" else ("whole",):  # jaxlm cuts pieces for its BPE only
            out = subprocess.run(["taskset", "-c", "0", sys.executable, __file__, "--child", mode, tok, *paths],
                                 cwd=ROOT, env=dict(os.environ, RAYON_NUM_THREADS="1"), capture_output=True, text=True,
                                 check=True)
            refs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        ref = refs.get("pieces", refs["whole"])
        one, two = _build(work, tok, 1, kind), _build(work, tok, 2, kind)
        same = _same(one.pop("files"), two.pop("files"))
        results[kind] = {"reference": refs, "one": one, "two": two, "identical": same}
        print(f"{kind}: library batch encode " + ", ".join(f"{r['mb_s']:.2f} MB/s ({m})" for m, r in refs.items())
              + f" (1 core) | jaxlm 1 process {one['mb_s']:.2f} MB/s "
              f"({one['mb_s'] / ref['mb_s']:.0%} of the library on what jaxlm encodes), wall {one['wall_s']:.0f}s, peak RSS "
              f"{one['per_process'][0]['peak_rss_mib']:.0f} MiB | 2 processes {two['mb_s']:.2f} MB/s, wall "
              f"{two['wall_s']:.0f}s ({two['wall_s'] / one['wall_s']:.2f}x of 1), peak RSS "
              f"{max(p['peak_rss_mib'] for p in two['per_process']):.0f} MiB | tokens.bin identical: {same}", flush=True)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
