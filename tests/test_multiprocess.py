"""Several processes as one run, on this machine: `jaxlm launch` and `mpirun` against one process.

Every multi-process run here is 2 processes x 4 CPU devices, joined through jax.distributed
on 127.0.0.1 with gloo collectives; the reference is this test process with its 8 devices
on the same mesh. Every subprocess has a timeout, so a hang fails the test.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from jaxlm import checkpoint as ckpt
from jaxlm.metrics import read_metrics
from jaxlm.train import run

from conftest import tiny_config, write_corpus

# several processes, each with its devices and threads, under launch timeouts: nothing runs beside them
pytestmark = pytest.mark.serial

STEPS = 20
TIMEOUT = 240  # hang guard: seconds for any one launch
ARGS = ["model.family=gpt2", "model.d_model=64", "model.n_layers=2", "model.n_heads=8", "model.max_seq_len=64",
        "train.batch_size=16", "train.seq_len=32", "optim.schedule=constant", "optim.warmup_steps=0",
        "optim.lr=1e-3", "data.tokenizer_vocab=320", f"train.steps={STEPS}", "train.log_every=1",
        "eval.every=0", "eval.max_batches=2", "checkpoint.every=5", "checkpoint.keep=10", "run.progress=false",
        "run.tensorboard=false", "dist.heartbeat_s=10"]
MESHES = {"2x4x1": ["mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1"],
          "1x4x2": ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]}
# Writes by a process other than 0 are recorded through an audit hook (sitecustomize.py below).
AUDIT = '''
import os, sys
_log, _root = os.environ.get("AUDIT_LOG"), os.environ.get("AUDIT_ROOT")
if _log and _root:
    _out = open(f"{_log}.{os.getpid()}", "a", buffering=1)
    _who = os.environ.get("JAX_PROCESS_ID") or os.environ.get("OMPI_COMM_WORLD_RANK") or "?"
    _busy = []
    def _hook(event, args):
        if _busy or event not in ("open", "os.rename", "os.replace", "os.mkdir", "os.remove", "shutil.rmtree"):
            return
        path, write = args[0], True
        if event == "open":
            mode, flags = args[1], args[2]
            write = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if not write or not isinstance(path, (str, bytes, os.PathLike)):
            return
        p = os.path.abspath(os.fsdecode(path))
        if p.startswith(_root):
            _busy.append(1)
            _out.write(f"{_who} {event} {p}\\n")
            _busy.pop()
    sys.addaudithook(_hook)
'''


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir)) if "loss" in r}


def _evals(run_dir) -> dict[int, float]:
    """Validation loss and its 95% interval by step: the scorer's rows come from every process."""
    return {(r["step"], k): v for r in read_metrics(str(run_dir)) if "eval_loss" in r
            for k, v in [("loss", r["eval_loss"]), ("lo", r["eval_loss_ci95"][0]), ("hi", r["eval_loss_ci95"][1])]}


def _close(got: dict, want: dict, rtol: float = 1e-6) -> None:
    assert sorted(got) == sorted(want)
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    print(f"largest relative difference over {len(want)} values: {worst:.2e}")
    assert worst <= rtol, f"largest relative loss difference {worst:.2e}"


class Launched:
    """A `jaxlm launch` (or mpirun) subprocess whose output is collected line by line."""

    def __init__(self, argv: list[str], env: dict):
        self.lines: list[str] = []
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((line for line in list(self.lines) if text in line), None)
            if hit:
                return hit
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r}:\n{self.output()}")

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running after {timeout}s:\n{self.output()}") from None
        self.reader.join(10)
        return rc

    def pid(self, index: int) -> int:
        return int(self.wait_for(f"process {index}: pid").split()[-1])

    def output(self) -> str:
        return "".join(self.lines[-60:])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of the launched processes: a fresh token cache, the audit hook on PYTHONPATH."""
    root = tmp_path_factory.mktemp("multiprocess")
    (root / "corpus").mkdir()
    source = write_corpus(root / "corpus")
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "SLURM_", "JAX_COORDINATOR"))}
    e.update(JAXLM_CACHE_DIR=str(root / "cache"), PYTHONPATH=os.pathsep.join([str(site), e.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / "compiled"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # launches of one program compile it once
    e.pop("XLA_FLAGS", None)
    return {"env": e, "root": root, "source": source}


def _argv(env, run_dir, mesh, *extra) -> list[str]:
    return ["train", f"data.source={env['source']}", f"run.dir={run_dir}"] + ARGS + MESHES[mesh] + list(extra)


def launch(env, run_dir, mesh, *extra, audit: str = "") -> Launched:
    e = dict(env["env"], AUDIT_LOG=audit, AUDIT_ROOT=str(run_dir)) if audit else env["env"]
    return Launched([sys.executable, "-m", "jaxlm.cli", "launch", "--processes", "2", "--devices-per-process", "4",
                     "--grace", "120", "--"] + _argv(env, run_dir, mesh, *extra), e)


def one_process(env, run_dir, mesh, *extra):
    """The same run in this process, on its 8 devices (the token cache of the launched runs)."""
    os.environ["JAXLM_CACHE_DIR"], old = env["env"]["JAXLM_CACHE_DIR"], os.environ["JAXLM_CACHE_DIR"]
    try:
        cfg = tiny_config(*[a for a in _argv(env, run_dir, mesh, *extra)[1:]])
        return run(cfg, log=lambda m: None)
    finally:
        os.environ["JAXLM_CACHE_DIR"] = old


def _reference(env, mesh):
    """The run directory of one process with 8 devices on `mesh`, trained STEPS steps (once per module)."""
    run_dir = env["root"] / f"one-{mesh}"
    if not (run_dir / "metrics.jsonl").exists():
        one_process(env, run_dir, mesh)
    return run_dir


@pytest.fixture(scope="module")
def two(env):
    """2 processes x 4 devices on mesh 2x4x1, starting on a cold token cache, their writes audited."""
    run_dir = env["root"] / "two-2x4x1"
    audit = str(env["root"] / "audit")
    p = launch(env, run_dir, "2x4x1", audit=audit)
    assert p.finish() == 0, p.output()
    writes = []
    for name in os.listdir(env["root"]):
        if name.startswith("audit."):
            writes += (env["root"] / name).read_text().splitlines()
    return {"run_dir": run_dir, "lines": p.lines, "writes": writes}


def test_two_processes_train_like_one_and_only_process_0_writes_the_run(env, two):
    _close(_losses(two["run_dir"]), _losses(_reference(env, "2x4x1")))
    _close(_evals(two["run_dir"]), _evals(_reference(env, "2x4x1")))
    lines = two["lines"]
    # one tokenizer, trained by process 0; the token cache encoded by both: the 5 training files (one
    # chunk each: the sixth is held out), 3 by process 0 and 2 by process 1
    assert sum("tokenizer: trained" in line for line in lines) == 1
    assert any(line.startswith("[0] tokenizer: trained") for line in lines)
    for who, chunks in ((0, 3), (1, 2)):
        assert any(line.startswith(f"[{who}] token cache: process {who} encoded {chunks} chunks") for line in lines)
    assert any("processes: 2 (explicit), this is process 1 with 4 local cpu devices" in line for line in lines)
    by_process = {}
    for w in two["writes"]:
        who, _, path = w.split(" ", 2)
        by_process.setdefault(who, []).append(os.path.relpath(path, two["run_dir"]))
    assert by_process.get("0"), "the audit hook recorded nothing"
    top = {p.split(os.sep)[0].split(".tmp")[0] for p in by_process["0"]}  # renamed temporaries by their target
    assert {"config.yaml", "metrics.jsonl", "run_summary.json", "tokenizer.model", "checkpoints"} <= top
    others = [p for who, paths in by_process.items() if who != "0" for p in paths]
    assert not [p for p in others if not p.startswith("checkpoints")], others
    # Orbax: every process writes its own array shards, process 0 alone the metadata and JSON items
    assert not [p for p in others if os.sep + "meta" in p or os.sep + "tokenizer" in p or "METADATA" in p], others


@pytest.mark.parametrize("launcher", ["launch", "mpirun"])
def test_two_processes_on_a_tensor_mesh_train_like_one(env, launcher):
    run_dir = env["root"] / f"two-1x4x2-{launcher}"
    if launcher == "mpirun":
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            msg = "mpirun is not installed (Debian: apt-get install openmpi-bin)"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(msg)
            pytest.skip(msg)
        e = dict(env["env"], XLA_FLAGS="--xla_force_host_platform_device_count=4")
        p = Launched([mpirun, "-n", "2", "--oversubscribe", "--allow-run-as-root", sys.executable, "-m", "jaxlm.cli"]
                     + _argv(env, run_dir, "1x4x2"), e)
    else:
        p = launch(env, run_dir, "1x4x2")
    assert p.finish() == 0, p.output()
    if launcher == "mpirun":
        assert "processes: 2 (Open MPI)" in "".join(p.lines)
    _close(_losses(run_dir), _losses(_reference(env, "1x4x2")))
    _close(_evals(run_dir), _evals(_reference(env, "1x4x2")))


def _cut_at(src, dst, step: int) -> None:
    """A copy of run `src` as it stood when checkpoint `step` was its newest."""
    shutil.copytree(src, dst)
    for s in ckpt.steps(str(dst)):
        if s > step:
            shutil.rmtree(dst / "checkpoints" / str(s))


def test_checkpoints_move_between_process_counts(env, two):
    one = _reference(env, "2x4x1")
    want = _losses(one)
    # saved by 2 processes, resumed by 1 (8 devices)
    from_two = env["root"] / "from-two"
    _cut_at(two["run_dir"], from_two, 10)
    one_process(env, from_two, "2x4x1")
    _close(_losses(from_two), want)
    # saved by 1 process, resumed by 2
    from_one = env["root"] / "from-one"
    _cut_at(one, from_one, 10)
    p = launch(env, from_one, "2x4x1")
    assert p.finish() == 0, p.output()
    assert "resuming" in p.wait_for("[1] resuming") and "at step 10" in p.wait_for("[0] resuming")
    _close(_losses(from_one), want)


def test_sigkill_of_process_1_stops_process_0_and_the_relaunch_resumes(env, two):
    run_dir = env["root"] / "killed"
    p = launch(env, run_dir, "2x4x1")
    victim = p.pid(1)
    at = random.Random().randint(6, 14)
    p.wait_for(f"[1] step {at}/")
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    rc = p.finish(timeout=120)  # hang guard
    took = time.monotonic() - killed
    print(f"killed process 1 after step {at}; launch ended {took:.1f}s later with {rc}")
    assert rc != 0
    assert took < 60
    assert "[0] error: process 1 sent no heartbeat" in p.output() and "Relaunch the same command" in p.output()
    assert ckpt.steps(str(run_dir)), "no checkpoint was committed before the kill"
    again = launch(env, run_dir, "2x4x1")
    assert again.finish() == 0, again.output()
    again.wait_for("[0] resuming")
    steps = [r["step"] for r in read_metrics(str(run_dir)) if "loss" in r]
    assert steps == list(range(STEPS))  # every step exactly once
    assert _losses(run_dir) == _losses(two["run_dir"])  # and the same as the uninterrupted launch, bitwise


def test_sigterm_to_process_1_stops_both_at_one_step(env, two):
    run_dir = env["root"] / "stopped"
    p = launch(env, run_dir, "2x4x1", "checkpoint.every=0")
    victim = p.pid(1)
    p.wait_for("[1] step 4/")
    os.kill(victim, signal.SIGTERM)
    assert p.finish() == 75, p.output()
    out = p.output()
    stops = {line.split()[0]: line.split("after step ")[1].split()[0] for line in p.lines if "stopping after" in line}
    assert set(stops) == {"[0]", "[1]"} and stops["[0]"] == stops["[1]"], out
    stopped = int(stops["[0]"])
    assert stopped < STEPS and ckpt.steps(str(run_dir)) == [stopped]
    again = launch(env, run_dir, "2x4x1", "checkpoint.every=0")
    assert again.finish() == 0, again.output()
    assert f"at step {stopped}" in again.wait_for("[0] resuming")
    assert _losses(run_dir) == _losses(two["run_dir"])  # continues bitwise


FAKE_SRUN = """#!/bin/bash
# srun -n $SLURM_NTASKS on one machine: the variables SLURM gives each task, then wait for all
for i in $(seq 0 $((SLURM_NTASKS - 1))); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "${@:2}" &
done
wait
"""


def test_the_slurm_recipe_runs_two_tasks_as_one_run(env, two, tmp_path):
    """experiments/cluster/slurm.sbatch with a stand-in srun that starts its tasks here: JAX's SLURM
    detection gives the coordinator, count and index, and the run trains like the launched one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    port = 20000 + random.Random().randint(0, 20000)
    e = dict(env["env"], PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]]),
             SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", JAX_COORDINATOR_PORT=str(port),
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
    run_dir = tmp_path / "slurm"
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "cluster",
                          "slurm.sbatch")
    p = Launched(["bash", recipe] + _argv(env, run_dir, "2x4x1")[1:], e)
    assert p.finish() == 0, p.output()
    assert "processes: 2 (SLURM), this is process 1" in "".join(p.lines)
    assert _losses(run_dir) == _losses(two["run_dir"])


KILL_HOOK = '''
import os, signal, sys
_after, _who = os.environ.get("KILL_AFTER_CHUNKS"), os.environ.get("KILL_PROCESS")
if _after and _who == os.environ.get("JAX_PROCESS_ID"):
    _seen = []
    def _hook(event, args):
        if event == "os.rename" and ".parts-" in str(args[1]) and str(args[1]).endswith(".json"):
            _seen.append(1)
            if len(_seen) > int(_after):  # dies right before committing one more chunk (os.replace audits as os.rename)
                os.kill(os.getpid(), signal.SIGKILL)
    sys.addaudithook(_hook)
'''


def _books(directory, files: int = 6, docs: int = 24) -> None:
    """Files of several documents each (separated by four newlines), some of them non-ASCII."""
    rng = random.Random(5)
    words = "the king queen lord lady good night day love death sword crown heart mind fair über café 日本 naïve".split()
    directory.mkdir()
    for f in range(files):
        books = ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "."
                           for _ in range(rng.randint(20, 200))) for _ in range(docs)]
        (directory / f"books{f}.txt").write_text("\n\n\n\n".join(books), encoding="utf-8")


def _entries(cache) -> dict[str, bytes]:
    """tokens.bin of every complete entry of a cache, by entry name."""
    root = cache / "tokens"
    return {p.name: (p / "tokens.bin").read_bytes() for p in root.iterdir() if (p / "manifest.json").exists()}


def test_two_processes_build_the_token_cache_of_one_and_a_killed_build_completes(env, tmp_path):
    """`jaxlm data` on 2 processes: each encodes its own run of chunks, and the entries are the bytes of a
    one-process build (one chunk per split). Process 1 killed after committing 3 chunks: the relaunch
    keeps what was committed, encodes the rest, and the bytes are the same again."""
    from jaxlm.config import load_config
    from jaxlm.train import prepare_data

    _books(tmp_path / "books")
    config = tmp_path / "books.yaml"
    config.write_text(f'data:\n  source: "text:{tmp_path}/books/*.txt"\n  doc_separator: "\\n\\n\\n\\n"\n'
                      "  tokenizer_vocab: 320\n  valid_fraction: 0.1\n")
    prepare_data(load_config(str(config), [f"data.cache_dir={tmp_path / 'one'}"]), log=lambda m: None)
    want = _entries(tmp_path / "one")
    assert len(want) == 2
    (tok,) = (tmp_path / "one" / "tokenizers").iterdir()  # the launched builds use the same tokenizer file

    def data(cache, env_extra=None):
        e = dict(env["env"], **(env_extra or {}))
        return Launched([sys.executable, "-m", "jaxlm.cli", "launch", "--processes", "2", "--grace", "30", "--",
                         "data", str(config), f"data.cache_dir={cache}", f"data.tokenizer={tok}",
                         "data.build_chunk_mb=0.01", "dist.heartbeat_s=3"], e)

    p = data(tmp_path / "two")
    assert p.finish() == 0, p.output()
    assert _entries(tmp_path / "two") == want
    out = p.output()
    n = int(out.split("of the ")[1].split()[0])  # chunks of the training split
    assert n >= 10, out
    for who in (0, 1):
        assert f"[{who}] token cache: process {who} encoded {len(range(-(-who * n // 2), -(-(who + 1) * n // 2)))} " \
               f"chunks" in out, out
    site = tmp_path / "kill-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(KILL_HOOK)
    killing = {"PYTHONPATH": os.pathsep.join([str(site), env["env"].get("PYTHONPATH", "")]),
               "KILL_AFTER_CHUNKS": "3", "KILL_PROCESS": "1"}
    p = data(tmp_path / "killed", env_extra=killing)
    assert p.finish(timeout=120) != 0
    assert _entries(tmp_path / "killed") == {}  # nothing a run would read
    (parts,) = [d for d in (tmp_path / "killed" / "tokens").iterdir() if ".parts-" in d.name]
    committed = len(list(parts.glob("*.json")))
    assert 3 < committed < n
    again = data(tmp_path / "killed")
    assert again.finish() == 0, again.output()
    assert f"token cache: {committed} of the {n} chunks of train" in again.output(), again.output()
    assert _entries(tmp_path / "killed") == want
    assert not [d for d in (tmp_path / "killed" / "tokens").iterdir() if ".parts-" in d.name or ".tmp-" in d.name]
