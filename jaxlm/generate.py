"""Sampling from a checkpoint with a KV cache.

Prompts of different lengths share one batch: each is encoded with the start token in front
(EOS, or an imported model's own; every training document starts that way) and left-padded to the longest, so all rows decode in
lockstep. Padding slots are masked out of attention and each row's positions start at 0
at its first real token, so a row decodes exactly as it would alone.

One compiled call fills the cache with the prompts (prefill); then each new token is one
compiled call that samples from the previous logits, writes the token's keys and values
into the next cache slot and returns its logits. The cache is donated, so it is updated
in place, and no call recomputes the prefix. `recompute_greedy` is the slow reference
that does: a full forward pass over the whole sequence for every token.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm import sharding
from jaxlm.config import ModelConfig
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import ConfigError
from jaxlm.model import Decoder, init_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1: all

    def check(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p} must be in (0, 1]")


def sample(logits_BV, key, s: Sampling):
    """One token per row from logits under temperature, top-k and top-p."""
    if s.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / s.temperature
    if s.top_k:
        kth_B1 = jax.lax.top_k(logits_BV, s.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if s.top_p < 1:
        order_BV = jnp.argsort(-logits_BV, axis=-1)
        probs_BV = jax.nn.softmax(jnp.take_along_axis(logits_BV, order_BV, axis=-1), axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the more likely tokens
        drop_sorted = before_BV >= s.top_p  # the most likely token is always kept
        drop_BV = jnp.zeros_like(drop_sorted).at[jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(drop_sorted)
        logits_BV = jnp.where(drop_BV, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


class Generator:
    """Compiled prefill and decode step of one model; `generate` runs the loop."""

    def __init__(self, model: Decoder, cfg: ModelConfig, mesh, n_tokens: int | None = None):
        """n_tokens: the tokenizer's vocabulary; ids past it (vocabulary padding) are never sampled."""
        self.model, self.cfg, self.mesh, self.n_tokens = model, cfg, mesh, n_tokens
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=3)
        self._step = jax.jit(self._step_fn, static_argnums=6, donate_argnums=1)

    def _prefill_fn(self, params, tokens_BP, positions_BP, cache):
        logits_BPV, cache = self.model.apply({"params": params}, tokens_BP, positions_BP, None, cache)
        return logits_BPV[:, -1], cache

    def _step_fn(self, params, cache, logits_BV, key, t, pad_B, s: Sampling):
        if self.n_tokens is not None and self.n_tokens < logits_BV.shape[-1]:
            logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < self.n_tokens, logits_BV, -jnp.inf)
        token_B = sample(logits_BV, jax.random.fold_in(key, t), s)
        positions_B1 = (cache["index"] - pad_B)[:, None]
        logits_B1V, cache = self.model.apply({"params": params}, token_B[:, None], positions_B1, None, cache)
        return token_B, logits_B1V[:, 0], cache

    def generate(self, params, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 seed: int = 0, eos_id: int | None = None,
                 on_tokens: Callable[[int, np.ndarray], None] | None = None) -> list[list[int]]:
        """New token ids for each prompt (token ids, EOS included if wanted), stopping at `eos_id`."""
        sampling.check()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token")
        P = max(map(len, prompts))
        S = P + max_new_tokens
        if S > self.cfg.max_seq_len:
            raise ConfigError(f"a prompt of {P} tokens plus {max_new_tokens} new tokens needs {S} positions, more "
                              f"than the model's context (model.max_seq_len={self.cfg.max_seq_len}); shorten the "
                              f"prompt or lower --max-new-tokens")
        B = len(prompts)
        pad = np.array([P - len(p) for p in prompts], np.int32)
        tokens = np.zeros((B, P), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, pad[i]:] = p
        positions = np.maximum(np.arange(P)[None, :] - pad[:, None], 0).astype(np.int32)
        valid = np.arange(S)[None, :] >= pad[:, None]
        key = jax.random.key(seed)
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(B, bool)
        with sharding.activate(self.mesh):
            cache = init_cache(self.cfg, B, S, jnp.asarray(valid))
            logits, cache = self._prefill(params, jnp.asarray(tokens), jnp.asarray(positions), cache)
            pad_j = jnp.asarray(pad)
            for t in range(max_new_tokens):
                token, logits, cache = self._step(params, cache, logits, key, t, pad_j, sampling)
                token = np.asarray(token)
                for i in np.flatnonzero(~done):
                    if eos_id is not None and token[i] == eos_id:
                        done[i] = True
                    else:
                        out[i].append(int(token[i]))
                if on_tokens is not None:
                    on_tokens(t, token)
                if done.all():
                    break
        return out


def recompute_greedy(model: Decoder, params, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding the slow way: a full forward pass over the whole sequence for every new token.

    One compiled shape (the final length; later slots are padding the causal mask ignores).
    """
    S = len(prompt) + max_new_tokens
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    tokens = np.zeros((1, S), np.int32)
    tokens[0, :len(prompt)] = prompt
    n = len(prompt)
    for _ in range(max_new_tokens):
        logits = forward(params, jnp.asarray(tokens))
        tokens[0, n] = int(jnp.argmax(logits[0, n - 1]))
        n += 1
    return tokens[0, len(prompt):].tolist()


@dataclasses.dataclass
class Loaded:
    """A checkpoint ready to sample from."""

    run_dir: str
    step: int
    model: Decoder
    params: object
    tokenizer: Tokenizer
    generator: Generator


def load(path: str, overrides: list[str] | tuple[str, ...] = (), devices=None, log=print) -> Loaded:
    """Restore a checkpoint's params for generation: on one device unless the overrides set a mesh."""
    from jaxlm.inference import open_checkpoints

    devices = list(jax.devices() if devices is None else devices)
    if not any(o.startswith("mesh.") for o in overrides):
        devices = devices[:1]
    o = open_checkpoints(path, ["eval.batch_size=1", *overrides], devices)
    t0 = time.perf_counter()
    params, _, step = ckpt.restore_params(o.run_dir, o.steps[0], o.target, log)
    log(f"restored {o.run_dir} step {step} in {time.perf_counter() - t0:.1f}s")
    return Loaded(o.run_dir, step, o.model, params, o.tokenizer, Generator(o.model, o.cfg.model, o.mesh, o.tokenizer.vocab_size))


def encode_prompt(tok: Tokenizer, text: str) -> list[int]:
    """The start token (EOS, or an imported model's own: data.bos_token), then the text's ids: how every
    training document starts."""
    return [tok.start_id] + tok.encode([text])[0]


def stream_printer(tok: Tokenizer, out=None) -> Callable[[int, np.ndarray], None]:
    """An `on_tokens` callback that prints row 0's text as it grows, until its EOS."""
    ids: list[int] = []
    state = {"printed": 0, "done": False}

    def on_tokens(t: int, token: np.ndarray) -> None:
        if state["done"] or token[0] == tok.eos_id:
            state["done"] = True
            return
        ids.append(int(token[0]))
        text = tok.decode(ids)  # decoding the whole row keeps spaces between pieces right
        stream = out or sys.stdout
        stream.write(text[state["printed"]:])
        stream.flush()
        state["printed"] = len(text)

    return on_tokens
