"""Orbax checkpoints of the train state in `<workdir>/checkpoints`.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames
it), so a run killed mid-save leaves the previous checkpoint intact and the next start
resumes from it. Restores take an abstract target whose leaves carry shardings, so each
device reads only its own shard.

A checkpoint may hold a second item, `data`: the input pipeline's position of every
process (int64 [processes, k]), so a resumed run reads exactly the examples an
uninterrupted one would have, without re-reading what came before.
"""
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


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

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, np.ndarray | None]:
    """Restores `step` (default: latest) into the structure/shardings of
    `abstract_state`; returns (state, data positions or None if none were saved)."""
    step = self.latest_step() if step is None else step
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data = (epath.Path(self.directory) / str(step) / "data").exists()
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
