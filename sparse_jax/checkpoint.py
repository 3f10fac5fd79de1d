"""Orbax checkpoints of the train state in `<workdir>/checkpoints`.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames
it), so a run killed mid-save leaves the previous checkpoint intact and the next start
resumes from it. Restores take an abstract target whose leaves carry shardings, so each
device reads only its own shard.
"""
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` holding one item, the train state."""

  def __init__(self, workdir: str, *, save_every: int, keep: int = 3):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, create=True,
        enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores `step` (default: latest) into the structure/shardings of `abstract_state`."""
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves if `step` is on the save interval (or `force`); returns whether it saved."""
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force)

  def reached_preemption(self, step: int) -> bool:
    """True when a preemption signal was seen (multi-host safe); save and stop then."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `shapes` carrying `shardings` (a restore target)."""
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
