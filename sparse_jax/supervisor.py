"""Multi-process runs: when one process of the job stops, the others end with one
clear message and exit code 75, instead of JAX's abort.

Why a second process. A multi-process job cannot go on without any of its processes:
every step's collectives need all of them. When one dies, JAX's coordination service
notices its missing heartbeats and ends every other process from C++ (LOG(FATAL) in
its client's error callback): exit code 134, a "Check failure stack trace" and a
"Fatal Python error: Aborted" dump of every thread, with the one useful sentence in
the middle. JAX 0.10 has no public way to replace that callback, and once it fires no
Python code of the dying process runs. So in a multi-process run,
`python -m sparse_jax.main` starts itself again as the worker (same arguments; this
module's `_CHANNEL_ENV` marks it) and stays a small supervisor that never starts a
JAX backend nor joins the job. It

* passes the worker's stdout through untouched and its stderr line by line, each line
  a second late, and holds back what follows (with the lines still waiting) once the
  worker says that another process is gone, or once a line shows that the
  coordination service declared one dead (JAX's "Terminating process because the JAX
  distributed service detected fatal errors", a barrier's "heartbeat timeout"): saved
  to a file that the message names;
* learns from the worker, over a pipe, which process of how many it is, which other
  process announced an error of its own (distributed.announce_stop, read by the
  worker's distributed.StopWatcher), and this process's own final error (printed
  last, even if JAX aborts the worker after it as the others stop);
* when the worker ends because another process stopped, prints the two-line message:
  which process stopped (and its error, if it said one; else from the coordination
  service's report), the last complete checkpoint step, and the command that resumes;
  and exits with EXIT_PEER_STOPPED (75, EX_TEMPFAIL of sysexits.h: "temporary failure,
  retry"), which launch scripts and schedulers can tell from a bug (1: the process's
  own error, 134 or a traceback: a crash);
* forwards SIGTERM and SIGHUP to the worker (a preemption notice still reaches the
  training loop), and ignores SIGINT, which a terminal sends to both; if the supervisor
  itself is killed (kill -9), Linux kills the worker with it (PR_SET_PDEATHSIG).

Every other outcome (finished, preempted, the worker's own error, a crash) passes
through with the worker's exit code and all of its output.
"""
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time

EXIT_PEER_STOPPED = 75
_CHANNEL_ENV = "SPARSE_JAX_SUPERVISOR_FD"
# JAX's client prints this first line of its abort when the coordination service
# reports that another task died (or that the coordinator is gone).
_JAX_FATAL = "JAX distributed service detected fatal errors"
_TAIL_BYTES = 256 * 1024  # Of the worker's stderr, kept to read JAX's report from.


# ----------------------------------------------------------------------------- worker side
class Channel:
  """The worker's end of the pipe to its supervisor (a no-op without a supervisor)."""

  def __init__(self, fd: int | None):
    self.fd = fd

  @classmethod
  def from_environment(cls) -> "Channel":
    """The channel the supervisor passed down, taken out of the environment (so that
    programs this worker starts do not write into it)."""
    value = os.environ.pop(_CHANNEL_ENV, None)
    if value is None or not value.isdigit():
      return cls(None)
    fd = int(value)
    try:
      os.set_inheritable(fd, False)
    except OSError:
      return cls(None)
    return cls(fd)

  @property
  def supervised(self) -> bool:
    return self.fd is not None

  def report(self, event: str, **fields) -> None:
    """Sends one event (a JSON line) to the supervisor; never raises."""
    if self.fd is None:
      return
    data = (json.dumps({"event": event, **fields}) + "\n").encode()
    try:
      while data:
        data = data[os.write(self.fd, data):]
    except OSError:
      pass  # The supervisor is gone: nothing to tell.


# ----------------------------------------------------------------------------- supervisor
def _die_with_parent(parent: int) -> None:
  """In the worker, before exec: Linux sends it SIGKILL when the supervisor dies."""
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
  except (OSError, AttributeError):
    pass  # Not Linux: a killed supervisor leaves the worker to its coordination service.
  if os.getppid() != parent:  # The supervisor died before the call above.
    os._exit(1)  # pylint: disable=protected-access


class _Relay:
  """Copies the worker's stderr to ours line by line ('\\n' or '\\r' ends one, for
  progress bars), each line DELAY_S late: when a line shows that the job is breaking
  up (JAX's abort, a barrier failed on a heartbeat timeout), the lines still waiting
  (orbax's traceback of that failed barrier, say) are held back with everything after.
  """
  DELAY_S = 1.0
  # Lines that only appear once the coordination service has declared a process dead.
  TRIGGERS = (_JAX_FATAL, "heartbeat timeout", "stopped sending heartbeats",
              "Failed to send RPC to coordination service")

  def __init__(self):
    self.holding = False
    self.held: list[bytes] = []
    self.tail = b""
    self._waiting: list[tuple[float, bytes]] = []
    self._partial = b""
    self._partial_since = 0.0

  def feed(self, data: bytes) -> None:
    if not self._partial:
      self._partial_since = time.monotonic()
    self._partial += data
    while True:
      ends = [i for i in (self._partial.find(b"\n"), self._partial.find(b"\r")) if i >= 0]
      if not ends:
        return
      cut = min(ends) + 1
      line, self._partial = self._partial[:cut], self._partial[cut:]
      self._partial_since = time.monotonic()
      self._line(line)

  def _line(self, line: bytes) -> None:
    self.tail = (self.tail + line)[-_TAIL_BYTES:]
    if not self.holding and any(t.encode() in line for t in self.TRIGGERS):
      self.hold()
    if self.holding:
      self.held.append(line)
    else:
      self._waiting.append((time.monotonic(), line))

  def pump(self, final: bool = False) -> None:
    """Sends the lines that have waited DELAY_S (all of them when `final`), and an
    unfinished line that has waited as long (a prompt, a progress bar)."""
    now = time.monotonic()
    if self._partial and (final or now - self._partial_since > self.DELAY_S):
      line, self._partial = self._partial, b""
      self._line(line)
    while self._waiting and (final or now - self._waiting[0][0] > self.DELAY_S):
      _write_stderr(self._waiting.pop(0)[1])

  def hold(self) -> None:
    """Holds back every line not sent yet, and all that follow."""
    self.holding = True
    self.held.extend(line for _, line in self._waiting)
    self._waiting = []

  def send_waiting(self) -> None:
    """Sends the lines not sent yet at once (they came before something final)."""
    while self._waiting:
      _write_stderr(self._waiting.pop(0)[1])

  def release(self) -> None:
    """What was held back goes out after all (an outcome with no message of ours)."""
    self.pump(final=True)
    for line in self.held:
      _write_stderr(line)
    self.held = []

  def save_held(self) -> str | None:
    """Writes what was held back to a file; its path (None if nothing was held)."""
    if not self.held:
      return None
    fd, path = tempfile.mkstemp(prefix=f"sparse_jax_stopped_{os.getpid()}_",
                                suffix=".log")
    with os.fdopen(fd, "wb") as f:
      f.writelines(self.held)
    return path


def _write_stderr(data: bytes) -> None:
  try:
    os.write(2, data)
  except OSError:
    pass


def supervise(workdir: str) -> int:
  """Runs this command again as the worker, relays its output, and returns the exit
  code for this process (the worker's, or EXIT_PEER_STOPPED with the message printed
  when another process of the job stopped)."""
  read_end, write_end = os.pipe()
  env = dict(os.environ)
  env[_CHANNEL_ENV] = str(write_end)
  command = [sys.executable, "-m", "sparse_jax.main", *sys.argv[1:]]
  parent = os.getpid()
  sys.stderr.flush()
  worker = subprocess.Popen(command, env=env, stderr=subprocess.PIPE,
                            pass_fds=(write_end,),
                            preexec_fn=lambda: _die_with_parent(parent))
  os.close(write_end)

  def forward(signum, _frame):
    if worker.poll() is None:
      worker.send_signal(signum)
  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGHUP, forward)
  # A terminal's Ctrl-C reaches the worker directly (same process group). A handler,
  # not SIG_IGN, so that nothing is inherited by a later exec.
  signal.signal(signal.SIGINT, lambda *_: None)

  relay, events = _Relay(), []
  err = worker.stderr.fileno()
  open_fds, pending = {err, read_end}, b""
  worker_done_at = None
  while open_fds:
    try:
      ready, _, _ = select.select(list(open_fds), [], [], 0.2)
    except InterruptedError:
      continue
    # Output first: an event then decides about the lines that came before it (and
    # are still waiting: _Relay.DELAY_S).
    for fd in sorted(ready, key=lambda fd: fd == read_end):
      data = os.read(fd, 65536)
      if not data:
        open_fds.discard(fd)
      elif fd == read_end:
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
          event = _parse_event(line)
          if event is None:
            continue
          events.append(event)
          if event["event"] in ("peer_stopped", "peer_lost"):
            relay.hold()
          elif event["event"] == "own_error":
            relay.send_waiting()  # Output from before the error is the run's own.
            relay.hold()  # After it (JAX's abort as the others stop), noise.
      else:
        relay.feed(data)
    relay.pump()
    # Programs the worker started may keep its stderr open after it ended: stop
    # reading a second after its exit.
    if worker.poll() is not None:
      worker_done_at = worker_done_at or time.monotonic()
      if time.monotonic() - worker_done_at > 1.0:
        break
  relay.pump(final=True)
  os.close(read_end)
  code = worker.wait()
  return _outcome(code, events, relay, workdir)


def _parse_event(line: bytes) -> dict | None:
  try:
    event = json.loads(line)
  except ValueError:
    return None
  return event if isinstance(event, dict) and "event" in event else None


def stopped_by_jax(report: str, me: int | None = None) -> list[int]:
  """The processes that JAX's coordination service reported dead in `report` (the
  text of its abort), without `me`."""
  found = set()
  # "The following tasks are unhealthy (stopped sending heartbeats):\n1\nThe tasks..."
  listed = re.search(r"stopped sending heartbeats\):\s*((?:\d+[\s,]*)+)", report)
  if listed:
    found |= {int(x) for x in re.findall(r"\d+", listed.group(1))}
  found |= {int(x) for x in re.findall(r"\bTask (\d+) heartbeat timeout", report)}
  found.discard(me)
  return sorted(found)


def _coordinator_lost(report: str) -> bool:
  """Whether JAX's abort says that this process lost the coordinator (process 0)."""
  return bool(re.search(r"(?i)(heartbeat to (the )?coordinat|coordination service.*"
                        r"(unavailable|shut ?down|not reachable)|Failed to send RPC to "
                        r"coordination service|connect(ion)? to (the )?coordinat)", report))


def _last_checkpoint(workdir: str) -> tuple[int | None, str]:
  """(the newest complete checkpoint step or None, the checkpoints directory), as a
  resume will find it."""
  if "://" not in workdir:
    # On a local or mounted file system orbax finalizes a step by renaming its
    # temporary directory ('16.orbax-checkpoint-tmp-...') to the bare step: listing
    # the names is its own test, without importing JAX and orbax (4 s on a busy VM).
    directory = os.path.join(workdir, "checkpoints")
    try:
      names = os.listdir(directory)
    except FileNotFoundError:
      names = []
    steps = [int(n) for n in names
             if n.isdigit() and os.path.isdir(os.path.join(directory, n))]
    return (max(steps) if steps else None), directory
  # Elsewhere (gs://) a commit file marks the step: orbax's own check.
  from sparse_jax import checkpoint  # pylint: disable=import-outside-toplevel
  return checkpoint.latest_complete_step(workdir)


def _outcome(code: int, events: list[dict], relay: _Relay, workdir: str) -> int:
  """The supervisor's exit code; prints the message when another process stopped."""
  joined = next((e for e in reversed(events) if e["event"] == "joined"), None)
  stopped = next((e for e in events if e["event"] == "peer_stopped"), None)
  lost = next((e for e in events if e["event"] == "peer_lost"), None)
  report = relay.tail.decode(errors="replace")
  jax_fatal = _JAX_FATAL in report
  peer = bool(stopped or lost or jax_fatal)
  killed = code == -signal.SIGKILL
  shell_code = code if code >= 0 else 128 - code  # As a shell reports a signal.
  own = next((e for e in events if e["event"] == "own_error"), None)
  if own is not None:
    # This process stopped with its own error; JAX may have aborted it after that, as
    # the others stopped (what it printed then is dropped): its error is what counts.
    _write_stderr(own["text"].encode())
    return 1
  if code == 0 or joined is None or not (peer or killed):
    relay.release()  # Finished, preempted, its own error, a crash, or no job formed.
    return shell_code
  me, count = int(joined["process"]), int(joined["count"])
  details = relay.save_held()
  if peer:
    why, fix_first = _peer_story(stopped, lost, report, me, count)
  else:  # Only this process's worker was killed (kill -9, the out-of-memory killer).
    why = (f"The worker of process {me} of {count} was killed (SIGKILL: kill -9, or the "
           "out-of-memory killer); the other processes stop within a minute.")
    fix_first = "if it ran out of memory, give it more or lower the batch per device"
  try:
    step, directory = _last_checkpoint(workdir)
    where = (f"The last complete checkpoint is step {step} in {directory}." if step is
             not None else f"No checkpoint is complete yet in {directory}.")
    resume = (f"it resumes from step {step}" if step is not None else
              "it starts from the beginning")
  except Exception as e:  # pylint: disable=broad-except
    # Unreadable from here (a bucket without credentials on this host, say).
    where = f"The checkpoints in {workdir} could not be listed here ({e})."
    resume = "it resumes from the last complete checkpoint"
  if details:
    where += f" (What JAX printed: {details}.)"
  command = shlex.join(getattr(sys, "orig_argv", sys.argv))
  print(f"sparse_jax: error: {why} {where}\n"
        f"Fix: {fix_first}; then run the same command again on every host, all {count} "
        f"processes ({resume}); here it was: {command}", file=sys.stderr, flush=True)
  return EXIT_PEER_STOPPED if peer else shell_code


def _peer_story(stopped, lost, report: str, me: int, count: int) -> tuple[str, str]:
  """(what happened, the first part of the fix) when another process stopped."""
  if stopped:
    other = int(stopped["process"])
    lines = str(stopped["message"]).strip().splitlines() or [""]
    problem = lines[0].rstrip(".")
    fix = next((l[len("Fix:"):].strip() for l in lines if l.startswith("Fix:")), "")
    why = (f"Process {other} of {count} stopped with an error of its own ({problem}), "
           f"so process {me} stopped too.")
    return why, (f"on process {other}'s host, {fix.rstrip('.')}" if fix else
                 f"see process {other}'s output for its error")
  others = stopped_by_jax(report, me)
  if others:
    names = ", ".join(str(p) for p in others)
    noun = "Process" if len(others) == 1 else "Processes"
    why = (f"{noun} {names} of {count} stopped without a word (JAX's coordination service "
           "lost its heartbeat: killed, crashed, or its host failed), so process "
           f"{me} stopped too.")
    return why, f"see why in process {names}'s output or its host's logs"
  if me != 0 and _coordinator_lost(report):
    why = (f"Process 0 of {count}, which runs the coordinator, stopped or cannot be "
           f"reached (JAX's coordination service is gone), so process {me} stopped too.")
    return why, "see why in process 0's output or its host's logs"
  error = f" ({lost['error']})" if lost and lost.get("error") else ""
  why = (f"Another process of the {count} stopped: a collective operation with it "
         f"failed{error}, and JAX did not say which process it was; process {me} "
         "stopped too.")
  return why, "look for the process whose output ends differently"


# ----------------------------------------------------------------------------- worker side
# Signs, in an error raised by a collective or a barrier, that another process is gone
# (gloo's broken connections, the coordination service's failed barriers).
_PEER_SIGNS = ("gloo", "connection reset", "connection closed", "broken pipe",
               "socket closed", "heartbeat", "barrier", "coordination service",
               "unavailable", "deadline_exceeded", "timed out while waiting")
_LINGER_S = 2.0  # Process 0 runs the coordinator: it stays while the others read.


class Worker:
  """The worker's part in a multi-process job, from the moment the job formed.

  It tells the supervisor who it is, watches for another process's announcement that
  it stopped with an error (then ends at once, exit 75), and decides how this process
  ends when training raises: its own error is announced to the others before the
  two-line message (exit 1); an error that says another process is gone waits for the
  coordination service to name it (JAX then aborts this process and the supervisor
  words it), or for an announcement, up to twice the heartbeat timeout.

  It leaves without JAX's shutdown at exit: that waits (up to 5 minutes) at a barrier
  for every process, including the stopped one.
  """

  def __init__(self, channel: Channel, heartbeat_timeout: int):
    import jax  # pylint: disable=import-outside-toplevel
    from sparse_jax import distributed  # pylint: disable=import-outside-toplevel
    self._distributed = distributed
    self.channel = channel
    self.heartbeat_timeout = heartbeat_timeout
    self.process, self.count = jax.process_index(), jax.process_count()
    channel.report("joined", process=self.process, count=self.count)
    self.watcher = distributed.StopWatcher(self._peer_stopped)
    # atexit runs last-in first-out: this runs before JAX's shutdown (registered when
    # jax was imported), which must not find the watcher waiting on the service.
    import atexit  # pylint: disable=import-outside-toplevel
    atexit.register(self.watcher.close)

  def _peer_stopped(self, process: int, message: str) -> None:
    """Another process announced its error: end now (from the watcher's thread)."""
    self.channel.report("peer_stopped", process=process, message=message)
    if not self.channel.supervised:
      first = (message.strip().splitlines() or [""])[0]
      print(f"sparse_jax: error: Process {process} of {self.count} stopped with an error "
            f"of its own ({first}), so process {self.process} stopped too.\nFix: fix "
            "that error, then run the same command again on every host.",
            file=sys.stderr)
    if self.process == 0 and self.count > 2:
      time.sleep(_LINGER_S)  # Others may not have read the announcement yet.
    _hard_exit(EXIT_PEER_STOPPED)

  def stop_with_error(self, message: str) -> None:
    """This process's own error: announce it, print it (two lines), exit 1."""
    self.watcher.close(wait=False)
    import gc  # pylint: disable=import-outside-toplevel
    gc.collect()  # As cli.fail: failed orbax futures complain when collected.
    self._last_words(f"sparse_jax: error: {message}\n")
    self._distributed.announce_stop(message)
    self._linger()
    _hard_exit(1)

  def _last_words(self, text: str) -> None:
    """This process's own error, said before the others learn of it: once they stop,
    JAX may abort this process too (the coordinator gone), and the supervisor must
    still end with this text, not with that abort."""
    if self.channel.supervised:
      self.channel.report("own_error", text=text)
    else:
      sys.stderr.write(text)
      sys.stderr.flush()

  def stop_after_exception(self, error: BaseException) -> None:
    """An unexpected exception: another process gone, or a bug of this process."""
    if not looks_like_lost_peer(error):
      self.watcher.close(wait=False)
      import traceback  # pylint: disable=import-outside-toplevel
      self._last_words("".join(traceback.format_exception(error)))
      first = (str(error).strip().splitlines() or [""])[0][:300]
      self._distributed.announce_stop(
          f"{type(error).__name__}: {first}\nFix: see the traceback in process "
          f"{self.process}'s output.")
      self._linger()
      _hard_exit(1)
    first = (str(error).strip().splitlines() or [""])[0][:300]
    self.channel.report("peer_lost", error=f"{type(error).__name__}: {first}")
    # JAX's abort (the coordination service names the process) or the watcher's exit
    # normally ends this process meanwhile.
    time.sleep(2 * self.heartbeat_timeout + 10)
    # Neither came: the whole error, for the file the supervisor's message names.
    import traceback  # pylint: disable=import-outside-toplevel
    traceback.print_exception(error)
    sys.stderr.flush()
    if not self.channel.supervised:
      print(f"sparse_jax: error: A collective operation with the other processes failed "
            f"({first}); another process stopped.\nFix: find the process whose output "
            "ends differently, then run the same command again on every host.",
            file=sys.stderr)
    _hard_exit(EXIT_PEER_STOPPED)

  def _linger(self) -> None:
    if self.process == 0:
      time.sleep(_LINGER_S)


def looks_like_lost_peer(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from (orbax's TimeoutError from a
  failed barrier), is a failed collective or barrier. Only explicit causes count: an
  error raised while handling another (a NameError in an except block) is a bug of
  this process, whatever it was handling."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    kind = type(error).__name__
    if kind in ("JaxRuntimeError", "XlaRuntimeError", "TimeoutError"):
      text = str(error).lower()
      if "resource_exhausted" not in text and any(s in text for s in _PEER_SIGNS):
        return True
    error = error.__cause__
  return False


def _hard_exit(code: int) -> None:
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(code)  # pylint: disable=protected-access
