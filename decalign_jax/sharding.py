"""Device mesh, shardings and batch placement.

`config.mesh` is a list of `(axis_name, size)` with at most one `-1`; the
batch is split along the 'data' axis (and 'fsdp' if present) and parameters
are replicated.
"""

import os
import re
from typing import Any, Literal, Sequence

import jax
import numpy as np

P = jax.sharding.PartitionSpec
DATA_AXES = ("data", "fsdp")


def make_mesh(axes: Sequence[tuple[str, int]],
              devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """Builds the mesh over all devices.

  Axis types are Explicit-free on purpose: we use `Auto` so that jit with
  NamedShardings lets XLA propagate shardings (jax.make_mesh defaults to
  Explicit axes in current JAX).

  Args:
    axes: e.g. `[("data", -1)]`.
    devices: default all devices.

  Returns:
    the mesh.
  """
  names = tuple(name for name, _ in axes)
  sizes = [int(size) for _, size in axes]
  devices = list(devices) if devices is not None else jax.devices()
  n = len(devices)
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
      axis_types=(jax.sharding.AxisType.Auto,) * len(names), devices=devices)


def data_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) axis split over the mesh's data axes."""
  axes = tuple(a for a in DATA_AXES if a in mesh.axis_names)
  return jax.sharding.NamedSharding(mesh, P(axes))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], size: int) -> P:
  """Shards the largest axis divisible by `size` over 'fsdp'."""
  best = None
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % size == 0 and shape[axis] >= size:
      best = axis
      break
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = "fsdp"
  return P(*spec)


def state_shardings(tree: Any, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, Literal["replicate", "fsdp"]]]
                    ) -> Any:
  """NamedShardings for a (possibly abstract) state by regex rules.

  Each leaf's '/'-joined path is matched against the rules in order (first
  full match wins; no match means replicate). "fsdp" shards the leaf's
  largest axis divisible by the mesh's 'fsdp' size, so parameters and their
  Adam moments are split the same way; XLA inserts the all-gathers.

  Args:
    tree: pytree of arrays or ShapeDtypeStructs.
    mesh: the mesh.
    rules: `[(regex, "replicate" | "fsdp"), ...]`.

  Returns:
    a pytree of NamedShardings with the structure of `tree`.
  """
  compiled = []
  for rx, strategy in rules:
    if strategy not in ("replicate", "fsdp"):
      raise ValueError(f"config.sharding_rules: unknown strategy "
                       f"{strategy!r} for {rx!r} (replicate | fsdp)")
    if strategy == "fsdp" and "fsdp" not in mesh.axis_names:
      raise ValueError("config.sharding_rules uses 'fsdp' but config.mesh "
                       f"has axes {mesh.axis_names}")
    compiled.append((re.compile(rx), strategy))

  def one(path, leaf):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(
        k, "idx", k)))) for k in path)
    for rx, strategy in compiled:
      if rx.fullmatch(name):
        if strategy == "fsdp":
          return jax.sharding.NamedSharding(
              mesh, _fsdp_spec(tuple(leaf.shape), mesh.shape["fsdp"]))
        break
    return jax.sharding.NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


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


def to_host(tree: Any) -> Any:
  """Numpy copies of replicated (or fully addressable) arrays.

  Works in multi-process runs, where a replicated global array is not fully
  addressable but every process holds a full copy.
  """
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.sharding.is_fully_replicated:
        raise ValueError("to_host needs replicated arrays in multi-process "
                         f"runs, got sharding {x.sharding}")
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize` when launched as several processes.

  Triggered by the environment the launchers set (JAX_COORDINATOR_ADDRESS
  with JAX_NUM_PROCESSES / JAX_PROCESS_ID), or by TPU/SLURM auto-detection
  when DECALIGN_DISTRIBUTED=1.
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    if os.environ.get("JAX_PLATFORMS") == "cpu":
      # Cross-process collectives on CPU need an implementation (loopback).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif os.environ.get("DECALIGN_DISTRIBUTED") == "1":
    jax.distributed.initialize()
