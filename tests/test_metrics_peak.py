"""MFU peaks: the override, the data-sheet table, the CPU peak's per-machine cache, mfu_note."""

import json
import math
import types

import jax
import pytest

from jaxlm import metrics
from jaxlm.metrics import cpu_peak_key, measured_matmul_flops, mfu_note, peak_flops_info


def peak_flops(device, override_tflops: float = 0.0, dtype: str = "float32"):
    """The peak FLOP/s alone, without where it comes from."""
    return peak_flops_info(device, override_tflops, dtype)[0]


MACHINE_FLOPS = 4e11  # what the fake measurement returns: FLOP/s of the whole machine


@pytest.fixture
def measure(tmp_path, monkeypatch):
    """A fresh cache dir, no in-process memo, and a fake measurement that counts its calls."""
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(metrics, "_cpu_peak_memo", {})
    calls = []

    def fake(device, dtype="float32", **_):
        calls.append(dtype)
        return MACHINE_FLOPS

    monkeypatch.setattr(metrics, "measured_matmul_flops", fake)
    return calls


def _cpu():
    return jax.local_devices(backend="cpu")[0]


def _per_device():
    return MACHINE_FLOPS / len(jax.local_devices(backend="cpu"))


def _cache_file(tmp_path):
    return tmp_path / "cache" / "cpu_peak.json"


def test_cpu_peak_is_cached_per_dtype_and_reused(measure, tmp_path, monkeypatch):
    flops, source = peak_flops_info(_cpu())
    assert measure == ["float32"] and flops == _per_device()
    path = _cache_file(tmp_path)
    assert "measured on this CPU" in source and f"cached at {path}" in source
    entries = json.loads(path.read_text())["entries"]
    key = cpu_peak_key("float32", len(jax.local_devices(backend="cpu")))
    assert list(entries) == [key] and entries[key]["machine_flops"] == MACHINE_FLOPS
    assert not [p for p in path.parent.iterdir() if p.name != "cpu_peak.json"]  # no temporary file left

    # a later run (no in-process memo) reads the file instead of measuring
    monkeypatch.setattr(metrics, "_cpu_peak_memo", {})
    assert peak_flops_info(_cpu()) == (flops, f"float32 matmul peak measured on this CPU, cached at {path}")
    assert peak_flops(_cpu()) == flops and measure == ["float32"]

    # bfloat16 is measured on its own and stored next to the float32 entry
    assert peak_flops(_cpu(), dtype="bfloat16") == _per_device() and measure == ["float32", "bfloat16"]
    assert peak_flops(_cpu(), 0.0, "bfloat16") == _per_device() and len(measure) == 2
    assert len(json.loads(path.read_text())["entries"]) == 2


def test_cache_key_names_what_the_peak_depends_on():
    key = cpu_peak_key("bfloat16", 8)
    assert "bfloat16" in key and f"jax {jax.__version__}" in key and "8 devices" in key
    assert f"{metrics.usable_cpus()} cpus" in key and key != cpu_peak_key("float32", 8) != cpu_peak_key("float32", 1)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", '{"version": 1, "entries": []}',
                                  '{"version": 1, "entries": {"KEY": {"machine_flops": -1}}}',
                                  '{"version": 1, "entries": {"KEY": {"machine_flops": "fast"}}}',
                                  '{"version": 99, "entries": {"KEY": {"machine_flops": 1e20}}}'])
def test_corrupt_cache_is_ignored_and_rewritten(measure, tmp_path, text):
    path = _cache_file(tmp_path)
    path.parent.mkdir()
    key = cpu_peak_key("float32", len(jax.local_devices(backend="cpu")))
    path.write_text(text.replace("KEY", key))
    assert peak_flops(_cpu()) == _per_device() and measure == ["float32"]
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["entries"][key]["machine_flops"] == MACHINE_FLOPS


def test_unwritable_cache_still_gives_a_measured_peak(measure, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(blocker / "cache"))  # its parent is a file: cannot be created
    flops, source = peak_flops_info(_cpu())
    assert flops == _per_device() and "not cached" in source and measure == ["float32"]


def test_override_wins_and_measures_nothing(measure):
    assert peak_flops(_cpu(), 2.5) == 2.5e12  # the old positional form
    flops, source = peak_flops_info(_cpu(), override_tflops=2.5, dtype="bfloat16")
    assert flops == 2.5e12 and source == "run.peak_tflops=2.5"
    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
    assert peak_flops(h100, 100.0) == 100e12
    assert measure == []


@pytest.mark.parametrize("kind, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA A100-SXM4-40GB", 312.0),
                                          ("TPU v5 lite", 197.0), ("TPU v4", 275.0)])
def test_data_sheet_peak_by_device_kind(measure, kind, tflops):
    device = types.SimpleNamespace(device_kind=kind, platform="tpu" if "TPU" in kind else "gpu")
    for dtype in ("float32", "bfloat16"):
        flops, source = peak_flops_info(device, dtype=dtype)
        assert flops == tflops * 1e12 and source.startswith("data sheet:")
    assert measure == []


def test_unknown_accelerator_has_no_peak(measure):
    device = types.SimpleNamespace(device_kind="Mystery Accelerator 9000", platform="gpu")
    flops, source = peak_flops_info(device)
    assert flops is None and "mystery accelerator 9000" in source and peak_flops(device) is None
    assert measure == []


def test_mfu_note_only_above_100_percent():
    measured = "float32 matmul peak measured on this CPU, cached at /c/cpu_peak.json"
    for mfu in (0.0, 0.5, 1.0, float("nan")):
        assert mfu_note(mfu, 2e11, measured) is None
    note = mfu_note(1.3, 2e11, measured)
    assert note.startswith("mfu 130% is above 100%") and "0.2 TFLOP/s per device" in note
    assert f"({measured})" in note and "delete that file" in note and "run.peak_tflops" in note
    sheet = mfu_note(1.01, 989e12, "data sheet: h100 dense bfloat16")
    assert "101%" in sheet and "data sheet: h100" in sheet and "run.peak_tflops" in sheet
    assert "delete" not in sheet and "busy" not in sheet


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_measurement_is_a_positive_rate(dtype):
    # no timing assertion: only that the measurement runs for the dtype and gives a finite rate
    flops = measured_matmul_flops(_cpu(), dtype, sizes=(64, 128), seconds=0.05)
    assert math.isfinite(flops) and flops > 0
