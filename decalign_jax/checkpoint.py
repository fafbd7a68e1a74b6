"""Orbax checkpoints: the latest state (for resume) and the best one.

Each checkpoint holds the `TrainState` and a small JSON `meta` record of the
host-side loop state (epoch, best score, early-stopping counters, history).
"""

import hashlib
import os
from typing import Any, Literal

import jax
import orbax.checkpoint as ocp


def make_manager(directory: str, *,
                 best_mode: Literal["min", "max"] | None = None
                 ) -> ocp.CheckpointManager:
  """A manager keeping one checkpoint: the latest, or the best by `score`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True,
      best_fn=(lambda m: m["score"]) if best_mode else None,
      best_mode=best_mode or "max",
      # The latest and best managers save the same step, and across
      # processes orbax keys its async-commit barriers by step: without a
      # prefix per directory the two saves collide ("Barrier ... is already
      # ongoing"). The path as given (same flag on every host), not abspath.
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=hashlib.sha1(
              directory.encode()).hexdigest()[:16]))
  return ocp.CheckpointManager(_absolute(directory), options=options)


def _absolute(directory: str) -> str:
  """Local paths made absolute; URLs (`gs://bucket/run`) kept as given."""
  return directory if "://" in directory else os.path.abspath(directory)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         meta: dict[str, Any], score: float | None = None) -> None:
  """Saves `state` and `meta` at `step` (asynchronously)."""
  manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(meta)),
      metrics=None if score is None else {"score": score})


def restore(manager: ocp.CheckpointManager, target: Any,
            step: int | None = None) -> tuple[Any, dict[str, Any]]:
  """Restores the state into the (abstract, sharded) `target` and the meta.

  Args:
    manager: the manager.
    target: a state pytree or `jax.ShapeDtypeStruct`s with shardings.
    step: which step; default the latest.

  Returns:
    `(state, meta)`.
  """
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  out = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                    meta=ocp.args.JsonRestore()))
  return out["state"], out["meta"]
