"""`jaxlm` command line: thin subcommands over run(cfg)-style functions.

Exit codes: 0 done; 2 user error (message on stderr, no traceback); 75 stopped by
SIGTERM/SIGINT after writing a checkpoint (run the same command again to continue).
"""

from __future__ import annotations

import argparse
import sys

from jaxlm.errors import EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR, JaxlmError

TRAIN_EPILOG = """\
Overrides are dotted keys, e.g.  jaxlm train experiments/shakespeare.yaml optim.lr=3e-3 mesh.fsdp=4
Precedence: defaults < model.preset < CONFIG.yaml < overrides. The resolved config is written
to <run dir>/config.yaml. Option groups and keys (default, meaning):
"""


def _train(args) -> int:
    from jaxlm.config import load_config
    from jaxlm.train import run

    cfg = load_config(args.config, args.overrides)
    result = run(cfg, restart=args.restart, handle_signals=True)
    return EXIT_PREEMPTED if result.stopped_by_signal else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from jaxlm.config import help_text

    parser = argparse.ArgumentParser(prog="jaxlm", description="Pretrain, evaluate and export language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model", description="Train a model from a YAML experiment file.",
                           epilog=TRAIN_EPILOG + help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", nargs="?", help="experiment YAML (deltas over the defaults)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    train.add_argument("--restart", action="store_true", help="overwrite an existing run directory")
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.config and "=" in args.config:  # overrides only, no file
        args.overrides.insert(0, args.config)
        args.config = None
    try:
        return args.func(args)
    except JaxlmError as e:
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
