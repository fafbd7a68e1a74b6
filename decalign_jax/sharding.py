"""Device mesh, shardings and batch placement.

`config.mesh` is a list of `(axis_name, size)` with at most one `-1`; the
batch is split along the 'data' axis (and 'fsdp' if present) and parameters
are replicated.
"""

import os
from typing import Any, Sequence

import jax
import numpy as np

P = jax.sharding.PartitionSpec
DATA_AXES = ("data", "fsdp")


def make_mesh(axes: Sequence[tuple[str, int]]) -> jax.sharding.Mesh:
  """Builds the mesh over all devices.

  Axis types are Explicit-free on purpose: we use `Auto` so that jit with
  NamedShardings lets XLA propagate shardings (jax.make_mesh defaults to
  Explicit axes in current JAX).

  Args:
    axes: e.g. `[("data", -1)]`.

  Returns:
    the mesh.
  """
  names = tuple(name for name, _ in axes)
  sizes = [int(size) for _, size in axes]
  n = jax.device_count()
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={list(axes)}: at most one -1 axis")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise ValueError(f"config.mesh={list(axes)} does not divide "
                       f"{n} devices")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(f"config.mesh={list(axes)} needs {np.prod(sizes)} "
                     f"devices, have {n}")
  return jax.make_mesh(
      tuple(sizes), names,
      axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def data_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) axis split over the mesh's data axes."""
  axes = tuple(a for a in DATA_AXES if a in mesh.axis_names)
  return jax.sharding.NamedSharding(mesh, P(axes))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, P())


def put_batch(batch: dict[str, Any], sharding: jax.sharding.NamedSharding
              ) -> dict[str, jax.Array]:
  """Assembles a global batch from this process's slice of it.

  Non-numeric entries (ids, strings) are dropped.
  """
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in batch.items()
      if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"
  }


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize` when launched as several processes.

  Triggered by the environment the launchers set (JAX_COORDINATOR_ADDRESS
  with JAX_NUM_PROCESSES / JAX_PROCESS_ID), or by TPU/SLURM auto-detection
  when DECALIGN_DISTRIBUTED=1.
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif os.environ.get("DECALIGN_DISTRIBUTED") == "1":
    jax.distributed.initialize()
