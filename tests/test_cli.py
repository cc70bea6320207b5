"""`jaxlm train` end to end on a tiny model: files, metrics fields, exit codes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxlm.cli import main, parse_args
from jaxlm.errors import EXIT_CLOSED_STDOUT
from jaxlm.metrics import read_metrics

TINY_CLI = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64",
            "train.batch_size=8", "train.seq_len=32", "data.tokenizer_vocab=320", "run.progress=false"]


def test_train_writes_run_directory_and_metrics(tmp_path, small_corpus, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", f"data.source={small_corpus}", f"run.dir={run_dir}", "train.steps=12",
                 "train.log_every=1", "eval.every=5", "checkpoint.every=5"] + TINY_CLI)
    assert code == 0
    for name in ("config.yaml", "tokenizer.model", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tb").iterdir())
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["10", "12", "5"]
    records = read_metrics(str(run_dir))
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(12))
    for r in train:
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(r)
    assert [r["step"] for r in evals] == [4, 9, 11]
    for r in evals:
        assert {"step", "eval_loss", "eval_bpb"} <= set(r) and r["eval_bpb"] > 0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    # losses are written at full precision: the JSON text is the float's repr
    line = next(ln for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln)
    assert f'"loss": {json.loads(line)["loss"]!r}' in line
    err = capsys.readouterr().err
    assert "params:" in err and "flops/token" in err and "memory per device" in err and "mesh:" in err


def test_existing_run_dir_needs_restart(tmp_path, small_corpus, capsys):
    args = ["train", f"data.source={small_corpus}", f"run.dir={tmp_path / 'r'}", "train.steps=2",
            "checkpoint.enabled=false"] + TINY_CLI
    assert main(args) == 0
    assert main(args) == 2
    assert "--restart" in capsys.readouterr().err
    assert main(args + ["--restart"]) == 0


def test_user_error_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", "optim.lrr=1"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "did you mean 'optim.lr'" in proc.stderr and "Traceback" not in proc.stderr


def test_closed_stdout_ends_quietly(tmp_path):
    """`jaxlm sweep F --list | head -1`: once the reader has gone, the command stops without a traceback."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\nsizes:\n  - {name: a, d_model: 32, n_layers: 2, n_heads: 4}\n"
                     "tokens: [1.0e4, 2.0e4]\nseeds: [0, 1, 2]\nlr: 1.0e-3\n")
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout now fails with EPIPE
    proc = subprocess.run([sys.executable, "-m", "jaxlm.cli", "sweep", str(sweep), "--list"], stdout=write_end,
                          stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=120)
    os.close(write_end)
    assert proc.returncode == EXIT_CLOSED_STDOUT == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr


def test_help_lists_every_option_group(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for group in ("run:", "model:", "data:", "optim:", "mesh:", "train:", "eval:", "checkpoint:"):
        assert group in out
    assert "optim.lr" in out and "gpt2-124m" in out


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_75(tmp_path, small_corpus):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", f"data.source={small_corpus}", f"run.dir={run_dir}",
           "train.steps=100000", "train.log_every=1"] + TINY_CLI
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120  # hang guard: three steps normally take seconds
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    sent = time.perf_counter()
    _, err = proc.communicate(timeout=120)  # hang guard only; the time to exit is printed, not asserted
    exit_s = time.perf_counter() - sent
    assert proc.returncode == 75, err
    steps = os.listdir(run_dir / "checkpoints")
    assert len(steps) == 1 and 3 <= int(steps[0]) < 100000
    stopped = int(steps[0])
    assert f"stopping after step {stopped} on a signal" in err and f"checkpoint {stopped} committed" in err
    assert max(r["step"] for r in read_metrics(str(run_dir)) if "loss" in r) == stopped - 1
    print(f"SIGTERM to exit: {exit_s:.2f}s; " + err.strip().splitlines()[-2])
    # the same command resumes from the step it stopped at
    assert main(["train", f"data.source={small_corpus}", f"run.dir={run_dir}", f"train.steps={stopped + 2}",
                 "train.log_every=1"] + TINY_CLI) == 0
    train = [r["step"] for r in read_metrics(str(run_dir)) if "loss" in r]
    assert train == list(range(stopped + 2))


def test_mixture_with_segment_ids_trains_and_logs_input_wait(tmp_path, small_corpus, capsys):
    folder = small_corpus.removeprefix("text:").rsplit("/", 1)[0]
    run_dir = tmp_path / "run"
    code = main(["train", f"data.source=text:{folder}/doc[0-2].txt@3; text:{folder}/doc[3-5].txt",
                 "data.segment_ids=true", f"run.dir={run_dir}", "train.steps=6", "train.log_every=1",
                 "eval.every=0", "checkpoint.enabled=false"] + TINY_CLI)
    assert code == 0
    err = capsys.readouterr().err
    assert "mixture: text:" in err and "weight 0.750" in err and "weight 0.250" in err
    train = [r for r in read_metrics(str(run_dir)) if "loss" in r]
    assert len(train) == 6 and all(0 <= r["input_wait_frac"] < 1 and r["input_wait_s"] >= 0 for r in train)
    evals = [r for r in read_metrics(str(run_dir)) if "eval_loss" in r]
    # each source held out its own last document: 1 + 1 validation documents
    assert "2 valid documents" in err and evals[-1]["eval_bpb"] > 0


def test_tokenizer_train_and_data_commands(tmp_path, small_corpus, capsys):
    out = tmp_path / "tok.model"
    args = ["tokenizer", "train", f"data.source={small_corpus}", "data.tokenizer_vocab=300", "-o", str(out)]
    assert main(args) == 0 and out.is_file()
    assert "vocab 300" in capsys.readouterr().err
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    data = ["data", f"data.source={small_corpus}", f"data.tokenizer={out}", f"data.cache_dir={tmp_path / 'c'}"]
    assert main(data) == 0
    first = capsys.readouterr().err
    assert "token cache: built train" in first and "token cache: built valid" in first
    assert main(data) == 0
    again = capsys.readouterr().err
    assert "token cache: reusing train" in again and "built" not in again
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    assert main(["data", f"data.source={small_corpus}", f"data.tokenizer={bad}"]) == 2
    assert "not a sentencepiece model" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["data.source=text:/nonexistent/*.txt", "model.vocab_size=100"])
def test_bad_input_writes_no_run_directory(tmp_path, small_corpus, capsys, bad):
    run_dir = tmp_path / "run"
    assert main(["train", f"data.source={small_corpus}", f"run.dir={run_dir}", bad] + TINY_CLI) == 2
    err = capsys.readouterr().err
    assert ("no files match" in err) if "source" in bad else ("does not match the tokenizer" in err)
    assert not run_dir.exists()


def test_diverging_run_exits_3(tmp_path, small_corpus, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", f"data.source={small_corpus}", f"run.dir={run_dir}", "train.steps=30", "train.log_every=1",
                 "eval.every=0", "checkpoint.every=2", "optim.lr=1e30", "optim.schedule=constant",
                 "optim.warmup_steps=0", "optim.grad_clip=0", "train.max_bad_steps=2"] + TINY_CLI)
    assert code == 3
    err = capsys.readouterr().err
    assert "jaxlm: stopping at step" in err and "more than train.max_bad_steps=2 steps in a row" in err
    assert "skipped (3 in a row" in err


@pytest.mark.parametrize("argv", [
    ["eval", "RUN", "mesh.data=2", "eval.batch_size=8", "--data", "text:x/*.txt", "--split", "validation"],
    ["eval", "RUN", "mesh.data=2", "--data", "text:x/*.txt", "eval.batch_size=8", "--split", "validation"],
    ["eval", "RUN", "--data", "text:x/*.txt", "--split", "validation", "mesh.data=2", "eval.batch_size=8"],
    ["eval", "--data", "text:x/*.txt", "RUN", "mesh.data=2", "--split", "validation", "eval.batch_size=8"],
])
def test_eval_overrides_before_between_or_after_options(argv):
    args = parse_args(argv)
    assert args.path == "RUN" and args.data == "text:x/*.txt" and args.split == "validation"
    assert args.overrides == ["mesh.data=2", "eval.batch_size=8"]


@pytest.mark.parametrize("argv", [
    ["generate", "RUN", "mesh.data=1", "model.dtype=bfloat16", "--prompt", "hi", "--top-k", "5"],
    ["generate", "RUN", "mesh.data=1", "--prompt", "hi", "model.dtype=bfloat16", "--top-k", "5"],
    ["generate", "RUN", "--prompt", "hi", "--top-k", "5", "mesh.data=1", "model.dtype=bfloat16"],
])
def test_generate_overrides_before_between_or_after_options(argv):
    args = parse_args(argv)
    assert args.path == "RUN" and args.prompt == ["hi"] and args.top_k == 5
    assert args.overrides == ["mesh.data=1", "model.dtype=bfloat16"]


@pytest.mark.parametrize("argv, config", [
    (["train", "exp.yaml", "optim.lr=1e-3", "--restart", "train.steps=5"], "exp.yaml"),
    (["train", "--restart", "exp.yaml", "optim.lr=1e-3", "train.steps=5"], "exp.yaml"),
    (["train", "exp.yaml", "--restart", "optim.lr=1e-3", "train.steps=5"], "exp.yaml"),
    # no config file: the first override lands in the config positional and is moved back
    (["train", "optim.lr=1e-3", "--restart", "train.steps=5"], None),
    (["train", "--restart", "optim.lr=1e-3", "train.steps=5"], None),
    (["train", "optim.lr=1e-3", "train.steps=5", "--restart"], None),
])
def test_train_overrides_anywhere_with_or_without_config(argv, config):
    args = parse_args(argv)
    assert args.config == config and args.restart and not args.resume
    assert args.overrides == ["optim.lr=1e-3", "train.steps=5"]


def test_overrides_after_options_of_nested_subcommands():
    args = parse_args(["tokenizer", "train", "data.source=text:a/*.txt", "-o", "t.model", "data.tokenizer_vocab=300"])
    assert args.config is None and args.output == "t.model"
    assert args.overrides == ["data.source=text:a/*.txt", "data.tokenizer_vocab=300"]
    args = parse_args(["import", "hf", "DIR", "--out", "R", "model.scan_layers=true", "--force"])
    assert args.dir == "DIR" and args.out == "R" and args.force and args.overrides == ["model.scan_layers=true"]
    args = parse_args(["data", "exp.yaml", "data.cache_dir=/tmp/c"])
    assert args.config == "exp.yaml" and args.overrides == ["data.cache_dir=/tmp/c"]


def test_override_after_an_option_reaches_the_config(capsys):
    # the misspelt key comes after --restart: it is validated (exit 2, a suggestion), not rejected by argparse
    assert main(["train", "run.progress=false", "--restart", "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


def test_option_value_with_equals_sign_stays_with_the_option():
    args = parse_args(["generate", "RUN", "--prompt", "a=b", "mesh.data=1", "--prompt=x=y", "--prompt-file", "p=q.txt"])
    assert args.prompt == ["a=b", "x=y"] and args.prompt_file == "p=q.txt"
    assert args.overrides == ["mesh.data=1"]
    args = parse_args(["eval", "RUN", "--data", "text:dir/a=b/*.txt", "mesh.data=2"])
    assert args.data == "text:dir/a=b/*.txt" and args.overrides == ["mesh.data=2"]


@pytest.mark.parametrize("argv, bad", [
    (["eval", "RUN", "--data", "X", "stray"], "stray"),
    (["eval", "RUN", "--data", "X", "mesh.data=2", "--bogus=1"], "--bogus=1"),
    (["train", "optim.lr=1", "--restart", "second.yaml"], "second.yaml"),
    (["generate", "RUN", "--prompt", "hi", "=1"], "=1"),
    (["plot", "RUN", "--out", "o", "mesh.data=2"], "mesh.data=2"),  # plot takes no overrides
])
def test_bad_leftover_is_still_an_argparse_error(argv, bad, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: jaxlm" in err and f"error: unrecognized arguments: {bad}" in err
