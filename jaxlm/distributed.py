"""Several processes as one run: joining them, talking between them, and noticing a lost one.

A multi-host run starts the same `jaxlm train` command once per host (or per GPU). Before
any JAX computation, `initialize` joins the processes through JAX's multi-controller
runtime (`jax.distributed.initialize`), which starts a coordination service in process 0.
Which processes form the run comes from, in this order:

- explicit settings: `dist.coordinator` / `$JAX_COORDINATOR_ADDRESS` (host:port of process 0),
  with `dist.num_processes` / `$JAX_NUM_PROCESSES` and `dist.process_id` / `$JAX_PROCESS_ID`
  (either may be left to the cluster's own variables);
- a cluster JAX knows, recognised from its variables: SLURM (`SLURM_NTASKS` > 1 in a job
  step), Open MPI (`mpirun`: `OMPI_COMM_WORLD_SIZE` > 1), a TPU pod slice
  (`TPU_WORKER_HOSTNAMES` naming more than one host), a Kubernetes indexed Job / JobSet
  (`JOB_COMPLETION_INDEX` in a pod); `dist.mode=always` joins whatever JAX detects by itself
  (a Cloud TPU VM pod asks its metadata server);
- otherwise one process, with no coordinator: the run is what it was before.

After joining, `Group` gives named barriers and a key-value exchange over the coordination
service (process 0 publishes, the others read), and `Watchdog` sends a heartbeat and
watches everyone else's: a process that goes silent for `dist.heartbeat_s` seconds, or
that reports a failure, makes every other process exit with `EXIT_LOST` and a message
that names it, instead of waiting forever in a collective.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import itertools
import json
import os
import socket
import sys
import threading
import time
from typing import Callable

from jaxlm.errors import ConfigError, JaxlmError

EXIT_LOST = 1  # exit status of a process that stops because another one was lost
_KV_TIMEOUT_MS = 24 * 3600 * 1000  # waits on another process: liveness is the watchdog's job, not this
_PREFIX = "jaxlm"


class DistributedError(JaxlmError):
    """The processes of a run disagree, or one of them failed while the others waited for it."""


@dataclasses.dataclass(frozen=True)
class Join:
    """How this process joins a run: `cluster` names where the settings came from ("" = one process)."""

    cluster: str = ""
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    method: str | None = None  # JAX's cluster detection method for the settings left unset


def _int(value, name: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None


def _count(environ, name: str) -> int:
    try:
        return int(environ.get(name, "") or 0)
    except ValueError:
        return 0


def detect(dist, environ=None) -> Join:
    """Where the processes of this run come from (see the module docstring), without starting anything.

    `dist` is the `dist` section of the config (or anything with its fields).
    """
    env = os.environ if environ is None else environ
    if dist.mode == "never":
        return Join()
    coordinator = dist.coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    count = dist.num_processes or _int(env.get("JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES")
    pid = dist.process_id if dist.process_id >= 0 else _int(env.get("JAX_PROCESS_ID"), "JAX_PROCESS_ID")
    if coordinator:
        return Join("explicit", coordinator, count, pid)
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and _count(env, "SLURM_NTASKS") > 1:
        return Join("SLURM", None, count, pid, "slurm")
    if "OMPI_MCA_orte_hnp_uri" in env and _count(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return Join("Open MPI", None, count, pid, "ompi")
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return Join("TPU pod slice", None, count, pid, "gke_tpu")
    if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
        return Join("Kubernetes", None, count, pid, "k8s")
    if dist.mode == "always":
        return Join("JAX's detection", None, count, pid)
    return Join()


_joined: Join | None = None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Wait until process 0's coordination service accepts connections, or raise ConfigError.

    JAX's client aborts the whole process when it cannot connect; this check turns the usual
    cause (a wrong address, or process 0 not started) into an error message instead.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except (OSError, ValueError) as e:
            if time.monotonic() > deadline or isinstance(e, ValueError):
                raise ConfigError(f"joining the explicit run failed: nothing answers at coordinator {address} "
                                  f"after {timeout_s:.0f}s ({e}); start process 0 there, or fix "
                                  "dist.coordinator / JAX_COORDINATOR_ADDRESS or dist.init_timeout_s") from None
            time.sleep(0.5)


def initialize(dist, log=None, environ=None) -> Join:
    """Join the run's processes (see `detect`); a no-op for one process and when already joined.

    Must run before any JAX computation in this process. Starts the heartbeat watchdog.
    """
    global _joined
    if _joined is not None:
        return _joined
    join = detect(dist, environ)
    if not join.cluster:
        _joined = join
        return join
    import jax

    if join.coordinator and join.process_id not in (None, 0):
        _wait_for_coordinator(join.coordinator, dist.init_timeout_s)
    try:
        jax.distributed.initialize(join.coordinator, join.num_processes, join.process_id,
                                   cluster_detection_method=join.method,
                                   initialization_timeout=dist.init_timeout_s,
                                   heartbeat_timeout_seconds=2 * dist.heartbeat_s)
    except Exception as e:  # no coordinator, a bad address, a timeout
        raise ConfigError(f"joining the {join.cluster} run failed ({type(e).__name__}: {str(e)[:300]}); check "
                          "dist.coordinator / JAX_COORDINATOR_ADDRESS, the process count and id, or set "
                          "dist.mode=never for one process") from None
    _joined = dataclasses.replace(join, num_processes=jax.process_count(), process_id=jax.process_index())
    Watchdog.start(dist.heartbeat_s, log or (lambda m: print(m, file=sys.stderr, flush=True)))
    atexit.register(Watchdog.finish)  # runs before JAX's own exit handler (registered earlier)
    return _joined


def joined() -> bool:
    """Whether this process joined a run of several processes."""
    return bool(_joined and _joined.cluster)


def describe() -> str:
    """The plan's processes line: how many, which one this is, and its devices."""
    import jax

    local = jax.local_devices()
    ids = ",".join(str(d.id) for d in local)
    where = f" ({_joined.cluster})" if _joined and _joined.cluster else ""
    return (f"processes: {jax.process_count()}{where}, this is process {jax.process_index()} with "
            f"{len(local)} local {local[0].platform} devices (ids {ids})")


def _client():
    """The coordination service client of this process, or None for a single process."""
    import jax

    if jax.process_count() == 1:
        return None
    from jax._src import distributed as jax_distributed  # the client JAX itself connected

    return jax_distributed.global_state.client


# -- exchanges between processes ------------------------------------------------------------

_groups = itertools.count()


class Group:
    """Named barriers and key-value exchanges for one run of the processes.

    Every process creates its groups in the same order, so the same group has the same
    key prefix everywhere (a sweep runs many runs in one process). With one process
    every method returns at once.
    """

    def __init__(self, name: str = "run", solo: bool = False):
        self.prefix = f"{_PREFIX}/{name}{next(_groups)}"
        if solo:  # this process alone, without touching JAX (`jaxlm data` outside a multi-process job)
            self.index, self.count, self.client = 0, 1, None
        else:
            import jax

            self.index, self.count = jax.process_index(), jax.process_count()
            self.client = _client()
        self._calls = itertools.count()  # every exchange gets fresh keys (the same name may recur)

    @classmethod
    def solo(cls) -> Group:
        return cls("solo", solo=True)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{next(self._calls)}-{name}"

    @property
    def owner(self) -> bool:
        """Process 0: the one that writes shared state."""
        return self.index == 0

    def barrier(self, name: str) -> None:
        if self.client is not None:
            self.client.wait_at_barrier(self._key(name), _KV_TIMEOUT_MS)

    def broadcast(self, name: str, make: Callable[[], object]):
        """`make()` on process 0 and its JSON value on every process.

        When `make` raises on process 0, every other process raises DistributedError with
        its message, so nobody waits for a value that never comes.
        """
        if self.client is None:
            return make()
        key = self._key(name)
        if not self.owner:
            got = json.loads(self.client.blocking_key_value_get(key, _KV_TIMEOUT_MS))
            if "error" in got:
                raise DistributedError(f"process 0 failed: {got['error']}")
            return got["value"]
        try:
            value = make()
        except BaseException as e:
            self.client.key_value_set(key, json.dumps({"error": f"{type(e).__name__}: {e}"}))
            raise
        self.client.key_value_set(key, json.dumps({"value": value}))
        return value

    def gather(self, name: str, value) -> list:
        """Every process's JSON `value`, in process order."""
        if self.client is None:
            return [value]
        key = self._key(name)
        self.client.key_value_set(f"{key}/{self.index}", json.dumps(value))
        return [json.loads(self.client.blocking_key_value_get(f"{key}/{i}", _KV_TIMEOUT_MS))
                for i in range(self.count)]

    def each(self, name: str, work: Callable[[], object]) -> list:
        """`work()` on every process; the JSON results of all, in process order.

        When `work` raises on any process, every process raises: a JaxlmError keeps its class
        and message (bad input found by process 1 fails process 0 with the same DataError),
        anything else becomes a DistributedError naming the process. Nobody waits forever
        for a result that never comes.
        """
        try:
            mine = {"value": work()}
        except BaseException as e:
            mine = {"error": str(e), "type": type(e).__name__, "user": isinstance(e, JaxlmError)}
            if self.client is None:
                raise
            self.gather(name, mine)
            raise
        got = self.gather(name, mine)
        for i, g in enumerate(got):
            if "error" in g:
                from jaxlm import errors

                kind = getattr(errors, g["type"], None) if g["user"] else None
                if isinstance(kind, type) and issubclass(kind, JaxlmError):
                    raise kind(g["error"])
                raise DistributedError(f"process {i} failed: {g['type']}: {g['error']}")
        return [g["value"] for g in got]

    def map(self, name: str, items: list, fn: Callable[[object], object]) -> list:
        """[fn(item) for item in items], the items shared round-robin between the processes (JSON
        results; errors as in `each`)."""
        if self.count == 1:
            return [fn(x) for x in items]
        shares = self.each(name, lambda: [fn(x) for x in items[self.index::self.count]])
        out = [None] * len(items)
        for i, share in enumerate(shares):
            out[i::self.count] = share
        return out

    def agree(self, name: str, value, what: str) -> None:
        """Raise DistributedError on every process unless all processes hold the same JSON `value`."""
        values = self.gather(name, value)
        differ = [i for i, v in enumerate(values) if v != values[0]]
        if differ:
            raise DistributedError(f"processes {differ} hold a different {what} than process 0; start every "
                                   "process with the same command, config and files")


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_bytes(text: str) -> bytes:
    return base64.b64decode(text)


# -- liveness ------------------------------------------------------------------------------------

class Watchdog:
    """A heartbeat of this process and a watch on every other one's, on a daemon thread.

    Each process bumps its key under `jaxlm/beat/` about once a second. A process whose
    key has not changed for `timeout_s`, or which posted a failure under `jaxlm/failed/`,
    is lost: the watchdog prints which one and that relaunching the same command resumes
    from the last committed checkpoint, and ends this process with EXIT_LOST (without
    waiting for the collectives it may be blocked in).
    """

    _instance: Watchdog | None = None

    def __init__(self, client, index: int, count: int, timeout_s: float, log, exit_fn=os._exit):
        self.client, self.index, self.count, self.timeout_s, self.log = client, index, count, timeout_s, log
        self.exit = exit_fn
        self.seen: dict[int, tuple[str, float]] = {}
        self.halt = threading.Event()

    @classmethod
    def start(cls, timeout_s: float, log) -> Watchdog | None:
        import jax

        client = _client()
        if client is None or cls._instance is not None:
            return cls._instance
        cls._instance = cls(client, jax.process_index(), jax.process_count(), timeout_s, log)
        threading.Thread(target=cls._instance._run, daemon=True, name="jaxlm-watchdog").start()
        return cls._instance

    def _run(self) -> None:
        beat = 0
        while not self.halt.wait(1.0):
            beat += 1
            try:
                self.client.key_value_set(f"{_PREFIX}/beat/{self.index}", str(beat), allow_overwrite=True)
                keys = {k: dict(self.client.key_value_dir_get(f"{_PREFIX}/{k}/")) for k in ("beat", "failed", "done")}
                lost = self.check(keys["beat"], keys["failed"], time.monotonic(), keys["done"])
            except Exception as e:  # the coordination service itself is gone (process 0 died)
                lost = f"lost contact with the coordination service in process 0 ({str(e)[:200]})"
            if lost and not self.halt.is_set():
                self.lost(lost)
                return

    def check(self, beats: dict[str, str], failed: dict[str, str], now: float, done: dict | None = None) -> str:
        """Why this process must stop ("" = everyone is alive), from the beat, failure and done keys
        (a process that finished normally is silent, not lost)."""
        for key, why in sorted(failed.items()):
            i = int(key.rsplit("/", 1)[-1])
            if i != self.index:
                return f"process {i} failed: {why}"
        finished = {int(k.rsplit("/", 1)[-1]) for k in (done or {})}
        for i in range(self.count):
            if i == self.index or i in finished:
                continue
            value = beats.get(f"{_PREFIX}/beat/{i}", "")
            if i not in self.seen or self.seen[i][0] != value:
                self.seen[i] = (value, now)
            elif now - self.seen[i][1] > self.timeout_s:
                return f"process {i} sent no heartbeat for {now - self.seen[i][1]:.0f}s (dist.heartbeat_s)"
        return ""

    def lost(self, why: str) -> None:
        self.log(f"error: {why}; process {self.index} stops too. Relaunch the same command on every process: "
                 "the run resumes from its last committed checkpoint")
        sys.stdout.flush()
        sys.stderr.flush()
        self.exit(EXIT_LOST)

    def stop(self) -> None:
        self.halt.set()

    @classmethod
    def finish(cls) -> None:
        """At a normal exit: say this process is done (its silence is not a loss), stop watching."""
        dog = cls._instance
        if dog is None or dog.halt.is_set():
            return
        dog.halt.set()
        try:
            dog.client.key_value_set(f"{_PREFIX}/done/{dog.index}", "1", allow_overwrite=True)
        except Exception:  # the service is already gone
            pass


def await_lost_peer(log) -> None:
    """After an error that may come from a lost process (a collective that failed because its peer is
    gone), give the watchdog its timeout to name that process; it ends this process when it finds one."""
    dog = Watchdog._instance
    if dog is None:
        return
    log(f"checking whether another process was lost (up to {dog.timeout_s + 3:.0f}s)")
    time.sleep(dog.timeout_s + 3)


def report_failure(message: str) -> None:
    """Tell the other processes this one is failing (their watchdogs stop them at once)."""
    client = _client()
    if client is None:
        return
    import jax

    try:
        client.key_value_set(f"{_PREFIX}/failed/{jax.process_index()}", message[:500], allow_overwrite=True)
    except Exception:  # the service is gone: the others notice by themselves
        pass


# -- agreed stops --------------------------------------------------------------------------------

class StopVote:
    """A stop flag reduced over every device of the mesh, so all processes stop at the same step.

    The loop casts this step's ballot (this process's flag: a signal reached it) right after
    dispatching the step and reads the previous step's result, which is ready by then: the
    same value on every process, at no extra wait.
    """

    def __init__(self, mesh):
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P

        self.sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))  # one element per device
        self.size = mesh.devices.size
        self.local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
        self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

    def cast(self, flag: bool):
        import jax
        import numpy as np

        mine = np.full((self.local,), int(flag), np.int32)
        return self._max(jax.make_array_from_process_local_data(self.sharding, mine, (self.size,)))

    @staticmethod
    def result(ballot) -> bool:
        import numpy as np

        return bool(np.asarray(ballot))
