"""How a process finds its run (cluster detection), the watchdog's rules, the launcher's bookkeeping."""

import signal
import subprocess
import sys

import pytest

from jaxlm import distributed
from jaxlm.cli import main
from jaxlm.config import load_config
from jaxlm.launch import Launch, child_env


def _dist(*overrides):
    return load_config(None, list(overrides)).dist


SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}


@pytest.mark.parametrize("environ, overrides, want", [
    ({}, [], distributed.Join()),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}, [],
     distributed.Join("explicit", "h:1234", 4, 3)),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_PROCESS_ID": "3"},
     ["dist.coordinator=c:9", "dist.num_processes=8", "dist.process_id=5"], distributed.Join("explicit", "c:9", 8, 5)),
    ({**SLURM, "SLURM_NTASKS": "4"}, [], distributed.Join("SLURM", None, None, None, "slurm")),
    ({**SLURM, "SLURM_NTASKS": "1"}, [], distributed.Join()),  # a one-task job step stays one process
    ({"OMPI_MCA_orte_hnp_uri": "1234.0;tcp://10.0.0.1:5000", "OMPI_COMM_WORLD_SIZE": "2"}, [],
     distributed.Join("Open MPI", None, None, None, "ompi")),
    ({"OMPI_MCA_orte_hnp_uri": "1234.0;tcp://10.0.0.1:5000", "OMPI_COMM_WORLD_SIZE": "1"}, [], distributed.Join()),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "2"}, [],
     distributed.Join("TPU pod slice", None, None, None, "gke_tpu")),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, [], distributed.Join()),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "0"}, [],
     distributed.Join("Kubernetes", None, None, None, "k8s")),
    ({**SLURM, "SLURM_NTASKS": "4"}, ["dist.mode=never"], distributed.Join()),
    ({}, ["dist.mode=always"], distributed.Join("JAX's detection")),
])
def test_detection_from_settings_and_cluster_variables(environ, overrides, want):
    assert distributed.detect(_dist(*overrides), environ) == want


def test_bad_settings_are_config_errors():
    with pytest.raises(Exception, match="JAX_NUM_PROCESSES='two' is not an integer"):
        distributed.detect(_dist(), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"})
    with pytest.raises(Exception, match="dist.mode"):
        _dist("dist.mode=sometimes")
    with pytest.raises(Exception, match="dist.heartbeat_s"):
        _dist("dist.heartbeat_s=0")


def test_a_coordinator_that_never_answers_is_a_clear_error_not_a_hang(tmp_path):
    """Process 1 of 2 with no process 0 to join: jaxlm exits 2 after dist.init_timeout_s."""
    code = ("import sys; from jaxlm.cli import main; sys.exit(main(['train', 'dist.init_timeout_s=3', "
            "'dist.coordinator=127.0.0.1:9', 'dist.num_processes=2', 'dist.process_id=1']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,  # hang guard
                       cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "joining the explicit run failed" in p.stderr and "dist.coordinator" in p.stderr


class _Clock:
    def __init__(self):
        self.logged, self.exited = [], []


def _dog(count=3, index=0, timeout=10.0):
    c = _Clock()
    dog = distributed.Watchdog(None, index, count, timeout, c.logged.append, exit_fn=c.exited.append)
    return dog, c


def test_watchdog_names_a_silent_process_after_its_timeout():
    dog, _ = _dog()
    beats = {"jaxlm/beat/0": "5", "jaxlm/beat/1": "7", "jaxlm/beat/2": "3"}
    assert dog.check(beats, {}, now=100.0) == ""
    beats = {**beats, "jaxlm/beat/1": "8"}  # process 1 beats on, process 2 goes silent
    assert dog.check(beats, {}, now=105.0) == ""
    assert dog.check(beats, {}, now=109.9) == ""
    beats = {**beats, "jaxlm/beat/1": "9"}
    why = dog.check(beats, {}, now=110.5)
    assert why.startswith("process 2 sent no heartbeat for 10s")
    assert dog.check(beats, {}, now=111.0, done={"jaxlm/done/2": "1"}) == ""  # finished, not lost


def test_watchdog_stops_at_once_when_another_process_reports_a_failure():
    dog, clock = _dog(index=1)
    assert dog.check({}, {"jaxlm/failed/1": "mine"}, now=0.0) == ""  # its own report is not news
    why = dog.check({}, {"jaxlm/failed/0": "DataError: no files match 'x'"}, now=0.0)
    assert why == "process 0 failed: DataError: no files match 'x'"
    dog.lost(why)
    assert clock.exited == [distributed.EXIT_LOST]
    assert "process 0 failed" in clock.logged[0] and "Relaunch the same command" in clock.logged[0]


def test_one_process_exchanges_are_local():
    group = distributed.Group("t")
    assert group.owner and group.count == 1
    assert group.broadcast("x", lambda: {"a": 1}) == {"a": 1}
    assert group.gather("y", 5) == [5]
    group.agree("z", "same", "thing")
    group.barrier("b")


def test_stop_vote_of_one_process():
    from jaxlm.sharding import make_mesh
    from conftest import tiny_config

    vote = distributed.StopVote(make_mesh(tiny_config("mesh.fsdp=2", "mesh.tensor=2")))
    assert vote.result(vote.cast(True)) is True
    assert vote.result(vote.cast(False)) is False


def test_child_environment_joins_and_sets_the_devices():
    env = child_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "X": "y"}, 1, 3, 4321, 2)
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4321"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"], env["X"]) == ("3", "1", "y")
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"


@pytest.mark.parametrize("codes, want", [((0, 0), 0), ((75, 75), 75), ((0, 3), 3), ((-9, 1), 137)])
def test_launch_exit_status_is_the_first_failure(codes, want):
    run = Launch(["unused"], len(codes), grace_s=30, log=lambda m: None)
    delays = (0.0, 0.5)
    run.procs = [subprocess.Popen([sys.executable, "-c", f"import os, time, signal; time.sleep({d}); "
                                   + (f"os.kill(os.getpid(), {-c})" if c < 0 else f"raise SystemExit({c})")])
                 for c, d in zip(codes, delays)]
    assert run.wait() == want


def test_launch_kills_the_others_after_the_grace_period():
    run = Launch(["unused"], 2, grace_s=1, log=lambda m: None)
    run.procs = [subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"]),
                 subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])]
    assert run.wait() == 4
    assert run.procs[1].returncode == -9


def test_launch_needs_a_command(capsys):
    assert main(["launch", "--processes", "2"]) == 2
    assert "give the command to launch after --" in capsys.readouterr().err


def test_launch_forwards_signals_to_every_process():
    run = Launch(["unused"], 2, grace_s=30, log=lambda m: None)
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); "
            "print('ready', flush=True); time.sleep(60)")
    run.procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for p in run.procs:
        assert p.stdout.readline().strip() == "ready"
    run.forward(signal.SIGTERM, None)
    assert run.wait() == 75
    assert [p.returncode for p in run.procs] == [75, 75]
