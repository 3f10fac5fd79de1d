"""Orbax checkpoints of the train state in `<workdir>/checkpoints`.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames
it), so a run killed mid-save leaves the previous checkpoint intact and the next start
resumes from it. Restores take an abstract target whose leaves carry shardings, so each
device reads only its own shard.

Preemption: on a multi-host slice orbax's preemption sync point tells every process
to save at the same step; a single process also saves and stops on SIGTERM (the
signal a preempted VM or `kill` sends), so rerunning resumes where it stopped.

A checkpoint may hold a second item, `data`: the input pipeline's position of every
process (int64 [processes, k]), so a resumed run reads exactly the examples an
uninterrupted one would have, without re-reading what came before.

Damage: orbax stores raw array bytes without checksums, so a flipped byte restores
silently as a wrong weight. Each checkpoint therefore also holds `checksums`, two
32-bit sums per leaf of the state (computed on device, so sharded multi-host states
need no gather); restore recomputes them and raises DamagedCheckpointError on any
difference, as it does when orbax cannot read the step at all.
"""
import signal
import sys
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sparse_jax.errors import ConfigError


class DamagedCheckpointError(ConfigError):
  """A checkpoint that cannot be read, or whose contents fail their checksums."""


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as a flat uint32 vector (16- and 8-bit types zero-extended)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  bits = x.dtype.itemsize * 8
  if x.dtype == jnp.bool_:
    return x.reshape(-1).astype(jnp.uint32)
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}.get(bits)
  if unsigned is None:  # 64-bit leaves: two words each.
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  return jax.lax.bitcast_convert_type(x, unsigned).reshape(-1).astype(jnp.uint32)


@jax.jit
def _leaf_checksums(tree: Any) -> jax.Array:
  """[leaves, 2] uint32: the wrapping sum of each leaf's words, and the sum weighted by
  position (so that moved or swapped values count too)."""
  rows = []
  for leaf in jax.tree.leaves(tree):
    w = _words(leaf)
    position = jnp.arange(1, w.size + 1, dtype=jnp.uint32)
    rows.append(jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                           jnp.sum(w * position, dtype=jnp.uint32)]))
  return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.uint32)


def _ignore_closed_loop_callbacks() -> Callable[[Any], None]:
  """Drops 'Event loop is closed' unraisable exceptions; returns the previous hook.

  When a restore fails, tensorstore still completes the reads that were in flight and
  calls back into orbax's event loop, closed by then; each call would print such a
  traceback around our error message. Only those are dropped."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (unraisable.exc_type is RuntimeError and
            str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)
  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook
  return previous


def damaged_checkpoint(step_dir: epath.Path, why: str, fix: str
                       ) -> DamagedCheckpointError:
  """The error for a damaged checkpoint step: which, why, and `fix`."""
  return DamagedCheckpointError(f"Checkpoint {step_dir} is damaged: {why}. Nothing was "
                                f"restored or changed.\nFix: {fix}.")


def check_checksums(step_dir: epath.Path, tree: Any, expected: list, fix: str) -> None:
  """DamagedCheckpointError unless `tree`'s leaves have the `expected` checksums."""
  actual = state_checksums(tree)
  bad = [i for i, (a, b) in enumerate(zip(actual, expected)) if a != b]
  if bad or len(actual) != len(expected):
    names = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(tree)[0]]
    shown = ", ".join(names[i] for i in bad[:3]) or "the number of arrays"
    raise damaged_checkpoint(step_dir, f"its contents fail their checksums ({shown}"
                             f"{', ...' if len(bad) > 3 else ''})", fix)


def read_failure(error: Exception) -> str:
  """'Type: first line' of an orbax/tensorstore read error, cut to a readable length."""
  first = (str(error).strip().splitlines() or [""])[0]
  return f"{type(error).__name__}: {first[:240]}{'...' if len(first) > 240 else ''}"


def restore_or_fail(manager: ocp.CheckpointManager, step: int, items: dict[str, Any],
                    step_dir: epath.Path, fix: str) -> Any:
  """`manager.restore(step, Composite(**items))`, or DamagedCheckpointError naming
  `step_dir` and `fix` when orbax cannot read it (any failure to read is damage, or a
  foreign file, in that step)."""
  previous_hook = _ignore_closed_loop_callbacks()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except
    # (The filter stays: reads in flight keep failing until the process exits.)
    raise damaged_checkpoint(step_dir, f"orbax cannot read it ({read_failure(e)})",
                             fix) from None
  sys.unraisablehook = previous_hook
  return restored


def state_checksums(state: Any) -> list[list[int]]:
  """Two 32-bit checksums per leaf of `state` (see the module docstring)."""
  return np.asarray(jax.device_get(_leaf_checksums(state))).tolist()


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` holding one item, the train state."""

  def __init__(self, workdir: str, *, save_every: int, keep: int = 3):
    self.directory = epath.Path(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, create=True,
        enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    # A save that fails (a full disk) leaves tensorstore's writes in flight calling back
    # into orbax's closed event loop, one traceback each, after the run's own message.
    if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
      _ignore_closed_loop_callbacks()
    self._terminated = threading.Event()
    self._previous_handler = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM,
                                             lambda *_: self._terminated.set())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None; in a multi-process run the same
    on every process (a collective), or DamagedCheckpointError naming what each saw.

    Each process lists the shared directory itself; were one to see another step (a
    workdir that is not shared, a file system that shows a save late), it would
    restore other weights than the rest, and nothing else would notice.
    """
    step = self._manager.latest_step()
    if jax.process_count() == 1:
      return step
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    seen = np.asarray(multihost_utils.process_allgather(
        np.int32(-1 if step is None else step))).reshape(-1).tolist()
    if len(set(seen)) > 1:
      shown = ", ".join(f"process {i}: {'none' if s < 0 else f'step {s}'}"
                        for i, s in enumerate(seen))
      raise DamagedCheckpointError(
          f"The processes see different latest checkpoints in {self.directory} "
          f"({shown}).\nFix: pass every process the same --workdir on a file system "
          "they all share (gs:// on Cloud TPU), then run the command again.")
    return step

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, np.ndarray | None]:
    """Restores `step` (default: latest) into the structure/shardings of
    `abstract_state`; returns (state, data positions or None if none were saved).

    Raises DamagedCheckpointError when the step cannot be read or its contents differ
    from the checksums saved with it (checkpoints saved before checksums existed are
    restored unchecked).
    """
    step = self.latest_step() if step is None else step
    step_dir = self.directory / str(step)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data = (step_dir / "data").exists()
    has_checksums = (step_dir / "checksums").exists()
    if has_data:
      items["data"] = ocp.args.StandardRestore()
    if has_checksums:
      items["checksums"] = ocp.args.JsonRestore()
    restored = restore_or_fail(self._manager, step, items, step_dir, self._fix(step))
    if has_checksums:
      check_checksums(step_dir, restored["state"], restored["checksums"]["leaves"],
                      self._fix(step))
    data = np.asarray(restored["data"]["positions"]) if has_data else None
    return restored["state"], data

  def _fix(self, step: int) -> str:
    """Move the damaged step aside: the run resumes from the one before."""
    others = [s for s in self._manager.all_steps() if s != step]
    aside = self.directory.parent / f"damaged_checkpoint_{step}"
    then = (f"the run then resumes from step {max(others)}" if others else
            "the run then starts from scratch")
    return (f"move it aside (mv {self.directory / str(step)} {aside}); {then}. Or "
            "restore that directory from a backup")

  def save(self, step: int, state: Any, *, data: np.ndarray | None = None,
           force: bool = False) -> bool:
    """Saves if `step` is on the save interval (or `force`); returns whether it saved.

    `data`: the input positions of all processes (identical on every process).
    """
    if not (force or self._manager.should_save(step)):
      return False
    items = {"state": ocp.args.StandardSave(state),
             "checksums": ocp.args.JsonSave({"leaves": state_checksums(state)})}
    if data is not None:
      items["data"] = ocp.args.StandardSave({"positions": np.asarray(data, np.int64)})
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def reached_preemption(self, step: int) -> bool:
    """True when a preemption signal was seen (multi-host safe) or, in a single
    process, SIGTERM arrived; save and stop then."""
    return self._terminated.is_set() or self._manager.reached_preemption(step)

  def raise_failed_save(self) -> None:
    """Raises the error of an asynchronous save that has failed in the background (a
    full disk), if any, so the run stops at the next step rather than at the next save
    or at its end. Does not wait for a save still going."""
    # orbax keeps the save's thread privately and offers only a blocking wait, which
    # re-raises its error: it is called once the thread has ended with one.
    finalize = getattr(self._manager, "_finalize_thread", None)
    failed = finalize is not None and finalize.map(
        lambda t: t is not None and not t.is_alive() and t.exception is not None)
    if failed:
      self._manager.wait_until_finished()

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


def export_params(directory: epath.Path, params: Any) -> None:
  """Writes plain params (e.g. LoRA merged) as an orbax checkpoint at `directory`,
  replacing an older export; restore with `ocp.StandardCheckpointer().restore(dir)`."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, params, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `shapes` carrying `shardings` (a restore target)."""
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def latest_complete_step(workdir: str) -> tuple[int | None, str]:
  """(the newest complete checkpoint step in `workdir`, or None; its checkpoints
  directory): the step a rerun resumes from. A save that was cut short (a process
  killed before every process wrote its part) is not complete: orbax only finalizes a
  step (renames its temporary directory, or writes its commit file on GCS) after all
  processes have written, and skips unfinalized ones when it restores."""
  directory = epath.Path(workdir) / "checkpoints"
  steps = ocp.path.step.checkpoint_steps(directory)
  return (max(steps) if steps else None), str(directory)
