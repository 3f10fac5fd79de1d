"""Multi-process (multi-host) start-up: `jax.distributed.initialize` when needed.

A run spans several processes (one per host on a TPU pod slice, one per host or GPU on
a GPU cluster) that each own some devices and together form one global device mesh.
`jax.distributed.initialize` connects them before JAX touches any device; process 0
runs the coordinator service the others connect to.

Two ways in:

* Explicit (GPU clusters, a localhost test): `--coordinator_address=HOST:PORT`
  (process 0's host and a free port), `--num_processes=N`, `--process_id=i`, the same
  address and N on every process.
* Automatic, with none of those flags: where the environment says this process is one
  of several (a Cloud TPU pod slice or multislice, a SLURM step with several tasks, an
  Open MPI job), JAX's own cluster detection fills in everything. A single-host run
  (a laptop, one TPU VM, `srun -n 1`) does not initialise anything.

Failures end with a ConfigError-style message naming the fix instead of JAX's abort
(JAX's client kills the process with a C++ stack trace when the coordinator never
answers, and process 0 segfaults when the coordinator's port is taken).
"""
import dataclasses
import errno
import json
import logging
import os
import socket
import sys
import threading
import time

from sparse_jax.errors import ConfigError

log = logging.getLogger("sparse_jax")

DEFAULT_TIMEOUT_S = 300  # JAX's default initialization_timeout.
# Seconds without a heartbeat after which the coordination service declares a process
# dead and stops the others (JAX's default, 100, took 52 s to act on a kill -9).
DEFAULT_HEARTBEAT_TIMEOUT_S = 30
_PROBE_INTERVAL_S = 0.5
# The key in the coordination service's key-value store under which the first process
# that stops with an error of its own leaves {"process": i, "message": ...} for the
# others (first writer wins).
STOP_KEY = "sparse_jax/stopped"


@dataclasses.dataclass(frozen=True)
class Options:
  """The command-line view of the distributed set-up (None = not given)."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  initialization_timeout: int = DEFAULT_TIMEOUT_S
  heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_S


_FLAGS_FIX = ("Fix: on every process pass the same --coordinator_address=HOST:PORT "
              "(process 0's host, a free port) and --num_processes=N, and its own "
              "--process_id in 0..N-1; or pass none of them (single host, or a "
              "Cloud TPU pod / SLURM job JAX detects).")


def check_options(options: Options) -> None:
  """Rejects flag combinations that cannot work; needs no JAX (runs before any).

  Raises:
    ConfigError: with a 'Fix:' last line.
  """
  o = options
  if o.initialization_timeout <= 0:
    raise ConfigError(f"--initialization_timeout={o.initialization_timeout} must be a "
                      "positive number of seconds.\nFix: pass e.g. "
                      f"--initialization_timeout={DEFAULT_TIMEOUT_S}.")
  if o.heartbeat_timeout <= 0:
    raise ConfigError(f"--heartbeat_timeout={o.heartbeat_timeout} must be a positive "
                      "number of seconds.\nFix: pass e.g. "
                      f"--heartbeat_timeout={DEFAULT_HEARTBEAT_TIMEOUT_S}.")
  if o.num_processes is not None and o.num_processes < 1:
    raise ConfigError(f"--num_processes={o.num_processes} must be at least 1.\n"
                      f"{_FLAGS_FIX}")
  if o.num_processes is None:
    given = [f"--{name}" for name in ("coordinator_address", "process_id")
             if getattr(o, name) is not None]
    if given:
      raise ConfigError(f"{' and '.join(given)} given without --num_processes.\n"
                        f"{_FLAGS_FIX}")
    return
  if o.process_id is not None and not 0 <= o.process_id < o.num_processes:
    raise ConfigError(f"--process_id={o.process_id} is not in 0..{o.num_processes - 1} "
                      f"(--num_processes={o.num_processes}).\n{_FLAGS_FIX}")
  if o.num_processes == 1:  # One process: nothing to connect (an explicit opt-out).
    return
  missing = [f"--{name}" for name in ("coordinator_address", "process_id")
             if getattr(o, name) is None]
  if missing:
    raise ConfigError(f"--num_processes={o.num_processes} given without "
                      f"{' and '.join(missing)}.\n{_FLAGS_FIX}")
  _split_address(o.coordinator_address)


def _split_address(address: str) -> tuple[str, int]:
  """('host', port) of 'host:port' or '[v6]:port'; ConfigError otherwise."""
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"--coordinator_address={address!r} is not HOST:PORT.\n"
                      "Fix: pass process 0's host name or IP and a free port, e.g. "
                      "--coordinator_address=10.0.0.1:1234.")
  return host, int(port)


# ----------------------------------------------------------------------------- detection
def _int_env(name: str) -> int:
  try:
    return int(os.environ.get(name, ""))
  except ValueError:
    return 0


def detect_cluster() -> tuple[str, int] | None:
  """(environment name, process count) when this is one of several processes of a job
  JAX's `jax.distributed.initialize()` can set up by itself; None otherwise.

  Reads the same signals as JAX's detectors (jax/_src/clusters), but answers "several
  processes?" instead of "which cluster?", so a single-host run never initialises:

  * Cloud TPU VM (libtpu found TPU chips): the GKE worker list
    (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES) or, on GCE, the metadata server's
    worker-network-endpoints, times MEGASCALE_NUM_SLICES.
  * SLURM: inside an `srun` step (the variables JAX requires), SLURM_NTASKS > 1.
  * Open MPI (`mpirun`): OMPI_COMM_WORLD_SIZE > 1.

  Kubernetes (non-TPU) and mpi4py are not auto-detected (JAX's detector for the former
  calls the Kubernetes API, the latter is opt-in in JAX too): pass the flags there.
  """
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
           "SLURM_LOCALID")
  if all(v in os.environ for v in slurm) and _int_env("SLURM_NTASKS") > 1:
    return "SLURM", _int_env("SLURM_NTASKS")
  if "OMPI_MCA_orte_hnp_uri" in os.environ and _int_env("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI", _int_env("OMPI_COMM_WORLD_SIZE")
  count = _cloud_tpu_process_count()
  if count > 1:
    return "Cloud TPU", count
  return None


def _cloud_tpu_process_count() -> int:
  """Processes of this Cloud TPU slice(s); 0 when this is not a Cloud TPU VM."""
  # Importing jax runs its Cloud TPU set-up, which records whether libtpu found chips;
  # it does not start a backend, so jax.distributed.initialize stays possible.
  import jax  # pylint: disable=import-outside-toplevel,unused-import
  try:
    # pylint: disable=import-outside-toplevel
    from jax._src import cloud_tpu_init
    from jax._src.clusters import cloud_tpu_cluster
  except ImportError:  # Private modules moved: no TPU auto-detection.
    return 0
  if not getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
    return 0
  for cluster in (cloud_tpu_cluster.GkeTpuCluster, cloud_tpu_cluster.GceTpuCluster):
    try:
      if cluster.is_env_present():
        return int(cluster.get_process_count())
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(
          f"This is a Cloud TPU VM, but reading its worker list failed ({e}).\n"
          "Fix: pass --coordinator_address, --num_processes and --process_id "
          "explicitly, or --num_processes=1 for a single-host run.") from None
  return 0


# ----------------------------------------------------------------------------- initialize
def initialize(options: Options) -> str | None:
  """Connects this process to the others of its job, if there are others.

  Call before anything that starts a JAX backend (jax.devices(), any computation).
  On CPU, cross-process collectives go through gloo.

  Returns:
    A one-line description ('process 1 of 2, coordinator 10.0.0.1:1234'), or None
    when this is a single-process run and nothing was initialised.

  Raises:
    ConfigError: bad flags, a coordinator port already in use, or an unreachable
      coordinator. When the coordinator answers but the job does not assemble within
      the timeout, the process prints the error and exits with code 1 itself (JAX
      would abort it from C++ shortly after).
  """
  check_options(options)
  timeout = options.initialization_timeout
  if options.num_processes == 1:
    return None  # Said explicitly: one process, no auto-detection.
  if options.num_processes is not None:
    address, n, i = options.coordinator_address, options.num_processes, options.process_id
    host, port = _split_address(address)
    start = time.monotonic()
    if i == 0:
      _check_port_free(address, port)
    else:
      _wait_for_coordinator(address, host, port, i, n, timeout)
    # JAX retries for initialization_timeout: give it what is left of ours.
    remaining = max(1, int(timeout - (time.monotonic() - start)))
    what = f"process {i} of {n}, coordinator {address}"
    joined = f"coordinator {address}"
    kwargs = dict(coordinator_address=address, num_processes=n, process_id=i,
                  initialization_timeout=remaining)
    late = (f"Process {i} of {n} {'started' if i == 0 else 'reached'} the coordinator "
            f"at {address}, but not all {n} processes connected within {timeout} s "
            f"(--initialization_timeout).\nFix: start all {n} processes (each with "
            f"--coordinator_address={address} --num_processes={n} and its own "
            "--process_id) within the timeout, or raise --initialization_timeout.")
  else:
    detected = detect_cluster()
    if detected is None:
      return None
    name, n = detected
    what = f"{name} job of {n} processes"
    joined = f"{name} job"
    remaining = timeout
    kwargs = dict(initialization_timeout=timeout)
    late = (f"This {what} did not connect within {timeout} s (--initialization_timeout)."
            "\nFix: run the same command on every host of the job, raise "
            "--initialization_timeout, or pass --coordinator_address, --num_processes "
            "and --process_id explicitly.")
  import jax  # pylint: disable=import-outside-toplevel
  if jax.config.jax_cpu_collectives_implementation is None:
    # CPU devices of different processes only share collectives through gloo; the
    # setting is read when the CPU backend starts and is ignored by TPU and GPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs["heartbeat_timeout_seconds"] = options.heartbeat_timeout
  log.info("Connecting: %s (timeout %d s).", what, remaining)
  _initialize_before(lambda: jax.distributed.initialize(**kwargs), remaining, late)
  return f"process {jax.process_index()} of {jax.process_count()}, {joined}"


def _check_port_free(address: str, port: int) -> None:
  """Process 0's coordinator binds [::]:port; JAX segfaults when that is taken."""
  if os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
    return  # A custom bind address: leave it to JAX.
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue  # No IPv6 on this host: try IPv4.
    with sock:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
      try:
        sock.bind((host, port))
        return
      except OSError as e:
        if e.errno != errno.EADDRINUSE:
          continue  # E.g. IPv6 disabled: the IPv4 probe decides.
        raise ConfigError(
            f"Process 0 cannot start the coordinator on port {port} of "
            f"--coordinator_address={address}: {e.strerror}.\nFix: pick a free port "
            "(the same on every process), or stop what is using it.") from None


def _wait_for_coordinator(address: str, host: str, port: int, process_id: int,
                          num_processes: int, timeout: float) -> None:
  """Polls until something accepts TCP connections at address, or times out."""
  deadline = time.monotonic() + timeout
  error = "no answer"
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(5.0, timeout)):
        return
    except OSError as e:  # Refused, unresolvable (yet), unreachable: retry.
      error = e.strerror or str(e)
    if time.monotonic() + _PROBE_INTERVAL_S > deadline:
      raise ConfigError(
          f"Process {process_id} of {num_processes} could not reach the coordinator at "
          f"{address}: timed out after {timeout} s (--initialization_timeout; last "
          f"error: {error}).\nFix: start process 0 (it runs the coordinator) first or "
          "at the same time; check that --coordinator_address is process 0's host "
          "and port, reachable from this host; or raise --initialization_timeout.")
    time.sleep(_PROBE_INTERVAL_S)


def _initialize_before(init, timeout: float, message: str) -> None:
  """Runs init(); if it has not returned after `timeout` s, prints `message` in the
  CLI's error format and exits with code 1.

  JAX's client gives up a few seconds after its own deadline by aborting the process
  (exit 134, C++ stack trace); the watchdog ends it first, with a message that names
  the fix. The client call releases the GIL, so the timer thread runs meanwhile.
  """
  done = threading.Event()

  def expire():
    if not done.is_set():
      print(f"sparse_jax: error: {message}", file=sys.stderr, flush=True)
      os._exit(1)  # pylint: disable=protected-access

  timer = threading.Timer(timeout, expire)
  timer.daemon = True
  timer.start()
  try:
    init()
  except (RuntimeError, ValueError, TypeError) as e:
    raise ConfigError(f"jax.distributed.initialize failed: {e}\nFix: check "
                      "--coordinator_address, --num_processes and --process_id.") from None
  finally:
    done.set()
    timer.cancel()


# ----------------------------------------------------------------------------- stopping
# When one process of a running job stops, the others cannot go on (every step needs
# all of them). A process that stops with an error of its own says so here first, so
# that the others can name it and its error at once; a process that is killed says
# nothing, and JAX's coordination service reports it (see sparse_jax/supervisor.py).
def _client():
  """The coordination service client of this job, or None (single process)."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return None
  # orbax's public accessor of JAX's client (JAX has none); orbax uses it for barriers.
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  try:
    return ocp.multihost.get_jax_distributed_client()
  except Exception:  # pylint: disable=broad-except
    return None


def meet(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process of the job has reached the point `name` (a barrier of
  the coordination service, used once per name); at once in a single process.

  Not a collective: on CPU a collective (gloo) gives up on a process that reaches it
  more than 30 s after the others ("Gloo context initialization failed:
  DEADLINE_EXCEEDED"), which a process that compiles for a minute while another finds
  its programs in the persistent cache does.
  """
  client = _client()
  if client is not None:
    client.wait_at_barrier(f"sparse_jax/{name}", timeout_s * 1000)


def announce_stop(message: str) -> None:
  """Tells the other processes that this one stops with `message` (an error of its own);
  the first announcement of a job wins. Never raises: the process is on its way out."""
  import jax  # pylint: disable=import-outside-toplevel
  client = _client()
  if client is None:
    return
  record = json.dumps({"process": jax.process_index(), "message": message})
  try:
    client.key_value_set(STOP_KEY, record)
  except Exception:  # pylint: disable=broad-except
    pass  # Another process announced first, or the coordinator is gone.


class StopWatcher:
  """A daemon thread that waits for another process's announce_stop and then calls
  `on_stop(process, message)` once (from that thread).

  It long-polls the coordination service (one request per second at most), whatever
  the main thread is blocked in: a collective that waits for the stopped process, or
  an orbax barrier. `close()` ends it before JAX's own shutdown at exit.
  """
  _POLL_MS = 1000

  def __init__(self, on_stop):
    import jax  # pylint: disable=import-outside-toplevel
    self._on_stop = on_stop
    self._me = jax.process_index()
    self._client = _client()
    self._closed = threading.Event()
    self._thread = None
    if self._client is not None:
      self._thread = threading.Thread(target=self._run, name="sparse_jax-stop-watcher",
                                      daemon=True)
      self._thread.start()

  def _run(self) -> None:
    while not self._closed.is_set():
      try:
        value = self._client.blocking_key_value_get(STOP_KEY, self._POLL_MS)
      except Exception as e:  # pylint: disable=broad-except
        if "DEADLINE_EXCEEDED" in str(e):
          continue  # Nobody stopped within this poll.
        return  # The coordinator is gone: the coordination service reports that.
      try:
        record = json.loads(value)
        process, message = int(record["process"]), str(record["message"])
      except (ValueError, KeyError, TypeError):
        return
      if process != self._me and not self._closed.is_set():
        self._on_stop(process, message)
      return

  def close(self, wait: bool = True) -> None:
    """Stops watching; with `wait`, until the thread has ended (at most one poll)."""
    self._closed.set()
    if (wait and self._thread is not None and
        self._thread is not threading.current_thread()):
      self._thread.join(timeout=2 * self._POLL_MS / 1000)
