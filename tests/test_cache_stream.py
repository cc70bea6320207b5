"""A token-cache build streams its source: its peak memory does not grow with the corpus.

Builds run in fresh child processes (tools/bench_cache.py) on generated corpora of two
sizes, each a mixture of a many-document jsonl file and a single-document text file (the
case a build has to cut itself), with a given tokenizer. Before the build streamed, the
larger build held its whole text (and a single document's ids) in memory: this test then
measured 93 MB against 352 MB (3.8x) on an AMD EPYC (family 25, model 17, 2 CPUs); since,
76 MB against 78 MB.
"""

import importlib.util
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL_MB, LARGE_MB = 4, 40


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cache", ROOT / "tools" / "bench_cache.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child_env() -> dict:
    """This environment without the tests' forced host device count, so the child sets up malloc
    as a one-device `jaxlm data` or training process does (jaxlm.runtime)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def test_peak_memory_of_a_cache_build_does_not_grow_with_the_corpus(bench, tmp_path):
    tok = bench.train_small_tokenizer(str(tmp_path / "bench.model"), vocab=1024, sample_mb=1)
    reports = {}
    for mb in (SMALL_MB, LARGE_MB):
        source, extra = bench.write_corpus(str(tmp_path / f"corpus{mb}"), mb, "jsonl,single")
        reports[mb] = bench.measure(source, extra, str(tmp_path / f"cache{mb}"), tok, 0, env=_child_env())
        assert reports[mb]["jaxlm"] == str(ROOT / "jaxlm")
    small, large = reports[SMALL_MB], reports[LARGE_MB]
    print(f"cache build peak RSS: {small['peak_rss_mb']} MB at {SMALL_MB} MB of text, {large['peak_rss_mb']} MB "
          f"at {LARGE_MB} MB ({large['mb_per_s']} MB/s)")
    assert large["bytes"] >= 0.99 * LARGE_MB * 1e6 and large["documents"] > 9 * small["documents"]
    assert large["peak_rss_mb"] <= 1.3 * small["peak_rss_mb"], (small, large)
