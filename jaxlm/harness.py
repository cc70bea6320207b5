"""lm-evaluation-harness on jaxlm checkpoints, with no export step (the optional `harness` extra).

`JaxlmLM(pretrained=RUN)` is an lm-eval model (registered as "jaxlm") that restores a run's
checkpoint onto this machine's mesh (`jaxlm.inference.open_checkpoints`: every device on the
data axis unless `overrides` set one) and answers the three request types:

- `loglikelihood(context, continuation)`: the context and continuation are encoded as lm-eval's
  own models encode them (`jaxlm.tasks.encode_pair`; an empty context is the start token alone),
  cut from the left to max_length + 1 ids, packed into rows with segment ids and scored in
  batches of eval.batch_size rows. It returns the summed log-probability and whether every
  continuation token is the most likely one.
- `loglikelihood_rolling(text)`: the text's ids (no start token) are cut into lm-eval's windows
  (`lm_eval.utils.get_rolling_token_windows` with the model's start token as the prefix, then
  `make_disjoint_window`), so bits per byte come out as lm-eval's `hf` model computes them on an
  export whose tokenizer does not add the start token itself (docs/export.md).
- `generate_until(context, gen_kwargs)`: the start token and the context's ids, cut from the left
  to max_length - max_gen_toks, decoded with the KV-cache generator (`jaxlm.generate`), greedy at
  temperature 0 (the default) or sampled (temperature, top_k, top_p), in batches of requests with
  the same arguments; the text stops before the first of `until` (and at EOS).

max_length defaults to model.max_seq_len, the length lm-eval's `hf` model reads from an export's
config.json, so both see the same windows. `jaxlm harness RUN --tasks ...` runs
`lm_eval.simple_evaluate` with this model; from Python, pass `JaxlmLM(...)` as its `model`.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import sharding, tasks
from jaxlm.data import packing
from jaxlm.errors import ConfigError

try:
    import lm_eval.models  # noqa: F401  lm-eval's own models register first (its registry fills lazily only while empty)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the optional extra
    raise ConfigError("lm-evaluation-harness is not installed: pip install -e '.[harness]' (or lm-eval==0.4.13)") \
        from e


def _score_fn(params, batch, model):
    """[2, B, T]: the NLL of each scored target, and 1 where it is the most likely token (0 off the mask)."""
    logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    mask = batch["mask"].astype(jnp.float32)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    greedy = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return jnp.stack([nll * mask, greedy * mask])


@register_model("jaxlm")
class JaxlmLM(LM):
    def __init__(self, pretrained: str, overrides: str | list[str] = (), max_length: int = 0, batch_size=None,
                 max_batch_size=None, device=None, devices=None, log=None, **unused):
        super().__init__()
        from jaxlm import checkpoint as ckpt
        from jaxlm.generate import Generator
        from jaxlm.inference import open_checkpoints

        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if isinstance(overrides, str):
            overrides = [o for o in overrides.split(" ") if o]
        overrides = list(overrides)
        if batch_size not in (None, "", "auto") and not any(o.startswith("eval.batch_size=") for o in overrides):
            overrides.append(f"eval.batch_size={int(batch_size)}")
        o = open_checkpoints(str(pretrained), overrides, devices)
        self.params, _, self.step = ckpt.restore_params(o.run_dir, o.steps[0], o.target, self.log)
        self.cfg, self.tok, self.mesh, self.model = o.cfg, o.tokenizer, o.mesh, o.model
        self.rows = o.cfg.eval.batch_size
        self.T = int(max_length) or o.cfg.model.max_seq_len
        if self.T > o.cfg.model.max_seq_len:
            raise ConfigError(f"max_length={self.T} is longer than the model's max_seq_len {o.cfg.model.max_seq_len}")
        self.generator = Generator(o.model, o.cfg.model, o.mesh, self.tok.vocab_size)
        params_sharding = jax.tree_util.tree_map(lambda x: x.sharding, o.target)
        self._score = jax.jit(lambda p, b: _score_fn(p, b, o.model),
                              in_shardings=(params_sharding, sharding.batch_sharding(o.mesh)),
                              out_shardings=sharding.replicated(o.mesh))
        self.log(f"harness: {o.run_dir} step {self.step}, max_length {self.T}, {self.rows} rows per batch, "
                 f"mesh {dict(o.mesh.shape)}")

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.T

    # -- scoring ---------------------------------------------------------------------------------

    def score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each (context ids, continuation ids), cut to max_length + 1 ids."""
        ex = tasks.pair_examples(pairs, self.T)
        sums, greedy, counts = (np.zeros(len(pairs), np.float64) for _ in range(3))
        local = sharding.process_rows(self.mesh, self.rows)
        with sharding.activate(self.mesh):
            for owner, mask, batch in packing.eval_batches(ex, self.rows, self.T, local):
                placed = sharding.shard_batch(batch, self.mesh, self.rows)
                out = np.asarray(jax.device_get(self._score(self.params, placed)), np.float64)
                scored = (owner >= 0) & (mask > 0)
                sums += np.bincount(owner[scored], weights=out[0][scored], minlength=len(pairs))
                greedy += np.bincount(owner[scored], weights=out[1][scored], minlength=len(pairs))
                counts += np.bincount(owner[scored], minlength=len(pairs))
        return [(-float(s), bool(g == c)) for s, g, c in zip(sums, greedy, counts)]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (r.args for r in requests):
            if context == "":
                cont = self.tok.encode([continuation])[0]
                pairs.append(([self.tok.start_id], cont) if cont[0] != self.tok.start_id else (cont[:1], cont[1:]))
            else:
                pairs.append(tasks.encode_pair(self.tok, context, continuation))
        return self.score_pairs(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        texts = [r.args[0] for r in requests]
        owners, pairs = [], []
        for i, ids in enumerate(self.tok.encode(texts)):
            for ctx, pred in map(utils.make_disjoint_window,
                                 utils.get_rolling_token_windows(ids, self.tok.start_id, self.T, 1)):
                owners.append(i)
                pairs.append((list(ctx), list(pred)))
        out = np.zeros(len(texts), np.float64)
        for i, (ll, _) in zip(owners, self.score_pairs(pairs)):
            out[i] += ll
        return [float(v) for v in out]

    # -- generation ------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from jaxlm.generate import Sampling

        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for key, members in groups.items():
            kw = dict(json.loads(key))
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kw.pop("max_gen_toks", 256))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0))
            sampling = Sampling(temperature if do_sample or temperature > 0 else 0.0, int(kw.pop("top_k", 0) or 0),
                                float(kw.pop("top_p", 1.0) or 1.0))
            seed = int(kw.pop("seed", 0) or 0)
            room = self.T - new
            if room < 1:
                raise ConfigError(f"max_gen_toks={new} leaves no room for a context in max_length={self.T}")
            for a in range(0, len(members), self.rows):
                chunk = members[a:a + self.rows]
                contexts = [requests[i].args[0] for i in chunk]
                prompts = [([self.tok.start_id] + ids)[-room:] for ids in self.tok.encode(contexts)]
                got = self.generator.generate(self.params, prompts, new, sampling, seed, self.tok.eos_id)
                for i, ids in zip(chunk, got):
                    text = self.tok.decode(ids)
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
        return out


def evaluate(path: str, task_names: list[str], include_path: str | None = None, num_fewshot: int | None = None,
             limit: float | None = None, overrides: list[str] | tuple[str, ...] = (), max_length: int = 0,
             log=None) -> dict:
    """lm_eval.simple_evaluate of `task_names` with the checkpoint at `path`; lm-eval's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = JaxlmLM(path, list(overrides), max_length=max_length, log=log)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    return lm_eval.simple_evaluate(model=lm, tasks=task_names, num_fewshot=num_fewshot, limit=limit,
                                   task_manager=manager, bootstrap_iters=1000, log_samples=False)
