"""`jaxlm` command line: thin subcommands over run(cfg)-style functions.

Exit codes: 0 done; 2 user error (message on stderr, no traceback); 3 stopped after too
many consecutive non-finite steps; 75 stopped by SIGTERM/SIGINT after committing a
checkpoint (run the same command again to continue).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from jaxlm import cli_checkpoints
from jaxlm.errors import (EXIT_CLOSED_STDOUT, EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR, DivergedError,
                          JaxlmError)

TRAIN_EPILOG = """\
Overrides are dotted keys, e.g.  jaxlm train experiments/shakespeare.yaml optim.lr=3e-3 mesh.fsdp=4
Precedence: defaults < model.preset < CONFIG.yaml < overrides. The resolved config is written
to <run dir>/config.yaml. Option groups and keys (default, meaning):
"""


def _join(dist) -> None:
    """Join the other processes of a multi-host run (jaxlm.distributed), before any JAX computation."""
    from jaxlm import distributed

    distributed.initialize(dist)


def _train(args) -> int:
    from jaxlm.config import load_config
    from jaxlm.train import run

    cfg = load_config(args.config, args.overrides)
    _join(cfg.dist)
    try:
        result = run(cfg, restart=args.restart, resume=args.resume, handle_signals=True)
    except DivergedError as e:
        print(f"jaxlm: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    return EXIT_PREEMPTED if result.stopped_by_signal else EXIT_OK


def _plot(args) -> int:
    import os

    from jaxlm.plot import plot

    out = args.out or (os.path.join(args.runs[0], "plots") if len(args.runs) == 1 else "plots")
    if len(args.runs) == 1 and os.path.exists(os.path.join(args.runs[0], "results.csv")):  # a sweep directory
        from jaxlm.scaling.plot import plot_sweep

        paths = plot_sweep(args.runs[0], out)
    else:
        paths = plot(args.runs, out)
    for path in paths:
        print(path)
    return EXIT_OK


def _fit(args) -> int:
    from jaxlm.scaling import fitting

    points, result, out = fitting.command(args)
    if args.plot:
        from jaxlm.scaling.plot import plot_sweep

        for path in plot_sweep(points, os.path.join(out, "plots"), result):
            print(path)
    return EXIT_OK


def _add_fit(sub) -> None:
    from jaxlm.scaling import fitting

    p = sub.add_parser("fit", help="fit a scaling law L(N, D) to a sweep (or any points), with intervals",
                       description="Fit L(N, D) = E + A/N^alpha + B/D^beta (Huber on log loss, L-BFGS from a "
                                   "grid of starts), bootstrap 95%% intervals, IsoFLOP parabolas when the sweep "
                                   "has compute budgets, held-out predictions and compute-optimal sizes; "
                                   "writes fit.json. See docs/scaling.md.")
    fitting.add_arguments(p)
    p.set_defaults(func=_fit)


def _data(args) -> int:
    from jaxlm.config import load_config
    from jaxlm.train import prepare_data

    from jaxlm import distributed

    cfg = load_config(args.config, args.overrides)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    _join(cfg.dist)  # under `jaxlm launch`, SLURM or mpirun, the processes share the build
    group, tok = (distributed.Group("data") if distributed.joined() else None), None
    if group is not None:  # process 0 trains or loads the tokenizer; every process encodes its share
        from jaxlm.data import cache
        from jaxlm.data.tokenizer import tokenizer_from_bytes

        proto = group.broadcast("tokenizer", lambda: distributed.encode_bytes(
            cache.get_tokenizer(cfg.data, cache.parts(cfg.data)[0], log).proto))
        tok = None if cfg.data.tokenizer else tokenizer_from_bytes(distributed.decode_bytes(proto), cfg.data.eos_token,
                                                                      bos_token=cfg.data.bos_token)
    prepare_data(cfg, log=log, tokenizer=tok, group=group)
    return EXIT_OK


def _tokenizer_train(args) -> int:
    import os
    import time

    from jaxlm.config import load_config
    from jaxlm.data import cache
    from jaxlm.errors import ConfigError

    cfg = load_config(args.config, args.overrides)
    if os.path.exists(args.output) and not args.force:
        raise ConfigError(f"'{args.output}' exists; pass --force to overwrite it")
    d = cfg.data
    train_parts, _, valid_parts = cache.parts(d)
    t0 = time.perf_counter()
    tok = cache.train_on(d, train_parts)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tok.save(args.output)
    valid = [doc for p in valid_parts for doc in p.docs[1]]
    n_bytes = sum(len(v.encode("utf-8")) for v in valid)
    n_tokens = sum(map(len, tok.encode(valid)))
    print(f"tokenizer: {d.tokenizer_type} vocab {tok.vocab_size} trained on at most {d.tokenizer_max_bytes:,} "
          f"bytes of {d.source} in {time.perf_counter() - t0:.1f}s; validation text {n_bytes / max(n_tokens, 1):.2f} "
          f"bytes/token; wrote {args.output} (use it with data.tokenizer={args.output})", file=sys.stderr)
    return EXIT_OK


def _launch(args) -> int:
    from jaxlm.errors import ConfigError
    from jaxlm.launch import launch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ConfigError("give the command to launch after --, e.g. jaxlm launch --processes 2 -- train CONFIG")
    if args.processes < 1 or args.devices_per_process < 0:
        raise ConfigError("--processes must be at least 1 and --devices-per-process at least 0")
    return launch(command, args.processes, args.devices_per_process, args.grace)


def _compile(args) -> int:
    from jaxlm import aot

    return aot.main(args)


def _add_compile(sub) -> None:
    co = sub.add_parser("compile", help="compile the train and eval steps for a TPU slice; print memory and FLOPs",
                        description="Compile a config's train and eval steps ahead of time for the chips of a TPU "
                                    "slice, on any machine (needs libtpu: pip install -e \".[tpu]\"). Prints the "
                                    "compiler's memory per chip against its HBM, jaxlm's memory plan and the step's "
                                    "FLOPs; exits 2 when the step does not fit.")
    _config_args(co)
    co.add_argument("--topology", required=True, help="TPU slice, GENERATION:SHAPE, e.g. v5e:2x2, v5e:4x4, v5p:2x2x2")
    co.set_defaults(func=_compile)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (deltas over the defaults)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")


def _add_train(sub) -> None:
    from jaxlm.config import help_text

    train = sub.add_parser("train", help="train a model", description="Train a model from a YAML experiment file.",
                           epilog=TRAIN_EPILOG + help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_args(train)
    mode = train.add_mutually_exclusive_group()
    mode.add_argument("--restart", action="store_true", help="overwrite an existing run directory")
    mode.add_argument("--resume", action="store_true",
                      help="require a checkpoint to continue from (fail instead of starting a new run); "
                           "without either flag a run directory with checkpoints is resumed")
    train.set_defaults(func=_train)


def _add_plot(sub) -> None:
    pl = sub.add_parser("plot", help="plot loss and bits per byte of runs, or a sweep's scaling figures",
                        description="Draw train and validation loss (loss.png) and validation bits per byte "
                                    "(bpb.png) against steps, tokens and training FLOPs, every run on one figure. "
                                    "Given one sweep directory (it holds results.csv): loss against compute with "
                                    "the fitted frontier, IsoFLOP curves, fitted against measured, residuals.")
    pl.add_argument("runs", nargs="+", help="run directories, or one sweep directory")
    pl.add_argument("--out", help="output directory (default: <run>/plots for one run, ./plots for several)")
    pl.set_defaults(func=_plot)


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="tokenize the data of a config into the token cache",
                          description="Train or load the tokenizer and build the token cache of every split "
                                      "of the config's data, as `jaxlm train` would, without training. Run "
                                      "under `jaxlm launch --processes N` (or SLURM, mpirun), the processes "
                                      "share the encoding when data.cache_dir is a folder they all see.")
    _config_args(data)
    data.set_defaults(func=_data)


def _add_tokenizer(sub) -> None:
    tok = sub.add_parser("tokenizer", help="tokenizer commands").add_subparsers(dest="action", required=True)
    tok_train = tok.add_parser("train", help="train a sentencepiece tokenizer on a config's data",
                               description="Train a sentencepiece tokenizer on the training text of a config "
                                           "(data.source, data.tokenizer_vocab, data.tokenizer_type, "
                                           "data.tokenizer_max_bytes) and write the .model file.")
    _config_args(tok_train)
    tok_train.add_argument("--output", "-o", required=True, help="path of the .model file to write")
    tok_train.add_argument("--force", action="store_true", help="overwrite an existing output file")
    tok_train.set_defaults(func=_tokenizer_train)


def _add_launch(sub) -> None:
    la = sub.add_parser("launch", help="run a command as several joined local processes (development, tests)",
                        description="Start N local processes of `jaxlm COMMAND ...`, joined into one run through "
                                    "jax.distributed on 127.0.0.1 (CPU collectives through gloo). Output lines are "
                                    "prefixed with [i]; SIGINT/SIGTERM are forwarded; the exit status is the first "
                                    "failure's. On a cluster, start one `jaxlm train` per host instead (SLURM "
                                    "srun, mpirun, a TPU pod, Kubernetes): see docs/multihost.md.",
                        epilog="example: jaxlm launch --processes 2 --devices-per-process 4 -- train "
                               "experiments/shakespeare.yaml mesh.fsdp=4")
    la.add_argument("--processes", "-n", type=int, required=True, help="number of processes")
    la.add_argument("--devices-per-process", type=int, default=0,
                    help="CPU devices of each process (XLA's forced host device count); 0 = leave as set")
    la.add_argument("--grace", type=float, default=90.0,
                    help="seconds the other processes get to stop by themselves after one fails, before they "
                         "are killed")
    la.add_argument("command", nargs=argparse.REMAINDER, help="-- then the jaxlm command, e.g. -- train CONFIG")
    la.set_defaults(func=_launch)


def _sweep(args) -> int:
    from jaxlm.errors import ConfigError
    from jaxlm.scaling.cluster import emit_slurm
    from jaxlm.scaling.plan import command, mup_note, plan, plan_table
    from jaxlm.scaling.results import rescore, rescore_task
    from jaxlm.scaling.run import run_sweep
    from jaxlm.scaling.sweep_file import load_sweep

    if args.target[0] == "eval":
        if len(args.target) != 2 or bool(args.data) == bool(args.task):
            raise ConfigError("usage: jaxlm sweep eval SWEEP_DIR (--data SOURCE | --task FILE.jsonl) [--name NAME]")
        if args.task:
            rescore_task(args.target[1], args.task, args.name or "", args.fewshot)
        else:
            rescore(args.target[1], args.data, args.name or "")
        return EXIT_OK
    if len(args.target) != 1 or args.data or args.name or args.task:
        raise ConfigError("usage: jaxlm sweep SWEEP.yaml [--dir DIR] [--list | --emit slurm | --run NAME]; "
                          "--data and --name belong to `jaxlm sweep eval SWEEP_DIR`")
    sw = load_sweep(args.target[0], args.dir)
    if args.list or args.emit:
        runs = plan(sw)
        if args.list:
            print("\n".join(command(sw, r) for r in runs))
        else:
            for path in emit_slurm(sw, runs):
                print(path)
        return EXIT_OK
    runs = plan(sw)
    note = mup_note(sw)
    print(f"sweep {sw.name}: {len(runs)} runs in {sw.dir}\n" + (note + "\n" if note else "") + plan_table(runs),
          flush=True)
    return run_sweep(sw, only=args.run, log=lambda m: print(m, flush=True))


def _add_sweep(sub) -> None:
    sw = sub.add_parser("sweep", help="train a scaling-law sweep (a grid of runs), or rescore one",
                        description="Train every unfinished run of a sweep file into one sweep directory and "
                                    "write results.csv / results.json there; rerunning the command continues an "
                                    "interrupted sweep. `jaxlm sweep eval SWEEP_DIR --data SOURCE` scores every "
                                    "finished run on another corpus. The sweep file format is in docs/scaling.md.")
    sw.add_argument("target", nargs="+", help="SWEEP.yaml, or: eval SWEEP_DIR")
    sw.add_argument("--dir", help="sweep directory (default: the file's dir: key, else sweeps/<name>)")
    sw.add_argument("--list", action="store_true", help="print each run's `jaxlm train` command and exit")
    sw.add_argument("--emit", choices=("slurm",), help="write sbatch job arrays (one task per run) into "
                                                        "<sweep dir>/slurm/ and exit")
    sw.add_argument("--run", help="train only this run (what each job-array task does)")
    sw.add_argument("--data", help="eval: the source to score on (tfds:NAME, text:GLOB, jsonl:GLOB, parquet:GLOB, "
                                   "hf:PATH)")
    sw.add_argument("--name", help="eval: name of the rescored results (default: from the source)")
    sw.add_argument("--task", help="eval: a multiple-choice jsonl file; adds acc and acc_norm columns (with 95%% "
                                   "intervals) to the rows, for `jaxlm fit DIR --accuracy acc`")
    sw.add_argument("--fewshot", type=int, default=0, help="eval --task: the first K examples become a fixed prefix")
    sw.set_defaults(func=_sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description="Pretrain, evaluate and export language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    cli_checkpoints.add(sub)
    _add_compile(sub)
    _add_plot(sub)
    _add_data(sub)
    _add_tokenizer(sub)
    _add_launch(sub)
    _add_sweep(sub)
    _add_fit(sub)
    return parser


def _is_override(token: str) -> bool:
    """A dotted key=value override: has '=' after a non-empty key and does not start with '-'."""
    return not token.startswith("-") and token.find("=") > 0


def parse_args(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse a command line; key=value overrides may come before, between or after the options.

    argparse fills the `overrides` positional only from the tokens right after the other
    positionals (and parse_intermixed_args does not support subparsers), so overrides that
    follow an option are left over by parse_known_args; they are appended to args.overrides
    in command-line order. Any other leftover (an unknown option, a stray word, an override
    to a subcommand that takes none) is argparse's usual "unrecognized arguments" error, exit 2.
    An option's own value ("--prompt a=b") is consumed by the option and never becomes an override.
    """
    parser = parser or build_parser()
    args, rest = parser.parse_known_args(argv)
    takes_overrides = isinstance(getattr(args, "overrides", None), list)
    bad = [t for t in rest if not (takes_overrides and _is_override(t))]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if rest:
        args.overrides.extend(rest)
    if getattr(args, "config", None) and "=" in args.config:  # overrides only, no file
        args.overrides.insert(0, args.config)
        args.config = None
    return args


def _fail_together(code: int, message: str, peer_suspect: bool = False) -> int:
    """In a multi-process run, a failing process tells the others (their watchdogs stop them) and ends
    without JAX's exit barrier, which would wait for processes that are still training. An unexpected
    error may be a collective whose peer died: the watchdog first gets the chance to name that peer."""
    from jaxlm import distributed

    if not distributed.joined():
        return code
    if peer_suspect:
        distributed.await_lost_peer(lambda m: print(f"jaxlm: {m}", file=sys.stderr, flush=True))
    distributed.report_failure(message)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader of stdout went away (`jaxlm sweep F --list | head`): nothing left to say to it.
        # Point stdout at /dev/null so the interpreter's final flush does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CLOSED_STDOUT
    except JaxlmError as e:
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return _fail_together(EXIT_USER_ERROR, str(e))
    except Exception as e:
        traceback.print_exc()
        return _fail_together(1, f"{type(e).__name__}: {e}", peer_suspect=True)


if __name__ == "__main__":
    sys.exit(main())
