"""nn.scan keeps the compiled train step flat in depth.

Compile time itself is measured by `tools/bench_compile.py` (no timing assertions here):
this checks the cause, deterministically. The optimized program of gpt2-124m (12 layers)
has no more instructions than its 2-layer version (within 10%: fusion decisions differ a
little with the shapes), since one scanned block body serves every layer; an unscanned
4-layer model has more than twice as many, which shows the count can tell them apart.
"""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_compile import compiled_step  # noqa: E402


def instructions(stepper) -> int:
    return len(re.findall(r"^\s+(?:ROOT )?%\S+ = ", stepper._train.as_text(), flags=re.M))


@pytest.mark.slow
def test_gpt2_124m_step_program_does_not_grow_with_depth():
    seconds = {}
    counts = {}
    for layers in (2, 12):
        seconds[layers], stepper = compiled_step(layers)
        counts[layers] = instructions(stepper)
    unscanned = instructions(compiled_step(4, ["model.scan_layers=false"])[1])
    print(f"compile: 2 layers {seconds[2]:.2f}s, 12 layers {seconds[12]:.2f}s; instructions {counts}, "
          f"unscanned 4 layers {unscanned}")
    assert counts[12] <= 1.1 * counts[2], counts
    assert unscanned > 2 * counts[2], (unscanned, counts)
