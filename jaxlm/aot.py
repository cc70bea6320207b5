"""`jaxlm compile CONFIG --topology v5e:4x4`: compile a run's train and eval steps for a TPU slice
on any machine, and say whether they fit.

With `libtpu` installed (the `tpu` extra) JAX describes the chips of a TPU slice without one
(`jax.experimental.topologies.get_topology_desc`): compile-only devices. The steps are built
exactly as `jaxlm train` builds them for those devices: `kernels.resolve` sees a TPU (so
`auto` gives the standard kernels and Pallas flash attention), the mesh is `make_mesh` over the
slice, and the state and batch shardings, remat and scan come from the config. Nothing is
allocated: the state is abstract (`Stepper.abstract_state`). What is printed per chip:

- the compiler's memory (`memory_analysis`): arguments, outputs, temporaries and generated
  code, against the chip's HBM (`TPU_HBM_GIB`);
- jaxlm's plan of the same (`jaxlm.memory`), beside it;
- the step's FLOPs from XLA's cost analysis, beside jaxlm's own count (6N+attn).

A step that does not fit exits 2 with the breakdown and the settings that shrink it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time

from jaxlm.config import Config
from jaxlm.errors import ConfigError

# HBM per chip, GiB, from Google Cloud's TPU system architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): v4 32, v5e 16, v5p 95, Trillium (v6e) 32.
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# device_kind strings the TPU runtime reports, to the generation names above
_KINDS = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v5p": "v5p", "tpu v5": "v5p",
          "tpu v6 lite": "v6e", "tpu v6e": "v6e"}
INSTALL = 'pip install -e ".[tpu]"   (libtpu: JAX\'s TPU compiler, usable on any machine for compiling)'


def generation(device_kind: str) -> str | None:
    kind = device_kind.lower()
    for prefix in sorted(_KINDS, key=len, reverse=True):
        if kind.startswith(prefix):
            return _KINDS[prefix]
    return None


def hbm_bytes(device_kind: str) -> int:
    """The chip's HBM in bytes; 0 when the kind is not in the table."""
    gen = generation(device_kind)
    return TPU_HBM_GIB[gen] * 2**30 if gen else 0


def topology_devices(name: str):
    """The compile-only devices of a TPU slice such as 'v5e:4x4' or 'v5p:2x2x2'."""
    if not re.fullmatch(r"v[0-9]+[a-z]*:[0-9]+(x[0-9]+)*", name):
        raise ConfigError(f"--topology {name!r}: expected GENERATION:SHAPE, e.g. v5e:2x2, v5e:4x4 or v5p:2x2x2 "
                          f"(generations: {', '.join(TPU_HBM_GIB)})")
    if name.split(":")[0] not in TPU_HBM_GIB:
        raise ConfigError(f"--topology {name!r}: unknown TPU generation (known: {', '.join(TPU_HBM_GIB)})")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError(f"compiling for a TPU topology needs libtpu, which is not installed: {INSTALL}") from None
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # one host: this one
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(name, "tpu").devices)
    except Exception as e:  # libtpu's own message names what it did not like
        raise ConfigError(f"--topology {name!r}: {e}") from None


class DoesNotFit(Exception):
    """The TPU compiler refused the step: more memory per chip than the chip has."""

    def __init__(self, message: str, planned):
        super().__init__(message)
        self.planned = planned


@dataclasses.dataclass
class Report:
    topology: str
    chips: int
    hbm: int
    mesh: dict[str, int]
    model: str
    memory: dict[str, int]  # the compiler's bytes per chip: arguments, outputs, temporaries, code, aliased
    planned: object  # jaxlm.memory.MemoryPlan
    xla_flops: float  # per chip and step
    jaxlm_flops: float  # per chip and step, 6N+attn
    jaxlm_flops_as_xla_counts: float  # the same with the layer scan's body counted once, as XLA counts loops
    compile_s: float
    eval_memory: dict[str, int] | None  # None when the eval step was not compiled

    @property
    def total(self) -> int:
        m = self.memory
        return m["arguments"] + m["outputs"] + m["temporaries"] + m["code"] - m["aliased"]

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "temporaries": m.temp_size_in_bytes, "code": m.generated_code_size_in_bytes,
            "aliased": m.alias_size_in_bytes}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def compile_for(cfg: Config, devices, topology: str, with_eval: bool = True) -> Report:
    """Compile `cfg`'s train and (with `with_eval`) eval steps for `devices` (a slice's compile-only
    devices) as `jaxlm train` would; nothing is allocated."""
    from jaxlm import memory
    from jaxlm.config import check_vocab
    from jaxlm.metrics import count_params, flops_per_token
    from jaxlm.sharding import make_mesh
    from jaxlm.step import Stepper, build

    if cfg.mesh.backend != "jit":
        raise ConfigError("jaxlm compile builds the sharded jit step: mesh.backend=pmap has no ahead-of-time path")
    mesh = make_mesh(cfg, devices)
    vocab = check_vocab(cfg, cfg.model.vocab_size or cfg.data.tokenizer_vocab, mesh.shape["tensor"])
    model, tx, schedule = build(cfg, vocab, mesh)
    stepper = Stepper(cfg, model, tx, schedule, mesh)
    state = stepper.abstract_state()
    B, T = cfg.train.batch_size, cfg.train.seq_len
    packed = ("segment_ids", "positions") if cfg.data.segment_ids else ()
    counts = count_params(state.params, cfg.model.tied)
    m = model.cfg  # resolved for the slice's chips by build()
    planned = memory.plan_step(cfg, stepper, counts["total"], vocab)
    t0 = time.perf_counter()
    try:
        eval_shapes = {k: (cfg.eval.batch_size or B, T) for k in ("inputs", "targets", "mask") + packed}
        stepper.compile(state, {k: (B, T) for k in ("inputs", "targets") + packed}, eval_shapes if with_eval else None)
    except Exception as e:  # the TPU compiler refuses a program over the chip's HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise DoesNotFit(str(e).strip().splitlines()[0], planned) from None
    compile_s = time.perf_counter() - t0
    per_token = flops_per_token(cfg.model, counts, T)
    if cfg.model.scan_layers and m.n_layers > 1:  # XLA's cost analysis counts a while loop's body once
        layer = (counts["matmul"] - counts["head"]) / m.n_layers
        one = dataclasses.replace(cfg.model, n_layers=1)
        as_xla = flops_per_token(one, {**counts, "matmul": counts["head"] + layer}, T)
    else:
        as_xla = per_token
    hbm = hbm_bytes(devices[0].device_kind) or TPU_HBM_GIB.get(topology.split(":")[0], 0) * 2**30
    return Report(topology=topology, chips=len(devices), hbm=hbm,
                  mesh=dict(mesh.shape), model=f"{m.family} d={m.d_model} layers={m.n_layers} kernels={m.kernels} "
                  f"attention={m.attention} remat={m.remat} dtype={m.dtype}",
                  memory=_memory(stepper.compiled_train), planned=planned, xla_flops=_flops(stepper.compiled_train),
                  jaxlm_flops=per_token * B * T / len(devices), compile_s=compile_s,
                  jaxlm_flops_as_xla_counts=as_xla * B * T / len(devices),
                  eval_memory=_memory(stepper.compiled_eval) if with_eval else None)


def describe(r: Report) -> list[str]:
    gib = lambda b: f"{b / 2**30:8.3f} GiB"  # noqa: E731
    lines = [f"topology {r.topology}: {r.chips} chips, {r.hbm / 2**30:.0f} GiB HBM each; mesh "
             + " x ".join(f"{k}={v}" for k, v in r.mesh.items()) + f"; compiled in {r.compile_s:.1f}s",
             f"model: {r.model}",
             "train step, per chip (compiler):"]
    for k in ("arguments", "outputs", "temporaries", "code"):
        lines.append(f"  {k:<12} {gib(r.memory[k])}")
    lines.append(f"  {'aliased':<12} {gib(-r.memory['aliased'])}  (donated state: outputs reuse the arguments)")
    lines.append(f"  {'total':<12} {gib(r.total)}  = {100 * r.total / r.hbm:.1f}% of HBM")
    lines.append(f"  planned      {gib(r.planned.total)}  jaxlm's plan: {r.planned.describe()}; "
                 f"plan / compiler = {r.planned.total / max(r.total, 1):.2f}")
    ev = r.eval_memory
    if ev:
        lines.append(f"eval step, per chip (compiler): {gib(ev['arguments'] + ev['outputs'] + ev['temporaries'])}")
    lines.append(f"FLOPs per chip and step: jaxlm 6N+attn {r.jaxlm_flops / 1e12:.4f} T; XLA's cost analysis "
                 f"{r.xla_flops / 1e12:.4f} T")
    if r.jaxlm_flops_as_xla_counts != r.jaxlm_flops:
        lines.append(f"  (XLA counts the layer scan's body once: jaxlm's count so taken "
                     f"{r.jaxlm_flops_as_xla_counts / 1e12:.4f} T, XLA / that "
                     f"{r.xla_flops / r.jaxlm_flops_as_xla_counts:.2f})")
    else:
        lines.append(f"  (XLA / jaxlm {r.xla_flops / r.jaxlm_flops:.2f})")
    return lines


def advice(cfg: Config, chips: int) -> str:
    """What shrinks a step that does not fit, largest lever first."""
    tips = []
    if cfg.model.remat in ("none", "dots", "dots_no_batch"):
        tips.append("model.remat=full (keeps one block's activations instead of every layer's)")
    if cfg.mesh.fsdp < chips:
        tips.append(f"mesh.fsdp={chips} mesh.data=1 (shards parameters and Adam state over every chip)")
    tips.append(f"train.grad_accum={cfg.train.grad_accum * 2} or a smaller train.batch_size (fewer rows at once)")
    if cfg.model.dtype == "float32":
        tips.append("model.dtype=bfloat16 (halves activations)")
    tips.append("a larger slice (--topology)")
    return "to fit, try: " + "; ".join(tips)


def main(args) -> int:
    from jaxlm.config import load_config

    devices = topology_devices(args.topology)
    cfg = load_config(args.config, args.overrides)
    gen = args.topology.split(":")[0]
    try:
        report = compile_for(cfg, devices, args.topology)
    except DoesNotFit as e:
        print(f"train step, per chip: jaxlm's plan {e.planned.describe()}")
        print(f"jaxlm: the train step does not fit a {gen} chip ({TPU_HBM_GIB[gen]} GiB HBM); the TPU compiler: {e}; "
              f"{advice(cfg, len(devices))}", file=sys.stderr)
        return 2
    for line in describe(report):
        print(line)
    if not report.fits:
        print(f"jaxlm: the train step needs {report.total / 2**30:.2f} GiB per chip, more than the "
              f"{report.hbm / 2**30:.0f} GiB of a {gen} chip; {advice(cfg, report.chips)}", file=sys.stderr)
        return 2
    return 0
