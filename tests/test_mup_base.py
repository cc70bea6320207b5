"""tools/mup_base.py's bookkeeping, without training: a pair's score is its best seed-mean loss over the
learning rates (incomplete or diverged cells left out, a best lr at the grid's edge flagged), the best value
is the lowest score, and an --out of other settings is refused rather than mixed in."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import mup_base  # noqa: E402


def _args(*extra):
    return mup_base.parser().parse_args(["--log2-lrs", "-9", "-8", "-7", "--seeds", "2", *extra])


def _runs(cells):
    """{(alpha, embed, lr): [loss of seed 0, loss of seed 1]} -> the tool's runs dict."""
    return {mup_base.key(a, e, lr): [{"seed": s, "valid_loss": v} for s, v in enumerate(losses)]
            for (a, e, lr), losses in cells.items()}


def test_score_takes_the_best_seed_mean_and_flags_the_grid_edge():
    args = _args()
    runs = _runs({(1.0, 1.0, -9): [2.0, 2.2], (1.0, 1.0, -8): [1.9, 2.0], (1.0, 1.0, -7): [2.3, 2.3],
                  (8.0, 1.0, -9): [2.5, 2.5], (8.0, 1.0, -8): [2.0, 2.0], (8.0, 1.0, -7): [1.8, 1.9],
                  (2.0, 1.0, -9): [1.0, None], (2.0, 1.0, -8): [1.7]})  # a diverged seed, a missing seed
    one = mup_base.score(args, runs, 1.0, 1.0)
    assert one["mean"] == pytest.approx([2.1, 1.95, 2.3]) and one["best_log2_lr"] == -8 and not one["at_edge"]
    eight = mup_base.score(args, runs, 8.0, 1.0)
    assert eight["best_loss"] == pytest.approx(1.85) and eight["at_edge"]
    two = mup_base.score(args, runs, 2.0, 1.0)
    assert two["mean"] == [None, None, None] and two["best_loss"] is None
    assert mup_base.best({1.0: one, 8.0: eight, 2.0: two}) == 8.0
    with pytest.raises(SystemExit, match="every run diverged"):
        mup_base.best({2.0: two})


def test_an_out_file_of_other_settings_is_refused(tmp_path):
    out = tmp_path / "base.json"
    args = _args("--out", str(out))
    out.write_text(json.dumps({"settings": dict(vars(args), steps=999), "runs": {}}))
    with pytest.raises(SystemExit, match="other settings \\(steps\\)"):
        mup_base.load(args)
    out.write_text(json.dumps({"settings": dict(vars(args), log2_lrs=[-10], output_mult=8.0), "runs": {"x": []}}))
    assert mup_base.load(args) == {"x": []}  # the grid's own lists may grow between runs


def test_init_std_reaches_the_model_and_an_older_file_without_it_means_the_default(tmp_path):
    import lr_transfer

    args = _args("--init-std", "0.04")
    assert lr_transfer.config(args, "mup", 128, 1e-3).model.init_std == 0.04
    out = tmp_path / "base.json"
    older = {k: v for k, v in vars(_args("--out", str(out))).items() if k != "init_std"}
    out.write_text(json.dumps({"settings": older, "runs": {"x": []}}))
    assert mup_base.load(_args("--out", str(out))) == {"x": []}  # written at the default, 0.02
    with pytest.raises(SystemExit, match="other settings \\(init_std\\)"):
        mup_base.load(_args("--out", str(out), "--init-std", "0.04"))


def test_the_three_stages_choose_each_best_and_an_interrupted_search_resumes(tmp_path, monkeypatch, capsys):
    """The search with lr_transfer's training replaced by a loss that is lowest at alpha_out 4, embedding
    x1 and init std 0.01, at lr 2^-8: each stage picks its coordinate's best, init cells other than
    --init-std are stored under their own key, and a second call trains nothing it already has."""
    import lr_transfer

    calls = []

    def one_run(args, parametrization, width, lr, batches, valid):
        calls.append((args.output_mult, args.embed_lr_mult, args.init_std, lr))
        loss = (abs(args.output_mult - 4) + abs(args.embed_lr_mult - 1) + 100 * abs(args.init_std - 0.01)
                + abs(lr - 2.0 ** -8) * 100)
        return {"train_loss": loss, "valid_loss": 2.0 + loss}

    monkeypatch.setattr(lr_transfer, "one_run", one_run)
    monkeypatch.setattr(lr_transfer, "corpus", lambda: np.zeros(1000, np.int32))
    monkeypatch.setattr(lr_transfer, "valid_batches", lambda args, held: [])
    monkeypatch.setattr(lr_transfer, "seed_batches", lambda args, train, seeds: {s: [] for s in seeds})
    out = tmp_path / "base.json"
    argv = ["mup_base.py", "--output-mults", "1", "4", "8", "--embed-lr-mults", "0.25", "4", "--init-stds", "0.01",
            "0.04", "--log2-lrs", "-9", "-8", "-7", "--seeds", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    mup_base.main()
    saved = json.loads(out.read_text())
    assert saved["chosen"]["mup_output_mult"] == 4 and saved["chosen"]["mup_embed_lr_mult"] == 1
    assert saved["chosen"]["init_std"] == 0.01 and saved["chosen"]["best_log2_lr"] == -8
    assert "4/1/-8/init0.01" in saved["runs"] and "4/1/-8" in saved["runs"]  # 0.02, the file's own, has no suffix
    assert len(calls) == 3 * 2 * (3 + 2 + 2)  # lrs x seeds x (alphas + other embeds + other inits)
    assert {c[2] for c in calls} == {0.02, 0.01, 0.04} and saved["settings"]["init_std"] == 0.02
    assert "model.init_std=0.01" in capsys.readouterr().out
    calls.clear()
    mup_base.main()
    assert calls == []
