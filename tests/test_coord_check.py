"""The µP coordinate check (tools/coord_check.py) at the settings µP is accepted on: widths 64 to 512,
2 layers, head dim 16, Adam, 5 seeds, 10 steps, at a learning rate that trains every width. Under mup
no recorded tensor's scale may grow or shrink with width (|log2 slope per doubling| <= 0.35 at
steps >= 2); under sp the attention and MLP outputs must grow (slope >= +1.0), so the check fails
in both directions: a µP that stopped scaling, or a check that stopped seeing sp's growth. Under
Muon (the spectral rule of docs/mup.md) the check measures what the hidden matrices' updates
contributed (--delta), which sees the rule that mean |x| does not."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import coord_check  # noqa: E402


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    args = coord_check.parser().parse_args(["--widths", "64", "128", "256", "512", "--layers", "2", "--head-dim", "16",
                                            "--steps", "10", "--seeds", "5"])
    return coord_check.run(args)


@pytest.mark.slow
def test_mup_activation_scales_do_not_move_with_width(table):
    slopes = coord_check.later_slopes(table)["mup"]
    assert set(slopes) == {"embedding", "logits"} | {f"block{i}.{n}" for i in (0, 1)
                                                     for n in ("attn_scores", "attn_out", "mlp_out")}
    for name, values in slopes.items():
        assert len(values) == 8, name  # steps 2..9 all measured (no zero scale after the first update)
        assert max(map(abs, values)) <= 0.35, (name, values)


@pytest.mark.slow
def test_sp_attention_and_mlp_outputs_grow_with_width(table):
    slopes = coord_check.later_slopes(table)["sp"]
    for name in (f"block{i}.{n}" for i in (0, 1) for n in ("attn_out", "mlp_out")):
        assert min(slopes[name]) >= 1.0, (name, slopes[name])


@pytest.mark.slow
def test_the_check_runs_at_a_learning_rate_that_trains_every_width(table):
    start = math.log(256)  # a uniform guess over bytes
    for par in ("sp", "mup"):
        for width, loss in table[par]["final_loss"].items():
            assert loss < start - 1.5, (par, width, loss)  # 10 steps from 5.55 nats


@pytest.fixture(scope="module")
def muon_table():
    args = coord_check.parser().parse_args(["--widths", "64", "128", "256", "--layers", "2", "--head-dim", "16",
                                            "--steps", "10", "--seeds", "2", "--optimizer", "muon", "--delta",
                                            "--parametrizations", "mup"])
    return coord_check.run(args)


@pytest.mark.slow
def test_under_muon_the_hidden_matrices_updates_do_not_move_with_width(muon_table):
    """Muon's µP rule (hidden lr x 1/sqrt(m) with the update RMS pinned): what the hidden matrices' updates
    contribute to each block's outputs and to the logits keeps its scale across widths 64 to 256 (|log2 slope|
    <= 0.35 at steps >= 2). Adam's rule, 1/m, makes those contributions shrink (slopes -0.37 to -0.68 by hand:
    docs/mup.md), and mean |x| alone cannot tell the two apart."""
    slopes = coord_check.later_slopes(muon_table)["mup"]
    names = [f"block{i}.{n}" for i in (0, 1) for n in ("attn_out", "mlp_out")] + ["logits"]
    for name in names:
        assert len(slopes[name]) == 8, name
        assert max(map(abs, slopes[name])) <= 0.35, (name, slopes[name])
    start = math.log(256)
    assert all(loss < start - 1.5 for loss in muon_table["mup"]["final_loss"].values())
