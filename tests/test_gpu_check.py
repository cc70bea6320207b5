"""tools/gpu_check.py: its dry run (every step of the GPU check, on the CPU at tiny sizes), and
the parts the CPU cannot reach (a GPU trace's kernels, failing tests in the test step)."""

import gzip
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402


def _wheel(where: pathlib.Path) -> pathlib.Path:
    """A one-module pure-Python wheel, standing in for a carried one."""
    path = where / "gpucheckdemo-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("gpucheckdemo/__init__.py", "VALUE = 7\n")
        z.writestr("gpucheckdemo-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: gpucheckdemo\nVersion: 0.1\n")
        z.writestr("gpucheckdemo-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                       "Tag: py3-none-any\n")
        z.writestr("gpucheckdemo-0.1.dist-info/RECORD", "")
    return path


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-check")
    wheels = tmp / "whl"
    wheels.mkdir()
    _wheel(wheels)
    out = tmp / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--wheels", str(wheels)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def test_dry_run_installs_measures_profiles_scales_and_tests(dry_run):
    out, res, stdout = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["profile.txt", "results.json", "steps.log", "summary.md",
                                                     "tests.log"]
    s = res["steps"]
    assert s["install"]["status"] == "ok", s["install"]
    assert s["install"]["wheels"] == ["gpucheckdemo-0.1-py3-none-any.whl"]
    assert "install wheels" in (out / "steps.log").read_text()
    for model in ("gpt2-124m", "llama-125m"):
        for attention in ("cudnn", "xla"):
            r = s[f"jaxlm {model} {attention}"]
            assert r["status"] == "ok", r
            assert r["attention_resolved"] == "xla" and r["kernels_resolved"] == "standard"
            assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["steps"] >= 1
            assert 0 < r["compiled_bytes"] < r["memory_limit"] == 2**30 and r["planned_bytes"] > 0
            assert r["loss"] == pytest.approx(5.55, abs=0.5)  # ln 256 at the start
        assert s[f"jaxlm {model} cudnn"]["batch"] == s[f"jaxlm {model} xla"]["batch"] == 8  # one batch per model
    for name in ("torch compile", "torch eager"):
        assert s[name]["status"] == "ok" and s[name]["tokens_per_s"] > 0 and s[name]["batch"] == 8, s[name]
    assert len(res["ratios"]) == 4 and all(v > 0 for v in res["ratios"].values())
    prof = s[res["profiled"]]["profile"]
    assert res["profiled"] == "jaxlm gpt2-124m cudnn" and len(prof["ops"]) == 5
    assert 0 < sum(o["share"] for o in prof["ops"]) <= 1
    assert json.loads((out / "profile.txt").read_text().split("\n", 1)[1])["ops"] == prof["ops"]
    # the plan refuses gpt2-124m under the dry run's 1 GiB without compiling; the next preset trains
    assert s["scale gpt2-124m"]["status"] == "does not fit" and s["scale gpt2-124m"]["planned_bytes"] > 2**30
    assert res["largest_preset"] == "llama-tiny" and s["scale llama-tiny"]["status"] == "ok"
    assert s["tests"]["counts"].get("PASSED", 0) >= 1 and s["tests"]["not_passed"] == {}, s["tests"]
    summary = (out / "summary.md").read_text()
    assert summary in stdout and "| jaxlm llama-125m xla | 8 |" in summary and "## GPU tests: exit 0" in summary


def test_the_profile_reads_kernels_off_a_gpu_trace(tmp_path):
    meta = lambda pid, name: {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}  # noqa: E731
    x = lambda pid, name, dur: {"ph": "X", "pid": pid, "tid": 1, "name": name, "dur": dur}  # noqa: E731
    events = [meta(1, "/device:GPU:0"), meta(2, "/host:CPU"), x(1, "gemm", 60.0), x(1, "gemm", 20.0),
              x(1, "fusion_3", 15.0), x(1, "copy", 5.0), x(2, "PjitFunction", 1000.0)]
    (tmp_path / "plugins").mkdir()
    with gzip.open(tmp_path / "plugins" / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    prof = gpu_check._top_ops(str(tmp_path), n=2)
    assert prof["where"] == "device streams" and prof["total_ms"] == pytest.approx(0.1)
    assert [(o["name"], o["calls"], round(o["share"], 2)) for o in prof["ops"]] == [("gemm", 2, 0.8),
                                                                                   ("fusion_3", 1, 0.15)]


def test_the_test_step_lists_failures_and_skips_and_stops_at_its_cap(tmp_path):
    t = tmp_path / "test_mixed.py"
    t.write_text("import pytest, time\n"
                 "def test_ok(): pass\n"
                 "def test_bad(): assert 1 == 2\n"
                 "@pytest.mark.skip(reason='no cuDNN here')\n"
                 "def test_skipped(): pass\n")
    run = gpu_check.Run(str(tmp_path), 600, True, dict(os.environ))
    res = gpu_check.run_tests(run, [str(t)], 120)
    assert res["status"] == "exit 1" and res["counts"] == {"PASSED": 1, "FAILED": 1, "SKIPPED": 1}
    assert [n.split("::")[1] for n in res["not_passed"]["FAILED"]] == ["test_bad"]
    assert any("no cuDNN here" in line for line in res["summary_lines"])
    slow = tmp_path / "test_slow.py"
    slow.write_text("import time\ndef test_first(): pass\ndef test_hangs(): time.sleep(600)\n")
    res = gpu_check.run_tests(run, [str(slow)], 20)
    assert res["status"] == "stopped at the time cap" and res["counts"] == {"PASSED": 1}
    run.log.close()
