"""The `jaxlm` subcommands that open checkpoints: eval (bits per byte, multiple-choice tasks),
generate, export and import. `jaxlm.cli` adds them to its parser (`add`)."""

from __future__ import annotations

import sys

from jaxlm.errors import EXIT_OK


def add(sub) -> None:
    _add_eval(sub)
    _add_generate(sub)
    _add_export(sub)
    _add_import(sub)
    _add_harness(sub)


def _eval(args) -> int:
    from jaxlm.config import load_config
    from jaxlm.errors import ConfigError
    from jaxlm.evaluate import evaluate, evaluate_task, table, task_table

    from jaxlm import distributed

    distributed.initialize(load_config(None, [o for o in args.overrides if o.startswith("dist.")]).dist)
    if args.task:
        if args.data or args.split or args.stride:
            raise ConfigError("--task scores a multiple-choice file; --data, --split and --stride do not apply")
        print(task_table(evaluate_task(args.path, args.task, fewshot=args.fewshot, seq_len=args.context,
                                       all_checkpoints=args.all_checkpoints, overrides=args.overrides)))
        return EXIT_OK
    if args.fewshot:
        raise ConfigError("--fewshot goes with --task")
    results = evaluate(args.path, data=args.data, split=args.split, seq_len=args.context, stride=args.stride,
                       all_checkpoints=args.all_checkpoints, ci_unit=args.ci_unit, ci_block=args.ci_block,
                       overrides=args.overrides)
    print(table(results))
    return EXIT_OK


def _generate(args) -> int:
    import time

    from jaxlm.errors import ConfigError
    from jaxlm.generate import Sampling, encode_prompt, load, stream_printer

    texts = list(args.prompt or [])
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise ConfigError(f"--prompt-file {args.prompt_file}: {e.strerror}") from None
    if not texts:
        raise ConfigError("give a prompt with --prompt TEXT or --prompt-file FILE (--prompt '' samples from scratch)")
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise ConfigError("--num-samples and --max-new-tokens must be at least 1")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    m = load(args.path, args.overrides, log=log)
    rows = [t for t in texts for _ in range(args.num_samples)]
    prompts = [encode_prompt(m.tokenizer, t) for t in rows]
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    streaming = len(rows) == 1
    if streaming:
        sys.stdout.write(rows[0])
    t0 = time.perf_counter()
    out = m.generator.generate(m.params, prompts, args.max_new_tokens, sampling, args.seed, m.tokenizer.eos_id,
                               stream_printer(m.tokenizer) if streaming else None)
    dt = time.perf_counter() - t0
    if streaming:
        print()
    else:
        for i, (text, ids) in enumerate(zip(rows, out)):
            print(f"=== prompt {i // args.num_samples + 1}, sample {i % args.num_samples + 1} ===")
            print(text + m.tokenizer.decode(ids))
    n = sum(map(len, out))
    log(f"{n} tokens in {dt:.2f}s ({n / dt:,.0f} tokens/s, {len(rows)} sequences, prefill and compile included)")
    return EXIT_OK


def _export(args) -> int:
    from jaxlm.export import export

    export(args.path, args.out, args.format, int(args.max_shard_gb * 1e9), args.force,
           log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return EXIT_OK


def _import(args) -> int:
    from jaxlm.export import import_hf

    import_hf(args.dir, args.out, args.tokenizer, args.overrides, args.force,
              log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return EXIT_OK


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint, or multiple-choice accuracy",
                        description="Score every token of a split exactly once with a checkpoint's params and "
                                    "tokenizer; print a table and write JSON into <run>/eval/.",
                        epilog="Overrides set the mesh and batch, e.g. mesh.data=2 mesh.fsdp=2 mesh.tensor=2 "
                               "eval.batch_size=16 (default: all devices on the data axis, the run's batch).")
    ev.add_argument("path", help="run directory (its newest usable checkpoint) or <run>/checkpoints/<step>")
    ev.add_argument("overrides", nargs="*", help="dotted key=value overrides (mesh.*, eval.batch_size, data.*)")
    ev.add_argument("--data", help="source to evaluate (tfds:NAME, text:GLOB, jsonl:GLOB, parquet:GLOB, hf:PATH); "
                                   "default: the run's own validation split")
    ev.add_argument("--split", help="split: of a TFDS or hf: source, or train / validation of the run's own data")
    ev.add_argument("--all-checkpoints", action="store_true", help="evaluate every checkpoint of the run")
    ev.add_argument("--context", type=int, default=0, help="window length in tokens (default: train.seq_len)")
    ev.add_argument("--stride", type=int, default=0,
                    help="sliding windows: start one every STRIDE tokens and score only its last STRIDE "
                         "targets, so each has at least context-stride+1 tokens of context (default: context, "
                         "no overlap)")
    ev.add_argument("--ci-unit", default="auto", choices=("auto", "documents", "blocks"),
                    help="units of the 95%% confidence interval (auto: documents when there are at least 30)")
    ev.add_argument("--ci-block", type=int, default=0, help="targets per block for --ci-unit blocks "
                                                             "(default: the context length)")
    ev.add_argument("--task", help="a multiple-choice jsonl file ({\"context\", \"choices\", \"label\"} per "
                                   "line): score each choice's log-likelihood, report acc and acc_norm with 95%% "
                                   "intervals, and write every prediction into <run>/eval/task-NAME-stepN.json")
    ev.add_argument("--fewshot", type=int, default=0, help="--task: the first K examples, with their answers, "
                                                           "become a fixed prefix of every other context")
    ev.set_defaults(func=_eval)


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="sample text from a checkpoint",
                         description="Sample continuations of prompts with a KV cache; a single sequence "
                                     "streams to the terminal. Each prompt starts a document (EOS in front).")
    gen.add_argument("path", help="run directory (its newest checkpoint) or <run>/checkpoints/<step>")
    gen.add_argument("overrides", nargs="*", help="dotted key=value overrides (mesh.*; default one device)")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch of prompts)")
    gen.add_argument("--prompt-file", help="a file with one prompt per line")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per sequence")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    gen.set_defaults(func=_generate)


def _add_export(sub) -> None:
    ex = sub.add_parser("export", help="export a checkpoint (Hugging Face or plain safetensors)",
                        description="hf: config.json, model.safetensors (sharded with an index above --max-shard-gb), "
                                    "generation_config.json and the tokenizer, loadable with transformers' "
                                    "AutoModelForCausalLM / AutoTokenizer (llama -> LlamaForCausalLM, gpt2 -> "
                                    "GPT2LMHeadModel). safetensors: the params under flat dotted names, with the "
                                    "config, step and tokenizer hash in the file's metadata.")
    ex.add_argument("path", help="run directory (its newest checkpoint) or <run>/checkpoints/<step>")
    ex.add_argument("--format", default="hf", choices=("hf", "safetensors"))
    ex.add_argument("--out", required=True, help="output directory (new or empty)")
    ex.add_argument("--max-shard-gb", type=float, default=2.0, help="largest weight file before sharding")
    ex.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    ex.set_defaults(func=_export)


def _add_import(sub) -> None:
    imp = sub.add_parser("import", help="import a Hugging Face checkpoint").add_subparsers(dest="source",
                                                                                          required=True)
    imp_hf = imp.add_parser("hf", help="a local Llama or GPT-2 checkpoint directory",
                            description="Read config.json and the safetensors weights of a local Llama or GPT-2 "
                                        "checkpoint into a jaxlm run directory (config.yaml, tokenizer file, "
                                        "checkpoints/0) usable by eval, generate and checkpoint.init_from.")
    imp_hf.add_argument("dir", help="directory written by save_pretrained")
    imp_hf.add_argument("overrides", nargs="*", help="dotted key=value overrides (e.g. model.scan_layers=true)")
    imp_hf.add_argument("--out", required=True, help="run directory to create")
    imp_hf.add_argument("--tokenizer", help="sentencepiece .model or tokenizer.json (default: DIR/tokenizer.model, "
                                            "else DIR/tokenizer.json)")
    imp_hf.add_argument("--force", action="store_true", help="replace a non-empty run directory")
    imp_hf.set_defaults(func=_import)


def _harness(args) -> int:
    import json

    from jaxlm import files
    from jaxlm.config import load_config
    from jaxlm.errors import ConfigError

    names = [t for t in args.tasks.split(",") if t]
    if not names:
        raise ConfigError("--tasks names at least one lm-eval task (comma-separated)")
    from jaxlm import distributed

    distributed.initialize(load_config(None, [o for o in args.overrides if o.startswith("dist.")]).dist)
    from jaxlm import harness
    from lm_eval.utils import make_table

    results = harness.evaluate(args.path, names, args.include_path, args.num_fewshot, args.limit, args.overrides,
                               args.max_length)
    print(make_table(results))
    if args.output:
        files.write_json(args.output, json.loads(json.dumps({k: results[k] for k in ("results", "configs", "versions",
                                                                                   "n-shot") if k in results},
                                                            default=str)))
    return EXIT_OK


def _add_harness(sub) -> None:
    h = sub.add_parser("harness", help="run lm-evaluation-harness tasks on a checkpoint (the `harness` extra)",
                       description="Evaluate a run's newest checkpoint (or <run>/checkpoints/<step>) on "
                                   "lm-evaluation-harness tasks with jaxlm's own model class (jaxlm.harness.JaxlmLM), "
                                   "on this machine's devices, with no export step. Needs lm-eval: pip install "
                                   "-e '.[harness]'.")
    h.add_argument("path", help="run directory (its newest checkpoint) or <run>/checkpoints/<step>")
    h.add_argument("overrides", nargs="*", help="dotted key=value overrides (mesh.*, eval.batch_size)")
    h.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    h.add_argument("--include-path", help="a folder of task YAML files (local tasks, offline datasets)")
    h.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    h.add_argument("--limit", type=float, default=None, help="at most this many examples per task (a fraction "
                                                             "if below 1)")
    h.add_argument("--max-length", type=int, default=0, help="context length in tokens (default: model.max_seq_len)")
    h.add_argument("--output", help="write lm-eval's results, configs and versions as JSON here")
    h.set_defaults(func=_harness)
