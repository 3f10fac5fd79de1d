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
"""
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` holding one item, the train state."""

  def __init__(self, workdir: str, *, save_every: int, keep: int = 3):
    self.directory = epath.Path(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, create=True,
        enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._terminated = threading.Event()
    self._previous_handler = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM,
                                             lambda *_: self._terminated.set())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, np.ndarray | None]:
    """Restores `step` (default: latest) into the structure/shardings of
    `abstract_state`; returns (state, data positions or None if none were saved)."""
    step = self.latest_step() if step is None else step
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data = (self.directory / str(step) / "data").exists()
    if has_data:
      items["data"] = ocp.args.StandardRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    data = np.asarray(restored["data"]["positions"]) if has_data else None
    return restored["state"], data

  def save(self, step: int, state: Any, *, data: np.ndarray | None = None,
           force: bool = False) -> bool:
    """Saves if `step` is on the save interval (or `force`); returns whether it saved.

    `data`: the input positions of all processes (identical on every process).
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data is not None:
      items["data"] = ocp.args.StandardSave({"positions": np.asarray(data, np.int64)})
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def reached_preemption(self, step: int) -> bool:
    """True when a preemption signal was seen (multi-host safe) or, in a single
    process, SIGTERM arrived; save and stop then."""
    return self._terminated.is_set() or self._manager.reached_preemption(step)

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
