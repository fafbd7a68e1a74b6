"""Compiling a run's programs in a child process, so that training loads them.

On CPU, a process that compiled the MOSI train step runs it 30-50% slower
than a process that loaded the same executable from JAX's persistent
compilation cache: the compiler leaves glibc's heap fragmented and XLA:CPU's
small per-step allocations land in its cold holes (`runtime.py`). So, before
a run trains, `compile_in_child` starts

  python -m decalign_jax.precompile SPEC.pkl

which builds the run's task, state and steps as `train.run_one` does,
compiles them (`train.compile_steps`) into the cache and exits; the training
process then loads every one of them. `train.train_and_evaluate` calls it
when `config.runtime.compile_in_subprocess` is on (`skip_reason` says when
it does not apply).
"""

import dataclasses
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from decalign_jax.data import mmsa

log = logging.getLogger("decalign_jax.precompile")

# Set in the environment of the child.
_CHILD_ENV = "DECALIGN_JAX_COMPILE_CHILD"
# JAX settings that change the programs (or where they are cached): the child
# takes the parent's values, so that it stores what the parent will look up.
_JAX_SETTINGS = ("jax_threefry_partitionable", "jax_enable_x64",
                 "jax_default_matmul_precision", "jax_default_prng_impl",
                 "jax_compilation_cache_dir",
                 "jax_persistent_cache_min_entry_size_bytes")


def describe(report: dict[str, dict[str, Any]]) -> str:
  """One line for a `train.compile_steps` report."""
  how = {True: "loaded from the compilation cache", False: "compiled"}
  label = {"train": "train step", "eval": "eval step"}
  return "; ".join(
      f"{label.get(name, name)} {how[r['from_cache']]} in {r['seconds']:.1f} s"
      for name, r in report.items())


def skip_reason(config: ml_collections.ConfigDict) -> str | None:
  """Why `compile_in_child` would not run for `config`, or None if it would.

  It runs only where it helps: the CPU backend, one process (a child of one
  process of a multi-process job could not join the job's collectives) and
  the persistent compilation cache on (else the parent could not load).
  """
  if not config.runtime.get("compile_in_subprocess", False):
    return "config.runtime.compile_in_subprocess is off"
  if os.environ.get(_CHILD_ENV):
    return "this is the compiling child"
  if jax.process_count() != 1:
    return "several processes"
  if jax.default_backend() != "cpu":
    return f"the {jax.default_backend()} backend"
  if not jax.config.jax_compilation_cache_dir:
    return "the persistent compilation cache is off"
  return None


def first_rows(split: mmsa.Split, n: int) -> mmsa.Split:
  """The split's first `n` samples (every array field sliced)."""
  return dataclasses.replace(split, **{
      f.name: getattr(split, f.name)[:n] for f in dataclasses.fields(split)
      if isinstance(getattr(split, f.name), np.ndarray)})


def compile_in_child(config: ml_collections.ConfigDict,
                     splits: dict[str, mmsa.Split]) -> dict[str, Any] | None:
  """Compiles the run's programs into the persistent cache in a child.

  The child gets the config, this process's JAX settings and the first
  rows of each split (shapes and dtypes are all the programs depend on),
  not the dataset. A failed child costs only its time: the run then
  compiles in its own process, as without this.

  Args:
    config: the run config (the first seed's; seeds share the programs).
    splits: the loaded splits.

  Returns:
    `{"seconds": child wall time, "steps": the child's compile report}`, or
    None if skipped (`skip_reason`) or failed (logged).
  """
  reason = skip_reason(config)
  if reason is not None:
    log.debug("compiling in this process: %s", reason)
    return None
  rows = max(config.batch_size, config.eval.batch_size or 0)
  spec = {"config": config,
          "splits": {k: first_rows(v, rows) for k, v in splits.items()},
          "jax": {k: jax.config.values[k] for k in _JAX_SETTINGS
                  if k in jax.config.values}}
  package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, **{_CHILD_ENV: "1"})
  env["PYTHONPATH"] = os.pathsep.join(
      [package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="decalign_jax_compile_") as tmp:
    spec_path = os.path.join(tmp, "spec.pkl")
    with open(spec_path, "wb") as f:
      pickle.dump(spec, f)
    proc = subprocess.run(
        [sys.executable, "-m", "decalign_jax.precompile", spec_path],
        env=env, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - t0
  if proc.returncode != 0:
    log.warning("compiling in a child process failed (status %d), compiling "
                "here instead:\n%s", proc.returncode, proc.stderr[-3000:])
    return None
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  log.info("compiled in a child process in %.1f s (%s)", seconds,
           describe(report))
  return {"seconds": seconds, "steps": report}


def compile_spec(spec_path: str) -> dict[str, dict[str, Any]]:
  """The child's side: compiles what SPEC describes; returns the report."""
  # train imports this module for compile_in_child; only the child needs
  # train's builders.
  from decalign_jax import optim  # pylint: disable=g-import-not-at-top
  from decalign_jax import runtime  # pylint: disable=g-import-not-at-top
  from decalign_jax import sharding  # pylint: disable=g-import-not-at-top
  from decalign_jax import train  # pylint: disable=g-import-not-at-top
  with open(spec_path, "rb") as f:
    spec = pickle.load(f)
  for name, value in spec["jax"].items():
    jax.config.update(name, value)
  # Store every program, however quick to compile: the parent then compiles
  # none of the run's (its own threshold is unchanged).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  config = spec["config"]
  runtime.configure(config.runtime)
  mesh = sharding.make_mesh(config.mesh)
  with tempfile.TemporaryDirectory() as tmp:
    task = train.TASKS[config.task](config, tmp, splits=spec["splits"])
  tx = optim.make_optimizer(config)
  plateau = optim.make_plateau(config)
  state, state_sharding = train.init_sharded_state(task, config, mesh, tx,
                                                   plateau)
  fns = train.build_step_fns(config, task, tx, state, state_sharding, mesh)
  return train.compile_steps(fns, state, task, sharding.data_sharding(mesh))


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    sys.exit("usage: python -m decalign_jax.precompile SPEC.pkl "
             f"(got {argv[1:]})")
  print(json.dumps(compile_spec(argv[1])))


if __name__ == "__main__":
  main(sys.argv)
