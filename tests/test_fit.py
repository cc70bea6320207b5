"""jaxlm fit: scaling-law fits (approach 3 and 2) on Epoch's Chinchilla points and on synthetic sweeps,
the predictions, the errors, and the sweep figures."""

import argparse
import csv
import json
import math

import matplotlib.image
import numpy as np
import pytest

from jaxlm import cli
from jaxlm.scaling import bootstrap, fitting, law, lbfgs, report
from jaxlm.scaling import plot as fit_plot
from jaxlm.scaling.points import load_source
from jaxlm.scaling.results import RESULT_COLUMNS
from jaxlm.errors import ConfigError

from conftest import shared_data

# The synthetic law: losses from ~6.4 (N = 1e4, D = 1e6) down to ~2.3, like small language models.
TRUE = {"E": 1.7, "A": 60.0, "B": 100.0, "alpha": 0.34, "beta": 0.28}
TRUE_X = np.array([math.log(TRUE["A"]), math.log(TRUE["B"]), math.log(TRUE["E"]), TRUE["alpha"], TRUE["beta"]])
TRUE_A = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])


def law_loss(n, d):
    return TRUE["E"] + TRUE["A"] / np.asarray(n) ** TRUE["alpha"] + TRUE["B"] / np.asarray(d) ** TRUE["beta"]


def run_row(name, size, n, d, loss, seed=0, status="done", holdout=0, isoflop_c="", budget=""):
    """One results.csv row of a synthetic run; N counts differ by convention, n_total = n."""
    return {"name": name, "size": size, "n_total": n, "n_non_embedding": 0.8 * n, "n_embedding": 0.2 * n,
            "n_head": 0.01 * n, "n_matmul": 0.9 * n, "tokens": d, "steps": d / 4096, "c_6N": 6 * n * d,
            "c_6N+attn": 6.3 * n * d, "c_palm": 6.6 * 0.9 * n * d, "loss": loss, "loss_lo": 0.99 * loss,
            "loss_hi": 1.01 * loss, "bpb": loss / math.log(2) / 4, "bpb_lo": "", "bpb_hi": "", "lr": 1e-3,
            "seed": seed, "budget": budget, "isoflop_c": isoflop_c, "holdout": holdout, "wall_s": 1.0,
            "status": status}


def write_results(directory, rows, columns=RESULT_COLUMNS):
    """A sweep's results.csv in `directory`; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return directory


def grid_rows(sizes, tokens, seeds=2, noise=0.01, seed=0):
    """Runs on a sizes x tokens grid, `seeds` seeds each, loss = law x (1 + noise z)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(sizes):
        for j, d in enumerate(tokens):
            for s in range(seeds):
                loss = float(law_loss(n, d) * (1 + noise * rng.standard_normal()))
                rows.append(run_row(f"s{i}-b{j}-seed{s}", f"s{i}", n, d, loss, seed=s, budget=f"b{j}"))
    return rows


def isoflop_rows(budgets, factors, seeds=2, noise=0.01, seed=0):
    """IsoFLOP runs: for each budget C, sizes N = N_opt(C) x factors (one array, or a list of one per
    budget), D = C / (6N)."""
    rng = np.random.default_rng(seed)
    n_opt = law.optimum(TRUE_X, budgets)[0][0]
    rows = []
    for j, (c, centre) in enumerate(zip(budgets, n_opt)):
        for i, f in enumerate(factors[j] if isinstance(factors, list) else factors):
            n = centre * f
            d = c / (6 * n)
            for s in range(seeds):
                loss = float(law_loss(n, d) * (1 + noise * rng.standard_normal()))
                rows.append(run_row(f"c{j}-n{i}-seed{s}", f"c{j}-n{i}", n, d, loss, seed=s, isoflop_c=c,
                                    budget=f"{c:.0e}"))
    return rows


def parse(argv):
    parser = argparse.ArgumentParser()
    fitting.add_arguments(parser)
    return parser.parse_args(argv)


def coarse_starts():
    """108 of the 4500 grid starts (a, b in {0, 10, 20}, e in {-1, 0, 1}, alpha, beta in {0.5, 1.5}): the
    batched synthetic tests fit 20 data sets at once; on seed 0 this grid finds the full grid's optimum."""
    g = law.grid_starts()
    keep = (np.isin(g[:, 0], [0, 10, 20]) & np.isin(g[:, 1], [0, 10, 20]) & np.isin(g[:, 2], [-1, 0, 1])
            & np.isin(g[:, 3], [0.5, 1.5]) & np.isin(g[:, 4], [0.5, 1.5]))
    return g[keep]


def synthetic_sets(sizes, tokens, seeds=2, noise=0.01, sets=20):
    rows = [grid_rows(sizes, tokens, seeds, noise, seed=s) for s in range(sets)]
    return tuple(np.array([[r[k] for r in rs] for rs in rows], np.float64) for k in ("n_total", "tokens", "loss"))


# ------------------------------------------------------------------------------------------ optimizer


def test_the_gradient_is_the_objectives_and_the_batched_lbfgs_agrees_with_scipy():
    from scipy.optimize import minimize

    n, d, loss = (v[0] for v in synthetic_sets(np.geomspace(1e5, 2e6, 4), np.geomspace(1e6, 5e7, 3), sets=1))
    data = (np.log(n), np.log(d), np.log(loss))
    rng = np.random.default_rng(0)
    x = TRUE_X + rng.normal(0, 0.1, size=(4, 5))
    f, g = lbfgs.huber_objective(x, *data)
    eps = 1e-6
    for k in range(5):
        step = np.zeros(5)
        step[k] = eps
        fd = (lbfgs.huber_objective(x + step, *data, grad=False)
              - lbfgs.huber_objective(x - step, *data, grad=False)) / (2 * eps)
        np.testing.assert_allclose(g[:, k], fd, rtol=1e-5, atol=1e-9)
    weights = rng.integers(0, 3, size=(4, len(n))).astype(float)
    fw = lbfgs.huber_objective(x, *data, weights, grad=False)
    np.testing.assert_allclose(fw, [lbfgs.huber_objective(x[i:i + 1], *data, weights[i], grad=False)[0]
                                    for i in range(4)])
    x_end, f_end, _ = lbfgs.minimize_batch(x, *data)
    for i in range(4):
        res = minimize(lambda t: tuple(v[0] for v in lbfgs.huber_objective(t[None], *data)), x[i], jac=True,
                       method="L-BFGS-B", options={"ftol": 1e-13, "gtol": 1e-12, "maxiter": 2000})
        assert f_end[i] <= res.fun * (1 + 1e-6) + 1e-12, (i, f_end[i], res.fun)


def test_a_coarse_grid_of_starts_finds_the_full_grids_optimum_on_synthetic_points():
    n, d, loss = (v[0] for v in synthetic_sets(np.geomspace(1e5, 2e6, 4), np.geomspace(1e6, 5e7, 3), sets=1))
    full = law.fit_law(n, d, loss)
    coarse = law.fit_law(n, d, loss, starts=coarse_starts())
    assert full.starts == 4500 and 1 <= full.starts_at_best <= 4500
    assert coarse.objective == pytest.approx(full.objective, rel=1e-6)
    np.testing.assert_allclose(coarse.x, full.x, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------- Chinchilla (Epoch)


@pytest.fixture(scope="module")
def chinchilla_fit(tmp_path_factory):
    """Epoch's 245 points less the 5 highest losses, fitted through `jaxlm fit` (20 bootstrap samples)."""
    path = shared_data("chinchilla-epoch/svg_extracted_data.csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 245
    rows = sorted(rows, key=lambda r: float(r["loss"]))[:-5]
    out = tmp_path_factory.mktemp("chinchilla")
    points = out / "points.csv"
    with open(points, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    args = parse([str(points), "--n-col", "Model Size", "--c-col", "Training FLOP", "--loss-col", "loss",
                  "--bootstrap", "20", "--budget", "5.76e23"])
    assert cli._fit(args) == 0
    return json.loads((out / "fit.json").read_text(encoding="utf-8"))


def test_chinchilla_points_give_epochs_fit(chinchilla_fit, capsys):
    r = chinchilla_fit
    assert r["points"] == 240 and r["convention"] == "columns"
    assert r["E"]["value"] == pytest.approx(1.817, abs=0.01)
    assert r["alpha"]["value"] == pytest.approx(0.348, abs=0.005)
    assert r["beta"]["value"] == pytest.approx(0.366, abs=0.01)
    assert r["a"]["value"] == pytest.approx(0.513, abs=0.01)
    for key in ("E", "alpha", "beta", "a", "A", "B"):
        lo, hi = r[key]["ci95"]
        assert lo < r[key]["value"] < hi, key
    assert r["A"]["weakly_identified"] and r["B"]["weakly_identified"]
    assert r["starts"]["count"] == 4500 and 1 <= r["starts"]["reached_best"] <= 4500
    assert set(r["starts"]["best_start"]) == {"a", "b", "e", "alpha", "beta"}
    (budget,) = r["budgets"]  # Chinchilla's own budget: about 70B parameters and 1.4T tokens
    assert 4e10 < budget["N_opt"]["value"] < 1.2e11 and budget["loss"]["value"] == pytest.approx(1.97, abs=0.03)
    assert budget["N_opt"]["value"] * budget["D_opt"]["value"] * 6 == pytest.approx(5.76e23)


# ----------------------------------------------------------------------------------- synthetic sweeps


def test_on_a_sweep_sized_grid_the_bootstrap_intervals_cover_the_truth():
    """4 sizes x 3 token budgets x 2 seeds, 1% noise, 20 data sets: the 95% intervals of alpha and beta
    cover the truth in >= 17 of 20 and the estimates centre on it. One data set cannot pin alpha to
    +-0.03 here (its Cramer-Rao standard error is ~0.077 at 1% noise; docs/scaling.md)."""
    n, d, loss = synthetic_sets(np.geomspace(1e5, 2e6, 4), np.geomspace(1e6, 5e7, 3))
    fits = law.fit_laws(n, d, loss, starts=coarse_starts())
    boot = bootstrap.bootstrap_laws(n, d, loss, fits, samples=60, seed=0)
    est = {k: np.array([law.params(f.x)[k] for f in fits]) for k in ("alpha", "beta")}
    for k in ("alpha", "beta"):
        covered = sum(lo <= TRUE[k] <= hi for lo, hi in
                      (bootstrap.ci95(b[:, 3 if k == "alpha" else 4]) for b in boot))
        assert covered >= 17, (k, covered)
        assert abs(np.median(est[k]) - TRUE[k]) < 0.03, (k, np.median(est[k]))


def test_a_wider_sweep_recovers_alpha_and_beta_within_003():
    """6 sizes over 3 decades (1e4..1e7) x 6 token budgets (1e6..1e9) x 2 seeds, 1% noise: every one of
    20 data sets gives alpha and beta within 0.03 (Cramer-Rao standard errors ~0.008 and ~0.010)."""
    n, d, loss = synthetic_sets(np.geomspace(1e4, 1e7, 6), np.geomspace(1e6, 1e9, 6))
    fits = law.fit_laws(n, d, loss, starts=coarse_starts())
    for k, i in (("alpha", 3), ("beta", 4)):
        errors = np.array([f.x[i] for f in fits]) - TRUE[k]
        assert np.abs(errors).max() < 0.03, (k, errors.round(3))


def test_isoflop_profiles_give_the_exponent_and_an_edge_budget_is_refused(tmp_path, capsys):
    budgets = [1e15, 1e16, 1e17, 1e18]
    centred = isoflop_rows(budgets, np.geomspace(1 / 8, 8, 7), noise=0.005)
    edge = isoflop_rows([3e16], [np.geomspace(1 / 64, 1 / 2, 5)], noise=0.005, seed=1)
    edge = [dict(r, name="e" + r["name"], size="e" + r["size"]) for r in edge]
    sweep = write_results(tmp_path / "iso", centred + edge)
    assert cli._fit(parse([str(sweep), "--bootstrap", "50"])) == 0
    out = capsys.readouterr().out
    r = json.loads((sweep / "fit.json").read_text(encoding="utf-8"))
    iso = r["isoflop"]
    assert iso["a"]["value"] == pytest.approx(TRUE_A, abs=0.03)
    lo, hi = iso["a"]["ci95"]
    assert lo < TRUE_A < hi and hi - lo < 0.15
    refused = [b for b in iso["budgets"] if not b["used"]]
    assert [b["C"] for b in refused] == [3e16] and "C = 3e+16" in refused[0]["reason"]
    assert "outside the range of its sizes" in refused[0]["reason"] and "add larger models" in refused[0]["reason"]
    assert "refused budget C = 3e+16" in out
    for b in iso["budgets"]:
        if b["used"]:
            assert b["N_opt"] == pytest.approx(law.optimum(TRUE_X, [b["C"]])[0][0, 0], rel=0.25)
    assert r["a"]["value"] == pytest.approx(TRUE_A, abs=0.05)  # approach 3 on the same runs
    only_two = write_results(tmp_path / "two", [row for row in centred if row["size"].endswith(("n0", "n1"))]
                             + grid_rows([1e5, 3e5, 1e6], [1e6, 1e7, 1e8]))
    r2 = fitting.fit(load_source(str(only_two)), bootstrap=0)
    assert r2["isoflop"]["a"] is None and all("a parabola needs 3" in b["reason"] for b in r2["isoflop"]["budgets"])


def test_holdout_and_budget_predictions(tmp_path, capsys):
    rows = grid_rows(np.geomspace(1e4, 1e7, 5), np.geomspace(1e6, 1e9, 4), noise=0.003)
    for row in rows:
        if row["name"].startswith("s2-b1-"):
            row["holdout"] = 1
    rows[5]["status"], rows[7]["status"] = "diverged", "failed"
    sweep = write_results(tmp_path / "sweep", rows)
    out_dir = tmp_path / "out"
    args = parse([str(sweep), "--holdout", "s4", "--budget", "1e17", "--budget", "3e18", "--bootstrap", "60",
                  "--out", str(out_dir)])
    assert cli._fit(args) == 0
    text = capsys.readouterr().out
    assert f"excluded 1 diverged run: {rows[5]['name']}; 1 failed run: {rows[7]['name']}" in text
    r = json.loads((out_dir / "fit.json").read_text(encoding="utf-8"))
    assert r["points"] == len(rows) - 2 - 8 - 2 and r["excluded"][0] == {"name": rows[5]["name"], "status": "diverged"}
    held = {(h["size"], round(h["D"])): h for h in r["holdout"]}
    assert len(held) == 5 and all(h["seeds"] == 2 for h in held.values())  # s4 x 4 budgets, and s2-b1
    for h in held.values():
        truth = float(law_loss(h["N"], h["D"]))
        assert h["predicted"] == pytest.approx(truth, rel=0.01)
        assert h["relative_error"] == pytest.approx((h["predicted"] - h["measured"]) / h["measured"])
        lo, hi = h["ci95"]
        assert lo < h["predicted"] < hi and h["inside"] == (lo <= h["measured"] <= hi)
    assert sum(h["inside"] for h in held.values()) >= 4
    for b in r["budgets"]:
        n_true, d_true, l_true = (v[0, 0] for v in law.optimum(TRUE_X, [b["C"]]))
        assert b["N_opt"]["value"] == pytest.approx(n_true, rel=0.15)
        assert b["D_opt"]["value"] == pytest.approx(d_true, rel=0.15)
        assert b["loss"]["value"] == pytest.approx(l_true, rel=0.01)
        lo, hi = b["N_opt"]["ci95"]
        assert lo < b["N_opt"]["value"] < hi
        assert b["N_opt"]["value"] * b["D_opt"]["value"] * 6 == pytest.approx(b["C"])
    assert "held out" in text and "compute-optimal" in text


def test_seconds_turn_each_sizes_measured_speed_into_tokens_and_pick_the_best(tmp_path, capsys):
    sizes = np.geomspace(1e4, 1e7, 5)
    rows = grid_rows(sizes, np.geomspace(1e6, 1e9, 4), noise=0.003)
    rate = {f"s{i}": 3e11 / n for i, n in enumerate(sizes)}  # tokens per second, slower for larger N
    for row in rows:
        row["wall_s"], row["kind"] = row["tokens"] / rate[row["size"]], "straight"
    rows[0]["kind"], rows[0]["wall_s"] = "branch", 1.0  # a branch's wall time is its cooldown only: ignored
    sweep = write_results(tmp_path / "sweep", rows, columns=RESULT_COLUMNS)
    seconds = 3000.0
    assert cli._fit(parse([str(sweep), "--seconds", str(seconds), "--bootstrap", "40"])) == 0
    text = capsys.readouterr().out
    tb = json.loads((sweep / "fit.json").read_text(encoding="utf-8"))["time_budget"]
    assert tb["seconds"] == seconds and [r["size"] for r in tb["sizes"]] == list(rate)
    truth = {}
    for r in tb["sizes"]:
        assert r["tokens_per_s"] == pytest.approx(rate[r["size"]])
        assert r["D"] == pytest.approx(seconds * rate[r["size"]])
        truth[r["size"]] = float(law_loss(r["N"], r["D"]))
        assert r["loss"] == pytest.approx(truth[r["size"]], rel=0.01)
        assert r["ci95"][0] < r["loss"] < r["ci95"][1]
        assert r["bpb"] == pytest.approx(r["loss"] / math.log(2) / 4)
        assert r["beyond_grid"] == (r["D"] > 1.05e9)
    assert tb["best"] == min(truth, key=truth.get) == min(tb["sizes"], key=lambda r: r["loss"])["size"]
    assert f"best in {seconds:g} s: {tb['best']}" in text
    points = tmp_path / "points.csv"
    points.write_text("n,d,loss\n" + "".join(f"{r['n_total']},{r['tokens']},{r['loss']}\n" for r in rows))
    with pytest.raises(ConfigError, match="--seconds needs a sweep's results.csv"):
        cli._fit(parse([str(points), "--n-col", "n", "--d-col", "d", "--loss-col", "loss", "--seconds", "60"]))
    with pytest.raises(ConfigError, match="--seconds -1"):
        cli._fit(parse([str(sweep), "--seconds", "-1"]))


def test_the_closed_form_optimum_is_the_numeric_minimum():
    from scipy.optimize import minimize_scalar

    for c in (1e15, 1e18, 5.76e23):
        for k in (6.0, 7.3):
            n, d, loss = (float(v[0, 0]) for v in law.optimum(TRUE_X, [c], k))
            res = minimize_scalar(lambda u: float(law_loss(math.exp(u), c / (k * math.exp(u)))),
                                  bounds=(0, 60), method="bounded", options={"xatol": 1e-10})
            assert math.log(n) == pytest.approx(res.x, abs=1e-4) and loss == pytest.approx(res.fun, rel=1e-9)
            assert k * n * d == pytest.approx(c)


def test_a_bootstrap_sample_with_an_unbounded_coefficient_gives_an_infinite_bound():
    from jaxlm.scaling import bootstrap, law

    p = law.params([800.0, 5.0, 0.5, 0.3, 0.3])  # log A = 800: A overflows a float
    assert p["A"] == float("inf") and p["B"] == pytest.approx(np.exp(5.0)) and p["a"] == pytest.approx(0.5)
    lo, hi = bootstrap.ci95([1.0, 2.0, 3.0] * 10 + [float("inf")] * 10)
    assert lo == 1.0 and hi == float("inf")  # kept, not dropped (dropping would narrow the interval)


def test_conventions_pick_n_and_c(tmp_path):
    sweep = write_results(tmp_path / "s", grid_rows(np.geomspace(1e4, 1e7, 4), np.geomspace(1e6, 1e9, 3)))
    total = load_source(str(sweep))
    assert total.convention == "total" and np.allclose(total.c, 6 * total.n * total.d)
    non_emb = load_source(str(sweep), "non_embedding")
    np.testing.assert_allclose(non_emb.n, 0.8 * total.n)
    palm = load_source(str(sweep), "palm")
    np.testing.assert_allclose(palm.n, 0.9 * total.n)
    assert palm.k == pytest.approx(6.6) and "median" in palm.k_note
    np.testing.assert_allclose(palm.c, 6.6 * palm.n * palm.d)


def test_bad_inputs_say_what_to_change(tmp_path):
    with pytest.raises(ConfigError, match="has no results.csv"):
        load_source(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_source(str(tmp_path / "nope.csv"), n_col="N", loss_col="L", d_col="D")
    rows = grid_rows([1e5, 3e5, 1e6], [1e6, 1e7, 1e8])
    sweep = write_results(tmp_path / "no_tokens", rows, [c for c in RESULT_COLUMNS if c != "tokens"])
    with pytest.raises(ConfigError, match=r"no column 'tokens'.*its columns are: 'name', 'size'"):
        load_source(str(sweep))
    with pytest.raises(ConfigError, match=r"no column 'c_palm' \(needed by --convention palm\)"):
        no_palm = [c for c in RESULT_COLUMNS if c != "c_palm"]
        load_source(str(write_results(tmp_path / "nopalm", rows, no_palm)), "palm")
    csv_path = tmp_path / "points.csv"
    csv_path.write_text("N,D,loss\n1e5,1e6,3.0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"no column 'tokens_seen'.*its columns are: 'N', 'D', 'loss'"):
        load_source(str(csv_path), n_col="N", loss_col="loss", d_col="tokens_seen")
    with pytest.raises(ConfigError, match="exactly one of --d-col"):
        load_source(str(csv_path), n_col="N", loss_col="loss")
    with pytest.raises(ConfigError, match="not a sweep's results.csv"):
        load_source(str(csv_path))
    with pytest.raises(ConfigError, match="--convention and --holdout apply to a sweep"):
        load_source(str(csv_path), "total", n_col="N", loss_col="loss", d_col="D")
    with pytest.raises(ConfigError, match=r"1 fitted points with 1 distinct N and 1 distinct D"):
        fitting.fit(load_source(str(csv_path), n_col="N", loss_col="loss", d_col="D"))
    bad = [dict(r) for r in rows]
    bad[4]["tokens"] = 0
    with pytest.raises(ConfigError, match=rf"line 6 \({bad[4]['name']}\): column 'tokens' is 0; .* must be positive"):
        load_source(str(write_results(tmp_path / "zero", bad)))
    bad[4]["tokens"] = "lots"
    with pytest.raises(ConfigError, match="column 'tokens' is 'lots', not a number"):
        load_source(str(write_results(tmp_path / "word", bad)))
    ok = write_results(tmp_path / "ok", rows)
    with pytest.raises(ConfigError, match=r"--holdout s9: no such size .* its sizes are s0, s1, s2"):
        load_source(str(ok), holdout_sizes=["s9"])
    with pytest.raises(ConfigError, match=r"2 distinct N .* at least 5 points, 3 distinct N"):
        fitting.fit(load_source(str(ok), holdout_sizes=["s2"]))
    with pytest.raises(ConfigError, match="--budget -1"):
        fitting.fit(load_source(str(ok)), budgets=[-1.0])
    # a diverged run's empty loss is not read; it is reported
    diverged = [dict(r) for r in rows]
    diverged[0].update(status="diverged", loss="")
    r = fitting.fit(load_source(str(write_results(tmp_path / "div", diverged))), bootstrap=0)
    assert r["excluded"] == [{"name": rows[0]["name"], "status": "diverged"}] and r["points"] == len(rows) - 1


# ---------------------------------------------------------------------------------------------- plots


def _assert_pngs(paths, out_dir):
    assert [p.split("/")[-1] for p in paths] == list(fit_plot.FIGURES)
    for p in paths:
        assert p.startswith(str(out_dir))
        img = matplotlib.image.imread(p)
        assert img.shape[0] >= 400 and img.shape[1] >= 600 and img[..., :3].std() > 0.05, p  # drawn, not blank


def test_plot_sweep_draws_a_grid_sweep_and_reuses_its_fit_json(tmp_path, monkeypatch):
    rows = grid_rows(np.geomspace(1e4, 1e7, 4), np.geomspace(1e6, 1e9, 3), noise=0.005)
    sweep = write_results(tmp_path / "sweep", rows)
    assert cli._fit(parse([str(sweep), "--holdout", "s3", "--bootstrap", "0", "--plot"])) == 0
    _assert_pngs(sorted((str(p) for p in (sweep / "plots").glob("*.png")),
                        key=lambda p: fit_plot.FIGURES.index(p.split("/")[-1])), sweep / "plots")

    def no_refit(*args, **kwargs):
        raise AssertionError("plot_sweep refitted although fit.json matches")

    monkeypatch.setattr(fitting, "fit", no_refit)
    out = tmp_path / "again"
    _assert_pngs(fit_plot.plot_sweep(str(sweep), str(out)), out)
    assert fit_plot._saved_fit(str(sweep / "results.csv"), str(out)) is not None
    rows[0]["loss"] *= 1.01  # other data: fit.json no longer matches, so plot_sweep would fit
    write_results(sweep, rows)
    assert fit_plot._saved_fit(str(sweep / "results.csv"), str(out)) is None


def test_a_law_whose_coefficient_overflows_is_still_drawn(tmp_path):
    rows = grid_rows(np.geomspace(1e4, 1e7, 4), np.geomspace(1e6, 1e9, 3), noise=0.003)
    sweep = write_results(tmp_path / "sweep", rows)
    result = fitting.fit(load_source(str(sweep)), bootstrap=0)
    assert [result["law_log"][k] for k in law.PARAM_NAMES] == pytest.approx(list(fit_plot._law_x(result)))
    # a degenerate fit (alpha in the hundreds) stores A = exp(a) as null: the plot uses law_log
    degenerate = json.loads(json.dumps(report._jsonable(result)))
    degenerate["law"]["A"] = None
    degenerate["law_log"].update(a=2000.0, alpha=300.0)
    x = fit_plot._law_x(degenerate)
    assert np.all(np.isfinite(x)) and np.all(np.isfinite(law.log_loss(x, [1e5], [1e7])))
    del degenerate["law_log"]  # a fit.json written before law_log: an infinite A, no crash
    assert fit_plot._law_x(degenerate)[0] == np.inf
    _assert_pngs(fit_plot.plot_sweep(str(sweep), str(tmp_path / "plots"), result), tmp_path / "plots")


def test_plot_sweep_draws_isoflop_profiles(tmp_path):
    rows = isoflop_rows([1e15, 1e16, 1e17], np.geomspace(1 / 8, 8, 5), noise=0.005)
    sweep = write_results(tmp_path / "iso", rows)
    result = fitting.fit(load_source(str(sweep)), bootstrap=0)
    assert result["isoflop"]["a"] is not None
    _assert_pngs(fit_plot.plot_sweep(str(sweep), str(tmp_path / "plots"), result), tmp_path / "plots")


def test_accuracy_sigmoid_recovers_its_parameters_and_predicts_a_held_out_size(tmp_path, capsys):
    """acc = 0.25 + 0.7 / (1 + exp(6 (L - 3.2))) measured on 400 examples per run (binomial noise): the fit finds
    L0 and k, and the held-out size's accuracy, chained through the law's loss prediction, is inside its interval."""
    from jaxlm.scaling.accuracy import sigmoid

    rng = np.random.default_rng(0)
    rows = grid_rows(np.geomspace(3e4, 3e6, 5), np.geomspace(2e6, 2e8, 4), seeds=2, noise=0.005)
    for r in rows:
        p = float(sigmoid(r["loss"], 0.25, 0.7, 6.0, 3.2))
        r.update(acc=rng.binomial(400, p) / 400, acc_norm=p, chance=0.25)
    rows[-1]["size"] = rows[-2]["size"]  # the largest size's runs, held out below
    sweep = write_results(tmp_path / "scored", rows)
    args = parse([str(sweep), "--holdout", "s4", "--bootstrap", "100", "--accuracy", "acc"])
    _, result, _ = fitting.command(args)
    acc = result["accuracy"]
    assert abs(acc["L0"] - 3.2) < 0.1 and abs(acc["k"] - 6.0) < 2.5 and abs(acc["a"] - 0.7) < 0.1
    assert acc["rmse"] < 0.05 and acc["runs"] == sum(r["size"] != "s4" for r in rows)
    held = acc["held_out"]
    assert len(held) == 4 and all(h["size"] == "s4" for h in held)  # one per token budget of the size
    truth = [float(sigmoid(h["measured_loss"], 0.25, 0.7, 6.0, 3.2)) for h in held]
    assert all(abs(h["from_law"]["acc"] - t) < 0.05 and abs(h["from_loss"]["acc"] - t) < 0.05
               for h, t in zip(held, truth)), held
    # measured with binomial noise on 800 examples; 95% intervals: most of the four are inside
    assert sum(h["from_law"]["inside"] for h in held) >= 3 and sum(h["from_loss"]["inside"] for h in held) >= 3
    assert all(h["from_law"]["ci95"][1] - h["from_law"]["ci95"][0] < 0.2 for h in held)
    assert max(h["from_law"]["acc"] for h in held) - min(h["from_law"]["acc"] for h in held) > 0.4
    assert "held out s4: predicted acc" in capsys.readouterr().out
    saved = json.loads((sweep / "fit.json").read_text())
    assert saved["accuracy"]["L0"] == pytest.approx(acc["L0"])


def test_accuracy_fit_needs_a_task_scored_sweep(tmp_path):
    from jaxlm.errors import ConfigError

    sweep = write_results(tmp_path / "plain", grid_rows(np.geomspace(3e4, 3e6, 4), np.geomspace(2e6, 2e8, 3)))
    with pytest.raises(ConfigError, match="sweep eval SWEEP_DIR --task"):
        fitting.command(parse([str(sweep), "--bootstrap", "0", "--accuracy", "acc"]))
