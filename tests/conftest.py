"""Eight fake CPU devices for every test, and helpers for tiny configs and the shared corpora.

The suite runs on pytest-xdist workers (README "Tests"). What a worker shares with the
others comes from the environment the first process sets up here: one token cache and one
compiled-program cache per session. Tests marked `serial` run alone (see
`pytest_runtest_protocol`).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# What the tests add to XLA_FLAGS, so that a test can start a process as a user's would (`user_env`):
# - eight host devices, for the meshes;
# - on the CPU, programs compiled without LLVM's optimisations (LLVM -O0), unless JAXLM_TEST_XLA_OPT=full.
#   The suite compiles some two thousand tiny programs and runs each a few times, so compiling dominates
#   its time: test_model.py + test_kernel_sets.py took 317 CPU-s optimised and 180 CPU-s unoptimised,
#   test_step.py's mesh tests 120 and 74 (2-core Intel Xeon, docs/performance.md "Test suite time").
#   What the tests check (meshes against one device, resume against an unbroken run, cpu kernels
#   against standard ones) compares programs built with the same flags; the last bits of a float32 result
#   can differ between -O0 and -O2, which no test compares. The quickstart trains as a user's process
#   does, optimised, on one device (tests/test_quickstart.py).
TEST_XLA_FLAGS = ["--xla_force_host_platform_device_count=8"]
if os.environ["JAX_PLATFORMS"].split(",")[0] == "cpu" and os.environ.get("JAXLM_TEST_XLA_OPT", "") != "full":
    TEST_XLA_FLAGS.append("--xla_backend_optimization_level=0")
_user_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(_user_flags + [f for f in TEST_XLA_FLAGS if f not in _user_flags])

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402


def _session_dir(prefix: str) -> str:
    """A fresh temporary directory, removed when the test session ends."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# The first process of a session (the xdist controller, or pytest alone) makes the session's
# directories; xdist workers inherit them through the environment, so they share one token cache
# and one compiled-program cache instead of one each.
if "JAXLM_TEST_SESSION" not in os.environ:
    os.environ["JAXLM_TEST_SESSION"] = _session_dir("jaxlm-test-session-")
    # Token caches of tests go to a fresh directory, never the user's ~/.cache/jaxlm.
    os.environ["JAXLM_CACHE_DIR"] = os.path.join(os.environ["JAXLM_TEST_SESSION"], "cache")
    # One compiled-program cache for the session, shared with workers and the subprocesses tests start:
    # many tests build the same tiny model and step, and each new Stepper is a new jit, so without it every
    # test recompiles programs an earlier one already compiled (test_cli.py: 152 s without, 92 s with, on a
    # 2-core Intel Xeon with two training processes beside it). A test that sets its own
    # JAX_COMPILATION_CACHE_DIR for a subprocess keeps it.
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["JAXLM_TEST_SESSION"], "compiled")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from jaxlm.config import load_config  # noqa: E402

SHARED_DATA = pathlib.Path(os.environ.get("JAXLM_SHARED_DATA",
                                          pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))

TINY = ["model.family=gpt2", "model.d_model=64", "model.n_layers=2", "model.n_heads=8", "model.max_seq_len=64",
        "train.batch_size=16", "train.seq_len=32", "optim.schedule=constant", "optim.warmup_steps=0",
        "optim.lr=1e-3", "data.tokenizer_vocab=256"]


def tiny_config(*overrides: str):
    """A 2-layer, width-64, 8-head config (tensor=8 is legal) plus overrides."""
    return load_config(None, TINY + list(overrides))


KERNEL_SETS = ("cpu", "standard")


@pytest.fixture(params=KERNEL_SETS)
def kernel_set(request):
    """Each kernel set in turn (model.kernels=cpu, then standard), both run on this CPU."""
    return request.param


def decoder(cfg, vocab: int, kernel_set: str = "cpu", platform: str = "cpu"):
    """The Decoder of `cfg` with model.kernels=`kernel_set`, resolved as a run on `platform` would."""
    import dataclasses

    from jaxlm import kernels
    from jaxlm.model import Decoder

    m = dataclasses.replace(cfg.model, kernels=kernel_set)
    return Decoder(kernels.resolve(m, platform, cfg.train.seq_len), vocab)


def user_env(**extra: str) -> dict:
    """os.environ without what the tests add to XLA_FLAGS: a process started with it runs as a user's
    would (one CPU device, optimised programs), with the session's caches."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in TEST_XLA_FLAGS]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return {**env, **extra}


def shared_data(relative: str) -> pathlib.Path:
    """A path in ../shared/data: skip with a reason off CI, fail on CI (CI=true) when missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        msg = f"shared corpus {path} is missing (set JAXLM_SHARED_DATA)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def shakespeare_text_source():
    return "text:" + str(shared_data("tinyshakespeare/input.txt"))


def write_corpus(directory, seed: int = 0) -> str:
    """Six synthetic documents of 300 short lines written to `directory`; returns the text: source."""
    import random

    rng = random.Random(seed)
    words = "the king queen lord lady good night day love death sword crown heart mind fair".split()
    for i in range(6):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "." for _ in range(300)]
        (directory / f"doc{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return "text:" + str(directory / "doc*.txt")


@pytest.fixture(scope="session")
def small_corpus():
    """A few synthetic documents on disk, written once per session and read-only, so their tokenizer and
    token cache are built once and reused by every test (a test that changes its corpus overrides
    this fixture with a per-test one, as tests/test_data.py does)."""
    import fcntl
    import pathlib

    directory = pathlib.Path(os.environ["JAXLM_TEST_SESSION"]) / "small_corpus"
    with open(os.path.join(os.environ["JAXLM_TEST_SESSION"], "small_corpus.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one xdist worker writes it, the others wait and read
        if not (directory / "done").exists():
            directory.mkdir(exist_ok=True)
            source = write_corpus(directory)
            for doc in directory.glob("doc*.txt"):
                doc.chmod(0o444)
            (directory / "done").write_text(source)
    return (directory / "done").read_text()


_LOCKS = {}


def _lock_file(name: str):
    if name not in _LOCKS:
        _LOCKS[name] = open(os.path.join(os.environ["JAXLM_TEST_SESSION"], name), "w")
    return _LOCKS[name]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Tests marked `serial` run alone: a readers-writer lock over the xdist workers, held around a test's
    whole run, its fixtures' set-up included. Every test holds the shared lock; a serial test holds it
    exclusively, so it waits for the running tests to end and no other test starts until it is done.
    The turnstile gives a waiting serial test priority over tests that would start after it. Such
    tests start several processes under launch timeouts: a neighbour on the other core would slow them."""
    import fcntl

    serial = item.get_closest_marker("serial") is not None
    turnstile, shared = _lock_file("turnstile.lock"), _lock_file("tests.lock")
    fcntl.flock(turnstile, fcntl.LOCK_EX)
    try:
        fcntl.flock(shared, fcntl.LOCK_EX if serial else fcntl.LOCK_SH)
    finally:
        if not serial:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
    try:
        yield
    finally:
        fcntl.flock(shared, fcntl.LOCK_UN)
        if serial:
            fcntl.flock(turnstile, fcntl.LOCK_UN)


# The files with the longest set-up in a full run (two workers, 2-core Intel Xeon: the quickstart's training
# 494 s, the coordinate check 326 s, the sweep 198 s) start first, so that none is left running alone at the
# end; the multi-process tests, which run alone, come last. xdist keeps this order only with
# --no-loadscope-reorder (pyproject.toml): by default it starts the files with the most tests first.
_FIRST = ("test_quickstart.py", "test_coord_check.py", "test_sweep.py", "test_resume.py", "test_dropout.py")
_LAST = ("test_multiprocess.py",)


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        if name in _FIRST:
            return _FIRST.index(name)
        return len(_FIRST) + 1 if name in _LAST else len(_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny gpt2 run with checkpoints at steps 12 and 24 and a validation pass at the end."""
    root = tmp_path_factory.mktemp("eval")
    source = write_corpus(root, seed=1)
    run_dir = root / "run"
    from jaxlm.cli import main
    from test_cli import TINY_CLI

    assert main(["train", f"data.source={source}", f"run.dir={run_dir}", "train.steps=24",
                 "eval.every=0", "checkpoint.every=12", "optim.lr=3e-3", "optim.warmup_steps=0",
                 "optim.schedule=constant", "run.tensorboard=false"] + TINY_CLI) == 0
    return root, run_dir


def run_abstract_state(run_dir):
    """The abstract train state of a run directory's model on one device (a restore target)."""
    import jax
    import sentencepiece as spm

    from jaxlm.config import load_config
    from jaxlm.sharding import make_mesh
    from jaxlm.step import Stepper, build

    cfg = load_config(str(run_dir / "config.yaml"), ["mesh.data=1"])
    vocab = spm.SentencePieceProcessor(model_file=str(run_dir / "tokenizer.model")).vocab_size()
    mesh = make_mesh(cfg, jax.devices()[:1])
    model, tx, schedule = build(cfg, vocab, mesh)
    return Stepper(cfg, model, tx, schedule, mesh).abstract_state()
