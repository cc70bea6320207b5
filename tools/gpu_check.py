"""GPU check: install, the GPU tests, throughput against PyTorch, a profile and the largest preset, in one command.

Here (with network), once, to fill the ignored folder `.gpu/` that travels to the GPU machine:

    python tools/gpu_check.py --prepare

On the GPU machine, from the repository root (`.gpu` carried), in about 8 minutes:

    python3 tools/gpu_check.py --out $OUT

On any machine, the same steps on the CPU at tiny sizes (what CI runs, tests/test_gpu_check.py):

    python tools/gpu_check.py --dry-run --out DIR

Steps, each in its own process (one that fails or runs out of time does not stop the next):

1. install: the carried wheels (`.gpu/whl/*.whl`: what jaxlm needs that the machine lacks),
   then jaxlm itself with `--no-deps`, all into one folder put first on PYTHONPATH;
2. throughput: gpt2-124m and llama-125m, bfloat16, T=1024, vocabulary 50304, with
   `model.kernels=standard` and `model.attention=cudnn`, then `xla`, at the largest batch in
   64, 32, 16, ... whose planned memory (`jaxlm.memory`) is under 45% of the device's and whose
   compiled step fits: tokens/s, MFU against the device's bf16 peak (`jaxlm.metrics`), the
   compiled memory, the plan and the measured peak; the first run also profiles one step;
3. the PyTorch reference (`.gpu/torch_ref.py`, copied from ../shared/bench by --prepare) at
   gpt2-124m's sizes and batch, with `--compile --fused-adamw` and without `--compile`;
4. scale: the largest preset that trains on the one device (mesh fsdp=1, remat full);
5. the GPU tests (model, step, kernel sets, resume) with JAX_PLATFORMS=cuda under what is
   left of the time cap, failures and skips listed.

Writes to --out: summary.md (every number, readable), results.json (the same as data), steps.log
(each step's command and output), tests.log and profile.txt.

--dry-run: JAX_PLATFORMS=cpu, gpt2-tiny/llama-tiny at T=64, `xla` in place of `cudnn` (cuDNN has
no CPU kernel), a 1 GiB memory limit, MFU against a nominal 1 TFLOP/s, the PyTorch reference
without `--compile` in both runs (torch.compile on a CPU spends some 40 CPU-s compiling a tiny
model), and one quick test file. Everything else is the GPU path.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_DIR = os.path.join(ROOT, ".gpu")
# the Python packages jaxlm needs that the GPU machine's image lacks (its list: the device notes)
# (omegaconf 2.4 needs only PyYAML, which the image has; tensorboardX needs numpy, packaging, protobuf)
CARRIED = ("omegaconf", "tensorboardX")
GPU_TESTS = ["tests/test_model.py", "tests/test_step.py", "tests/test_kernel_sets.py", "tests/test_resume.py"]
DRY_TESTS = ["tests/test_memory.py"]
# largest first; the scale step trains the first that fits
SCALE_PRESETS = ["llama-1b", "gpt2-774m", "gpt2-355m", "llama-125m", "gpt2-124m"]
BATCHES = (64, 32, 16, 8, 4, 2, 1)
VOCAB = 50304  # gpt2's 50257 padded to a multiple of 64, as PyTorch GPT baselines do
STEPS = ("throughput", "torch", "scale", "tests")
SHARED_TORCH_REF = os.path.join(os.path.dirname(ROOT), "shared", "bench", "torch_ref.py")


# ----------------------------------------------------------------------------------------------
# the worker: one training measurement in a fresh process (python gpu_check.py --worker SPEC)

def _top_ops(trace_dir: str, n: int = 5) -> dict:
    """The `n` ops with the most device time in a jax.profiler trace (its perfetto JSON)."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    if not paths:
        return {"error": f"no perfetto trace under {trace_dir}"}
    with gzip.open(paths[0]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    device = {p for p, name in procs.items() if name.startswith(("/device:GPU", "/device:TPU"))}
    if device:  # kernels on the accelerator's streams
        keep = lambda e: e["pid"] in device  # noqa: E731
    else:  # the CPU: the ops XLA's CPU client runs
        keep = lambda e: ("XLA" in threads.get((e["pid"], e["tid"]), "")  # noqa: E731
                          and not e["name"].startswith(("Mutex", "ThunkExecutor")))
    total, calls = defaultdict(float), defaultdict(int)
    for e in events:
        if e.get("ph") == "X" and keep(e):
            total[e["name"]] += e.get("dur", 0.0)
            calls[e["name"]] += 1
    all_us = sum(total.values())
    top = sorted(total, key=total.get, reverse=True)[:n]
    return {"where": "device streams" if device else "CPU client threads", "total_ms": all_us / 1e3,
            "ops": [{"name": k, "ms": total[k] / 1e3, "share": total[k] / all_us if all_us else 0.0,
                     "calls": calls[k]} for k in top]}


def worker(spec: dict) -> dict:
    import jax
    import numpy as np

    from bench_train import time_steps
    from jaxlm.config import load_config
    from jaxlm.memory import plan_step
    from jaxlm.metrics import count_params, flops_per_token, peak_flops_info
    from jaxlm.sharding import make_mesh
    from jaxlm.step import Stepper, build

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    limit = spec.get("memory_limit") or stats.get("bytes_limit", 0)
    out = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
           "memory_limit": limit, **{k: spec[k] for k in ("preset", "attention", "remat", "seq_len")}}
    T = spec["seq_len"]

    def configure(batch):
        cfg = load_config(None, [
            f"model.preset={spec['preset']}", f"model.vocab_size={spec['vocab']}", f"model.dtype={spec['dtype']}",
            f"model.kernels={spec['kernels']}", f"model.attention={spec['attention']}", f"model.remat={spec['remat']}",
            f"model.max_seq_len={max(T, 8)}", f"train.seq_len={T}", f"train.batch_size={batch}",
            "train.steps=1000000", "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=3e-4",
            "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
        mesh = make_mesh(cfg, [device])
        model, tx, schedule = build(cfg, spec["vocab"], mesh)
        return cfg, Stepper(cfg, model, tx, schedule, mesh)

    batches = [spec["batch"]] if spec.get("batch") else [b for b in BATCHES if b <= spec.get("max_batch", 64)]
    stepper = None
    for batch in batches:
        cfg, stepper = configure(batch)
        params = count_params(stepper.abstract_state().params)
        planned = plan_step(cfg, stepper, params["total"], spec["vocab"])
        if limit and planned.total > limit:  # surely too large: the plan counts less than the compiler
            out.update(status="does not fit", batch=batch, planned_bytes=planned.total, plan=planned.describe())
            continue
        if not spec.get("batch") and limit and planned.total > 0.45 * limit and batch != batches[-1]:
            continue  # the plan says this batch would crowd the device
        shapes = {"inputs": (batch, T), "targets": (batch, T)}
        try:
            compile_s = stepper.compile(stepper.abstract_state(), shapes)
        except Exception as e:  # the compiler refuses a step that does not fit
            if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
                out.update(status="does not fit", batch=batch, error=str(e).splitlines()[0][:300])
                continue
            raise
        mem = stepper.compiled_memory
        compiled = None if mem is None else int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                                 + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
        if compiled and limit and compiled > 0.92 * limit:
            out.update(status="does not fit", batch=batch, compiled_bytes=compiled)
            continue
        break
    else:
        return out
    out.update(batch=batch, params=params["total"], planned_bytes=planned.total, plan=planned.describe(),
               compiled_bytes=compiled, compile_s=round(compile_s, 2), attention_resolved=stepper.model.cfg.attention,
               kernels_resolved=stepper.model.cfg.kernels, loss_chunk=stepper.loss_chunk)
    rng = np.random.default_rng(0)
    batch_np = {k: rng.integers(0, spec["vocab"], (batch, T)).astype(np.int32) for k in ("inputs", "targets")}
    try:
        state = stepper.init_state(0)
        placed = stepper.place(batch_np, batch)
        state, step_s, steps, loss = time_steps(stepper, state, placed, spec["seconds"], spec.get("warmup", 3))
    except Exception as e:
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            out.update(status="does not fit", error=str(e).splitlines()[0][:300])
            return out
        raise
    tokens_per_s = batch * T / step_s
    fpt = flops_per_token(stepper.model.cfg, params, T)
    peak, source = peak_flops_info(device, spec.get("peak_tflops", 0.0), spec["dtype"])
    peak_bytes = (device.memory_stats() or {}).get("peak_bytes_in_use")
    out.update(status="ok", step_s=step_s, steps=steps, loss=loss, tokens_per_s=tokens_per_s,
               flops_per_token=fpt, mfu=fpt * tokens_per_s / peak if peak else None, peak_source=source,
               peak_bytes=peak_bytes)
    if spec.get("profile_dir"):
        jax.block_until_ready(state)
        with jax.profiler.trace(spec["profile_dir"], create_perfetto_trace=True):
            state, metrics = stepper.train(state, placed)
            jax.block_until_ready(metrics)
        out["profile"] = _top_ops(spec["profile_dir"])
    return out


# ----------------------------------------------------------------------------------------------
# the driver

class Run:
    def __init__(self, out: str, budget: float, dry: bool, env: dict):
        self.out, self.budget, self.dry, self.env = out, budget, dry, env
        self.t0 = time.monotonic()
        self.results: dict = {"dry_run": dry, "steps": {}}
        self.log = open(os.path.join(out, "steps.log"), "w")

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def call(self, name: str, cmd: list[str], timeout: float, log=None, cwd=ROOT) -> tuple[int | None, str]:
        """Run `cmd` in `cwd`; (exit code or None when stopped at `timeout`, its output)."""
        timeout = min(timeout, self.left())
        self.log.write(f"\n=== {name}: {' '.join(cmd)}  (time cap {timeout:.0f} s)\n")
        self.log.flush()
        print(f"[{time.monotonic() - self.t0:6.0f} s] {name} ...", flush=True)
        if timeout <= 5:
            self.log.write("skipped: out of time\n")
            return None, ""
        t = time.monotonic()
        path = log or os.path.join(self.out, f".{os.getpid()}.part")
        with open(path, "w") as f:
            p = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=f, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
                rc = None
        with open(path, errors="replace") as f:
            text = f.read()
        if not log:
            os.remove(path)
        self.log.write(text[-20000:])
        self.log.write(f"\n--- {name}: {'stopped at the time cap' if rc is None else f'exit {rc}'} "
                       f"after {time.monotonic() - t:.0f} s\n")
        self.log.flush()
        return rc, text

    def measure(self, name: str, spec: dict, timeout: float) -> dict:
        rc, text = self.call(name, [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                             timeout)
        lines = [ln for ln in text.splitlines() if ln.startswith("{")]
        if rc == 0 and lines:
            res = json.loads(lines[-1])
        else:
            res = {"status": "stopped at the time cap" if rc is None else f"failed (exit {rc})",
                   "error": "\n".join(text.strip().splitlines()[-3:])[-600:]}
        self.results["steps"][name] = res
        return res


def install(run: Run, wheels: str, site: str) -> dict:
    found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
           "--target", site]
    res = {"wheels": [os.path.basename(w) for w in found], "site": site}
    if found:
        rc, _ = run.call("install wheels", pip + found, 300)
        if rc != 0:
            return {**res, "status": f"wheels failed (exit {rc})"}
    rc, _ = run.call("install jaxlm", pip + ["--no-build-isolation", ROOT], 300)
    if rc != 0:
        return {**res, "status": f"jaxlm failed (exit {rc})"}
    rc, text = run.call("import check", [sys.executable, "-c", "import jax, jaxlm; print(jaxlm.__file__); "
                                         "print(jax.__version__, jax.devices())"], 120, cwd=os.path.dirname(site))
    where = text.strip().splitlines()[0] if text.strip() else ""
    ok = rc == 0 and where.startswith(site)
    return {**res, "status": "ok" if ok else f"jaxlm not imported from {site}: {where or text[-300:]}",
            "jax_devices": text.strip().splitlines()[-1] if rc == 0 else None}


def run_tests(run: Run, files: list[str], cap: float) -> dict:
    log = os.path.join(run.out, "tests.log")
    cmd = [sys.executable, "-u", "-m", "pytest", "-o", "addopts=", "-n", "0", "-v", "-rfEs", "-p", "no:cacheprovider",
           *files]
    rc, text = run.call("gpu tests", cmd, cap, log=log)
    counts, listed = defaultdict(int), defaultdict(list)
    for ln in text.splitlines():
        parts = ln.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL",
                                                                  "XPASS"):
            counts[parts[1]] += 1
            if parts[1] != "PASSED":
                listed[parts[1]].append(parts[0])
    reasons = [ln for ln in text.splitlines() if ln.startswith(("SKIPPED [", "FAILED ", "ERROR "))]
    return {"status": "stopped at the time cap" if rc is None else f"exit {rc}", "counts": dict(counts),
            "not_passed": dict(listed), "summary_lines": reasons[:60], "files": files}


def torch_runs(run: Run, torch_ref: str, sizes: dict, batch: int, dry: bool) -> None:
    for name, flags in (("torch compile", ["--compile", "--fused-adamw"]), ("torch eager", ["--fused-adamw"])):
        if dry:
            flags = [f for f in flags if f != "--compile"]
        cmd = [sys.executable, torch_ref, "--device", "cpu" if dry else "cuda", "--dtype", "bfloat16",
               "--d-model", str(sizes["d"]), "--layers", str(sizes["layers"]), "--heads", str(sizes["heads"]),
               "--vocab", str(VOCAB), "--seq-len", str(sizes["T"]), "--batch", str(batch),
               "--seconds", str(sizes["seconds"]), *flags]
        if not os.path.exists(torch_ref):
            run.results["steps"][name] = {"status": f"no PyTorch reference at {torch_ref} (run --prepare here)"}
            continue
        rc, text = run.call(name, cmd, 240)
        lines = [ln for ln in text.splitlines() if ln.startswith("{")]
        res = json.loads(lines[-1]) if rc == 0 and lines else {
            "status": "stopped at the time cap" if rc is None else f"failed (exit {rc})", "error": text[-600:]}
        if rc == 0 and lines:
            res.update(status="ok", batch=batch, seq_len=sizes["T"], flags=flags,
                       mfu=res["model_gflops"] * 1e9 / (sizes["peak_tflops"] * 1e12))
        run.results["steps"][name] = res


def throughput(run: Run, base: dict, dry: bool, trace_dir: str) -> dict:
    """gpt2-124m and llama-125m with cudnn and xla attention, one batch per model (the largest that
    fits the first run; a later run that cannot hold it picks its own); the first run also profiles
    one step. Returns {model: batch}."""
    batch = {}
    for model in ("gpt2-124m", "llama-125m"):
        for attention in ("cudnn", "xla"):
            name = f"jaxlm {model} {attention}"
            spec = dict(base, preset={"gpt2-124m": "gpt2-tiny", "llama-125m": "llama-tiny"}[model] if dry else model,
                        attention="xla" if dry else attention, batch=batch.get(model), max_batch=8 if dry else 32)
            if not run.results.get("profiled"):
                spec["profile_dir"] = trace_dir
                run.results["profiled"] = name
            r = run.measure(name, spec, 150)
            if r.get("status") == "does not fit" and spec["batch"]:
                r = run.measure(name, dict(spec, batch=None), 150)
            if r.get("status") == "ok":
                batch.setdefault(model, r["batch"])
    prof = run.results["steps"].get(run.results["profiled"], {}).get("profile")
    if prof:
        with open(os.path.join(run.out, "profile.txt"), "w") as f:
            f.write(f"one step of {run.results['profiled']}\n" + json.dumps(prof, indent=1) + "\n")
    return batch


def ratios(s: dict) -> dict:
    """jaxlm's gpt2-124m tokens/s over the PyTorch reference's, each attention kernel against each mode."""
    out = {}
    for att in ("cudnn", "xla"):
        j = s.get(f"jaxlm gpt2-124m {att}", {}).get("tokens_per_s")
        for t in ("torch compile", "torch eager"):
            if j and s.get(t, {}).get("tokens_per_s"):
                out[f"jaxlm gpt2-124m {att} / {t} (tokens/s)"] = j / s[t]["tokens_per_s"]
    return out


def summary(results: dict) -> str:
    s = results["steps"]
    lines = [f"# jaxlm GPU check{' (dry run on the CPU)' if results['dry_run'] else ''}", "",
             f"- started {results['started']}, took {results['seconds']:.0f} s; machine: {results['machine']}", ""]
    ins = s.get("install", {})
    lines += [f"## Install: {ins.get('status')}", f"- wheels: {', '.join(ins.get('wheels', [])) or 'none'}",
              f"- devices: {ins.get('jax_devices')}", "", "## Throughput", "",
              "| run | batch | tokens/s | MFU | step ms | compile s | compiled GiB | plan GiB | peak GiB | status |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    gib = lambda b: f"{b / 2**30:.2f}" if b else "-"  # noqa: E731
    for name, r in s.items():
        if name.startswith(("jaxlm ", "scale", "torch ")):
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            step = f"{r['step_s'] * 1e3:.1f}" if r.get("step_s") else "-"
            tok = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
            lines.append(f"| {name} | {r.get('batch', '-')} | {tok} | {mfu} | {step} | {r.get('compile_s', '-')} | "
                         f"{gib(r.get('compiled_bytes'))} | {gib(r.get('planned_bytes'))} | "
                         f"{gib(r.get('peak_bytes'))} | {r.get('status')} |")
    for k, v in results.get("ratios", {}).items():
        lines.append(f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}")
    prof = next((r["profile"] for r in s.values() if isinstance(r, dict) and r.get("profile")), None)
    if prof:
        lines += ["", f"## Profile: one step of {results.get('profiled')}, top ops by time ({prof.get('where')}, "
                      f"{prof.get('total_ms', 0):.1f} ms in all)", ""]
        lines += [f"- {o['ms']:.2f} ms ({o['share']:.0%}, {o['calls']} calls) {o['name'][:160]}"
                  for o in prof.get("ops", [])]
    t = s.get("tests", {})
    lines += ["", f"## GPU tests: {t.get('status')}, {t.get('counts')}",
              *[f"- {ln}" for ln in t.get("summary_lines", [])]]
    return "\n".join(lines) + "\n"


def prepare() -> None:
    """Fill .gpu/: the wheels the GPU machine lacks (Python 3.12) and the PyTorch reference."""
    from importlib.metadata import version
    whl = os.path.join(GPU_DIR, "whl")
    os.makedirs(whl, exist_ok=True)
    exclude = os.path.join(ROOT, ".git", "info", "exclude")
    if os.path.isdir(os.path.join(ROOT, ".git")):  # .gpu/ travels as a carried path, never committed
        os.makedirs(os.path.dirname(exclude), exist_ok=True)
        if "/.gpu/" not in (open(exclude).read().split() if os.path.exists(exclude) else []):
            with open(exclude, "a") as f:
                f.write("/.gpu/\n")
    plats = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
             for a in ("--platform", p)]
    for name in CARRIED:
        spec = f"{name}=={version(name)}"  # the version jaxlm is tested with here
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", *plats, "-d", whl, spec]
        subprocess.run(cmd, check=True)
    shutil.copy(SHARED_TORCH_REF, os.path.join(GPU_DIR, "torch_ref.py"))
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(GPU_DIR, "**"), recursive=True) if os.path.isfile(p))
    print(f"{GPU_DIR}: {', '.join(sorted(os.listdir(whl)))} and torch_ref.py, {size / 2**20:.1f} MiB; "
          f"carry '.gpu' and run: python3 tools/gpu_check.py --out $OUT")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", help="folder for summary.md, results.json and the logs")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    ap.add_argument("--prepare", action="store_true", help="here: fill .gpu/ with wheels and the PyTorch reference")
    ap.add_argument("--wheels", default=os.path.join(GPU_DIR, "whl"), help="carried wheels (default .gpu/whl)")
    ap.add_argument("--torch-ref", default=None,
                    help="torch_ref.py (default .gpu/torch_ref.py, else ../shared/bench/torch_ref.py)")
    ap.add_argument("--steps", default=",".join(STEPS),
                    help=f"which steps after the install, comma-separated (default all: {','.join(STEPS)})")
    ap.add_argument("--budget", type=float, default=None, help="seconds for everything (default 470; dry run 600)")
    ap.add_argument("--seconds", type=float, default=None, help="timed seconds per throughput run (default 8)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        print(json.dumps(worker(json.loads(a.worker))), flush=True)
        return 0
    if a.prepare:
        prepare()
        return 0
    if not a.out:
        ap.error("--out is required")
    steps = a.steps.split(",")
    if set(steps) - set(STEPS):
        ap.error(f"--steps: unknown {sorted(set(steps) - set(STEPS))}; known: {', '.join(STEPS)}")
    os.makedirs(a.out, exist_ok=True)
    dry = a.dry_run
    env = dict(os.environ, JAX_PLATFORMS="cpu" if dry else "cuda", PYTHONUNBUFFERED="1")
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    tmp = tempfile.mkdtemp(prefix="jaxlm-gpu-check-")
    site = os.path.join(tmp, "site")
    env["PYTHONPATH"] = os.pathsep.join([site] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PATH"] = os.pathsep.join([os.path.join(site, "bin"), env.get("PATH", "")])
    run = Run(a.out, a.budget or (600 if dry else 470), dry, env)
    res = run.results
    res["started"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    res["machine"] = _machine()
    torch_ref = a.torch_ref or next((p for p in (os.path.join(GPU_DIR, "torch_ref.py"), SHARED_TORCH_REF)
                                     if os.path.exists(p)), os.path.join(GPU_DIR, "torch_ref.py"))
    try:
        res["steps"]["install"] = install(run, a.wheels, site)
        T, seconds = (64, a.seconds or 0.3) if dry else (1024, a.seconds or 8.0)
        base = dict(vocab=256 if dry else VOCAB, dtype="bfloat16", kernels="standard", remat="none", seq_len=T,
                    seconds=seconds, memory_limit=2**30 if dry else 0, peak_tflops=1.0 if dry else 0.0)
        batch = {}
        if "throughput" in steps:
            batch = throughput(run, base, dry, os.path.join(tmp, "trace"))
        if "torch" in steps:
            torch_runs(run, torch_ref, dict(d=64, layers=2, heads=4, T=T, seconds=seconds, peak_tflops=1.0) if dry
                       else dict(d=768, layers=12, heads=12, T=T, seconds=seconds, peak_tflops=989.0),
                       batch.get("gpt2-124m", 8 if dry else 32), dry)
        res["ratios"] = ratios(res["steps"])
        if "scale" in steps:
            # the largest preset that trains on the one device, fsdp over it, remat full; the dry run
            # starts with gpt2-124m under its 1 GiB limit, which the plan refuses
            for preset in (["gpt2-124m", "llama-tiny", "gpt2-tiny"] if dry else SCALE_PRESETS):
                spec = dict(base, preset=preset, attention="xla" if dry else "cudnn", remat="full", max_batch=8 if dry
                            else 16, seq_len=T if dry else 2048 if preset.startswith("llama") else 1024)
                if run.measure(f"scale {preset}", spec, 240).get("status") == "ok":
                    res["largest_preset"] = preset
                    break
        if "tests" in steps:
            res["steps"]["tests"] = run_tests(run, DRY_TESTS if dry else GPU_TESTS, max(run.left(), 0))
    finally:
        res["seconds"] = time.monotonic() - run.t0
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        text = summary(res)
        with open(os.path.join(a.out, "summary.md"), "w") as f:
            f.write(text)
        run.log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(text)
    return 0


def _machine() -> str:
    parts = []
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if smi.returncode == 0:
            parts.append(smi.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        parts.append(f"{os.cpu_count()} x {model}")
    except OSError:
        pass
    parts.append(f"Python {sys.version.split()[0]}")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
