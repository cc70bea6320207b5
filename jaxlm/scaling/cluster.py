"""A sweep on a SLURM cluster: job arrays with one task per run, each task `jaxlm sweep FILE --run NAME`.

The tasks share the sweep directory; rerunning `jaxlm sweep FILE` once the arrays are done
writes results.csv (a finished run is not trained again).
"""

from __future__ import annotations

import os
import shlex

from jaxlm import files
from jaxlm.scaling.plan import PlannedRun
from jaxlm.scaling.sweep_file import Sweep


def emit_slurm(sweep: Sweep, runs: list[PlannedRun], jaxlm: str = "jaxlm") -> list[str]:
    """Job arrays for a cluster, one task per run, in <sweep>/slurm/: `first.sbatch` trains the runs
    that start from scratch, `branches.sbatch` (after the first array ends) the wsd branches;
    `submit.sh` submits both. Every task runs `jaxlm sweep FILE --dir DIR --run NAME`."""
    out = os.path.join(sweep.dir, "slurm")
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    groups = {"first": [r.name for r in runs if r.kind != "branch"],
              "branches": [r.name for r in runs if r.kind == "branch"]}
    paths = []
    for part, names in groups.items():
        if not names:
            continue
        files.write_text(os.path.join(out, f"{part}.txt"), "\n".join(names) + "\n")
        paths.append(os.path.join(out, f"{part}.sbatch"))
        files.write_text(paths[-1], _array_script(sweep, part, len(names), out, jaxlm))
    submit = ["#!/bin/bash", "# submit the sweep's job arrays; rerun `jaxlm sweep FILE` afterwards for results.csv",
              "set -euo pipefail", f"cd {shlex.quote(os.path.abspath(out))}", "first=$(sbatch --parsable first.sbatch)",
              "echo \"first array: job $first\""]
    if groups["branches"]:
        submit += ["branches=$(sbatch --parsable --dependency=afterany:$first branches.sbatch)",
                   "echo \"branches array: job $branches (starts when $first has ended)\""]
    paths.append(os.path.join(out, "submit.sh"))
    files.write_text(paths[-1], "\n".join(submit) + "\n")
    for p in paths:
        os.chmod(p, 0o755)
    return paths


def _array_script(sweep: Sweep, part: str, tasks: int, out: str, jaxlm: str) -> str:
    """The sbatch script of one job array: task i trains the run on line i + 1 of <part>.txt."""
    names = shlex.quote(os.path.abspath(os.path.join(out, part + '.txt')))
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name=jaxlm-{sweep.name}-{part}",
        f"#SBATCH --array=0-{tasks - 1}",
        f"#SBATCH --output={os.path.abspath(out)}/logs/%x-%a.out",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        "# add your cluster's partition, time limit and GPUs here (#SBATCH --gres=gpu:1, ...)",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        f"NAME=$(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" {names})",
        f"exec ${{JAXLM:-{jaxlm}}} sweep {shlex.quote(sweep.path)} --dir {shlex.quote(os.path.abspath(sweep.dir))} "
        "--run \"$NAME\"", ""])
