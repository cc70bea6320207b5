"""The Weights & Biases sink, offline: what it logs is read back from the run's .wandb file.

wandb (in the test extra) writes an offline run as a transaction log of protobuf records
(run-<id>.wandb, a leveldb-log file); `_records` reads it (wandb 0.31 no longer ships a Python
reader) and checks every chunk's checksum. wandb.init starts wandb's service process when none runs (about
0.3-0.5 s here); the file takes 3-5 s on a 2-core machine.
"""

import json
import math
import struct
import sys
import zlib

import numpy as np
import pytest

from jaxlm.config import load_config
from jaxlm.errors import ConfigError


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb offline, quiet, and with all its files under tmp_path."""
    for var, sub in [("WANDB_DIR", "wandb-dir"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data")]:
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def _cfg(run_dir, *extra):
    return load_config(overrides=["run.name=wb-test", f"run.dir={run_dir}", "run.wandb=true",
                                  "run.wandb_mode=offline", "model.d_model=64", "model.n_layers=2",
                                  "model.n_heads=4", "optim.lr=0.003", *extra])


BLOCK = 32768  # leveldb log: 32 KiB blocks of chunks (crc32, length, type: full/first/middle/last)


def _records(path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (crc, n, kind) == (0, 0, 0):  # zero padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + n]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc
        pos += 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def _key(item):
    return "/".join(item.nested_key) if item.nested_key else item.key


def _read_run(run_dir):
    """(run id, config, history rows by step, final summary) of each offline run in run_dir.

    run.finish() returns once the service has handled the exit record, but the service may write
    the file a little later; wandb.teardown() stops the service, which completes every file.
    """
    import wandb

    wandb.teardown()
    runs = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run_id, config, rows, summary = None, {}, {}, {}
        for r in _records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run_id = r.run.run_id
                config.update({_key(u): json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "config":
                config.update({_key(u): json.loads(u.value_json) for u in r.config.update})
            elif kind == "history":
                row = {_key(i): json.loads(i.value_json) for i in r.history.item}
                rows[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
            elif kind == "summary":
                summary.update({_key(u): json.loads(u.value_json) for u in r.summary.update})
        runs.append((run_id, config, rows, summary))
    return runs


def test_logs_config_scalars_and_summary(offline):
    from jaxlm.wandb_sink import WandbSink

    run_dir = offline / "run"
    sink = WandbSink(str(run_dir), _cfg(run_dir), resume=False)
    sink.log({"step": 0, "loss": 5.25, "lr": 1e-3, "grad_norm": float("nan"), "tokens": 512,
              "note": "warmup", "mfu": np.float32(0.25), "flag": True})
    sink.log({"step": 0, "eval_loss": 5.5, "eval_s": float("inf")})  # joins the row of step 0
    sink.log({"step": 3, "loss": 4.125, "lr": 2e-3, "tokens": 2048})
    sink.log({"step": 2, "loss": 99.0})  # below a step already logged: not sent
    sink.log({"step": 4, "loss": 3.75, "tokens": 2560, "skipped_steps": 0})
    sink.summary({"eval_best": 4.0, "params": 123456, "final": {"bpb": 1.5, "bad": float("nan")},
                  "status": "done", "shape": [1, 2], "missing": None})
    sink.close()
    sink.close()  # a second close does nothing
    assert sink.skipped == 1

    (run_id, config, rows, summary), = _read_run(run_dir)
    assert run_id == sink.id == (run_dir / "wandb_id.txt").read_text().strip()
    assert config["model"]["d_model"] == 64 and config["model"]["n_heads"] == 4
    assert config["optim"]["lr"] == 0.003 and config["run"]["name"] == "wb-test"
    assert config["run"]["wandb_mode"] == "offline"
    assert rows == {
        0: {"loss": 5.25, "lr": 1e-3, "tokens": 512, "mfu": 0.25, "eval_loss": 5.5},
        3: {"loss": 4.125, "lr": 2e-3, "tokens": 2048},
        4: {"loss": 3.75, "tokens": 2560, "skipped_steps": 0},
    }
    mine = {k: v for k, v in summary.items() if not k.startswith("_")}
    assert mine == {"eval_best": 4.0, "params": 123456, "final/bpb": 1.5, "status": "done",
                    # W&B's own summary: the last logged value of each history key
                    "loss": 3.75, "lr": 2e-3, "tokens": 2560, "mfu": 0.25, "eval_loss": 5.5,
                    "skipped_steps": 0}
    assert all(math.isfinite(v) for v in mine.values() if not isinstance(v, str))


def test_resume_continues_the_same_run(offline):
    from jaxlm.wandb_sink import WandbSink

    run_dir = offline / "run"
    first = WandbSink(str(run_dir), _cfg(run_dir), resume=False)
    first.log({"step": 0, "loss": 2.0})
    first.close()
    again = WandbSink(str(run_dir), _cfg(run_dir), resume=True)
    assert again.id == first.id and again.run.id == first.id
    again.log({"step": 1, "loss": 1.5})
    again.close(exit_code=0)
    fresh = WandbSink(str(run_dir), _cfg(run_dir), resume=False)  # a new training run: a new W&B run
    fresh.close()
    assert fresh.id != first.id
    assert (run_dir / "wandb_id.txt").read_text().strip() == fresh.id
    runs = _read_run(run_dir)
    assert sorted(r[0] for r in runs) == sorted([first.id, first.id, fresh.id])
    assert [r[2] for r in runs if r[0] == first.id] in ([{0: {"loss": 2.0}}, {1: {"loss": 1.5}}],
                                                        [{1: {"loss": 1.5}}, {0: {"loss": 2.0}}])


def test_missing_wandb_and_factory(tmp_path, monkeypatch):
    import jax

    from jaxlm.wandb_sink import WandbSink, make_sink

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    cfg = _cfg(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"pip install 'jaxlm\[wandb\]'"):
        WandbSink(str(tmp_path / "run"), cfg, resume=False)
    with pytest.raises(ConfigError, match="run.wandb=false"):
        make_sink(str(tmp_path / "run"), cfg, resume=False)
    assert make_sink(str(tmp_path / "run"), _cfg(tmp_path / "run", "run.wandb=false"), resume=False) is None
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert make_sink(str(tmp_path / "run"), cfg, resume=False) is None


def test_wandb_mode_is_checked():
    with pytest.raises(ConfigError, match="did you mean 'offline'"):
        load_config(overrides=["run.wandb_mode=ofline"])
    assert load_config(overrides=["run.wandb_mode=disabled"]).run.wandb_mode == "disabled"
    assert load_config().run.wandb is False


def test_a_training_run_logs_its_metrics_and_summary(offline, small_corpus):
    """run.wandb=true on a real run: W&B holds the numbers of metrics.jsonl and run_summary.json."""
    from jaxlm.metrics import read_metrics
    from jaxlm.train import run

    from test_cli import TINY_CLI

    run_dir = offline / "train"
    cfg = load_config(overrides=TINY_CLI + [f"data.source={small_corpus}", f"run.dir={run_dir}", "train.steps=4",
                                            "train.log_every=1", "eval.every=2", "checkpoint.enabled=false",
                                            "run.tensorboard=false", "run.wandb=true", "run.wandb_mode=offline"])
    run(cfg, log=print)
    (run_id, config, rows, summary), = _read_run(run_dir)
    assert config["model"]["d_model"] == 32
    records = read_metrics(str(run_dir))
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                assert rows[r["step"]][k] == v, (r["step"], k)
    assert {r["step"] for r in records if "eval_loss" in r} == {1, 3}
    run_summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "done" == run_summary["status"]
    assert summary["last_eval/bpb"] == run_summary["last_eval"]["bpb"]
    assert summary["params/total"] == run_summary["params"]["total"]
