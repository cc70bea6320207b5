"""lm-evaluation-harness: jaxlm's model class against lm-eval's own `hf` model on the exported checkpoint,
for the three request types, on local task files (offline); `jaxlm eval --task` against the harness;
the `hf` model's arguments docs/export.md gives for each request type, and what goes wrong without them."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_sentiment  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASKS = {
    "local_mc": "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                "doc_to_target: \"{{label}}\"\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n"
                "  - metric: acc_norm\n",
    "local_rolling": "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                     "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                     "  - metric: bits_per_byte\n",
    "local_gen": "output_type: generate_until\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{target}}\"\n"
                 "generation_kwargs:\n  until: [\".\"]\n  max_gen_toks: 12\n  do_sample: false\n"
                 "metric_list:\n  - metric: exact_match\n",
}


@pytest.fixture(scope="module")
def setup(trained_run, tmp_path_factory):
    """(run dir, its export, the task folder, the multiple-choice file)."""
    from jaxlm.cli import main

    root, run_dir = trained_run
    tmp = tmp_path_factory.mktemp("harness")
    assert main(["export", str(run_dir), "--out", str(tmp / "hf")]) == 0
    files = make_sentiment.write(str(tmp / "data"), n_train=1, n_valid=1, n_test=60, seed=3)
    docs = sorted(root.glob("doc*.txt"))
    with open(tmp / "text.jsonl", "w", encoding="utf-8") as f:  # documents of several windows each
        for d in docs:
            f.write(json.dumps({"text": d.read_text(encoding="utf-8")[:1500]}) + "\n")
    with open(tmp / "gen.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            for line in d.read_text(encoding="utf-8").splitlines()[:4]:
                f.write(json.dumps({"context": line[:20], "target": line[20:]}) + "\n")
    data = {"local_mc": files["task"], "local_rolling": tmp / "text.jsonl", "local_gen": tmp / "gen.jsonl"}
    (tmp / "tasks").mkdir()
    for name, body in TASKS.items():
        (tmp / "tasks" / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data[name]}\n"
            f"test_split: test\n{body}", encoding="utf-8")
    return run_dir, tmp / "hf", tmp / "tasks", files["task"]


def _evaluate(model, names, tasks_dir, **kw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=names, task_manager=TaskManager(include_path=str(tasks_dir)),
                                   bootstrap_iters=0, log_samples=True, **kw)


def _lls(res, task):
    return np.array([float(r[0][0]) for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])
                     for r in s["resps"]])


def _hf(hf_dir, tasks_dir, names, extra=""):
    return _evaluate("hf", names, tasks_dir, model_args=f"pretrained={hf_dir},dtype=float32{extra}", device="cpu",
                     batch_size=8)


def test_jaxlm_model_class_equals_lm_eval_hf_on_the_export(setup):
    from jaxlm.harness import JaxlmLM

    run_dir, hf_dir, tasks_dir, _ = setup
    names = ["local_mc", "local_rolling", "local_gen"]
    ours = _evaluate(JaxlmLM(str(run_dir)), names, tasks_dir)
    hf = _hf(hf_dir, tasks_dir, ["local_mc", "local_gen"])  # docs/export.md: defaults for these two
    hf_rolling = _hf(hf_dir, tasks_dir, ["local_rolling"], ",add_bos_token=False")  # and this for rolling
    r, h = ours["results"], {**hf["results"], **hf_rolling["results"]}
    np.testing.assert_allclose(_lls(ours, "local_mc"), _lls(hf, "local_mc"), rtol=1e-4)
    assert r["local_mc"]["acc,none"] == h["local_mc"]["acc,none"]
    assert r["local_mc"]["acc_norm,none"] == h["local_mc"]["acc_norm,none"]
    bpb = r["local_rolling"]["bits_per_byte,none"]
    assert abs(bpb - h["local_rolling"]["bits_per_byte,none"]) <= 1e-4 * bpb
    gen = [s["resps"] for s in sorted(ours["samples"]["local_gen"], key=lambda s: s["doc_id"])]
    assert gen == [s["resps"] for s in sorted(hf["samples"]["local_gen"], key=lambda s: s["doc_id"])]
    assert len({g[0][0] for g in gen}) > 1  # the prompts continue differently

    # each request type with the other type's arguments goes wrong: the docs' split is needed
    wrong_rolling = _hf(hf_dir, tasks_dir, ["local_rolling"])["results"]["local_rolling"]["bits_per_byte,none"]
    assert abs(wrong_rolling - bpb) > 1e-3 * bpb  # an EOS after the prefix EOS shifts every window
    wrong_mc = _hf(hf_dir, tasks_dir, ["local_mc"], ",add_bos_token=False")
    assert np.max(np.abs(_lls(wrong_mc, "local_mc") - _lls(ours, "local_mc"))) > 1e-2  # contexts without EOS


def test_eval_task_and_the_harness_command_agree(setup, tmp_path, capsys):
    from jaxlm.cli import main
    from jaxlm.evaluate import evaluate_task

    run_dir, _, tasks_dir, task_file = setup
    ours = evaluate_task(str(run_dir), task_file, write=False)[0]
    assert main(["harness", str(run_dir), "--tasks", "local_mc", "--include-path", str(tasks_dir),
                 "--output", str(tmp_path / "h.json")]) == 0
    assert "local_mc" in capsys.readouterr().out
    got = json.loads((tmp_path / "h.json").read_text())["results"]["local_mc"]
    assert got["acc,none"] == ours["acc"] and got["acc_norm,none"] == ours["acc_norm"]
    assert ours["examples"] == 60
