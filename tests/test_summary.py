"""run_summary.json: parameter counts against the real parameter tree, FLOPs against closed forms."""

import json

import jax
import numpy as np
import pytest

from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.inference import open_checkpoints
from jaxlm.metrics import read_metrics

from test_resume import _args

GPT2_TIED = ["model.family=gpt2", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
             "model.max_seq_len=64"]
LLAMA_GQA_UNTIED = ["model.family=llama", "model.d_model=32", "model.n_layers=3", "model.n_heads=4",
                    "model.n_kv_heads=2", "model.d_ff=96", "model.tie_embeddings=false", "model.max_seq_len=64"]


def _closed_form(family: str, V: int, D: int, L: int, N: int, K: int, F: int, T_max: int, T: int) -> dict:
    """Parameter counts and FLOPs per token written out by hand for the two families."""
    H = D // N
    if family == "gpt2":  # biases everywhere, LayerNorm scale + bias, learned positions, tied head
        layer = (3 * (D * D + D)) + (D * D + D) + (D * F + F) + (F * D + D) + 2 * (2 * D)
        embedding, head_params, final_norm = V * D + T_max * D, 0, 2 * D
    else:  # no biases, RMSNorm scale only, RoPE, untied head
        layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F + 2 * D
        embedding, head_params, final_norm = V * D, D * V, D
    non_embedding = L * layer + final_norm + head_params
    matmul = non_embedding + (V * D if family == "gpt2" else 0)
    six_n = 6 * matmul
    return {"params": {"total": embedding + non_embedding, "embedding": embedding, "non_embedding": non_embedding,
                       "head": V * D, "matmul": matmul},
            "flops": {"6N": six_n, "6N+attn": six_n + 6 * L * T * D, "palm": six_n + 12 * L * N * H * T}}


@pytest.mark.parametrize("family,model", [("gpt2", GPT2_TIED), ("llama", LLAMA_GQA_UNTIED)], ids=["gpt2-tied",
                                                                                               "llama-gqa-untied"])
def test_run_summary_counts_match_the_parameter_tree_and_closed_forms(tmp_path, small_corpus, family, model):
    run_dir = tmp_path / family
    assert main(_args(small_corpus, run_dir, 4, "checkpoint.every=0", *model)) == 0
    summary = json.loads((run_dir / "run_summary.json").read_text())
    cfg = load_config(str(run_dir / "config.yaml"))
    m = cfg.model
    V = load_tokenizer(str(run_dir / "tokenizer.model")).vocab_size  # 320: already a multiple of 64
    F = 4 * m.d_model if family == "gpt2" else 96  # gpt2's rule; llama's d_ff is set above
    want = _closed_form(family, V, m.d_model, m.n_layers, m.n_heads, m.kv_heads, F, m.max_seq_len, cfg.train.seq_len)
    assert summary["params"] == want["params"]
    assert summary["flops_per_token"] == pytest.approx(want["flops"], rel=1e-12)
    # the real parameter tree of the checkpoint
    opened = open_checkpoints(str(run_dir), devices=jax.devices()[:1])
    leaves = jax.tree_util.tree_leaves_with_path(opened.target)
    assert summary["params"]["total"] == sum(int(np.prod(x.shape)) for _, x in leaves)
    embed = [x for p, x in leaves if "embed" in jax.tree_util.keystr(p)]
    assert summary["params"]["embedding"] == sum(int(np.prod(x.shape)) for x in embed)
    heads = [x for p, x in leaves if jax.tree_util.keystr(p).startswith("['head']")]
    assert (len(heads) == 0) == (family == "gpt2")  # tied: no separate head array
    # progress, status and the evaluation numbers of the last record
    assert summary["status"] == "done" and summary["steps"] == 4 and summary["tokens"] == 4 * 8 * 32
    assert summary["training_flops"]["6N"] == pytest.approx(want["flops"]["6N"] * summary["tokens"])
    last_eval = [r for r in read_metrics(str(run_dir)) if "eval_loss" in r][-1]
    assert summary["last_eval"]["loss"] == last_eval["eval_loss"]
    assert summary["last_eval"]["bpb_ci95"] == last_eval["eval_bpb_ci95"]
    assert summary["best_eval"]["loss"] <= summary["last_eval"]["loss"]
    assert 0 < summary["compile_s"] < summary["wall_s"] and len(summary["config_sha256"]) == 64  # wall: from run()
