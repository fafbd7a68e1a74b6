r"""Training entry point.

  python -m decalign_jax.train --config configs/synthetic.py --workdir runs/x
  python -m decalign_jax.train --config configs/mosi.py \
      --config.data.path=/data/mosi.pkl --workdir runs/mosi
  python -m decalign_jax.train --config configs/mosi.py \
      --config.data.path=/data/mosi.pkl --workdir runs/mosi --mode test
"""

import functools
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple

from absl import app
from absl import flags
from absl import logging as absl_logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import tqdm

from decalign_jax import checkpoint
from decalign_jax import metrics as metrics_lib
from decalign_jax import optim
from decalign_jax import packing as packing_lib
from decalign_jax import precompile
from decalign_jax import runtime
from decalign_jax import sharding
from decalign_jax import steps
from decalign_jax.tasks import base
from decalign_jax.tasks import sentiment

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "test"],
                          "train (resumes from workdir) or test (scores the "
                          "best checkpoint in workdir).")

TASKS = {"sentiment": sentiment.make_task}
# Not __name__: under `python -m` that is "__main__", outside our handler.
log = logging.getLogger("decalign_jax.train")


class TrainingError(RuntimeError):
  """A run that cannot continue (e.g. a non-finite loss)."""


def _selection(config) -> tuple[str, str]:
  name = config.selection_metric
  return name, metrics_lib.metric_mode(name)


def _score_for_plateau(value: float, mode: str) -> float:
  return -value if mode == "max" else value


class _MetricWriter:
  """Adds JSON lines to workdir/metrics.jsonl (process 0 only).

  The file is rewritten whole on each record (a few per epoch): object
  stores behind epath (gs:// through gcsfs) have no append mode.
  """

  def __init__(self, workdir: str):
    self._path = epath.Path(workdir) / "metrics.jsonl"
    self._enabled = jax.process_index() == 0
    self._text = self._path.read_text() if (
        self._enabled and self._path.exists()) else ""

  def write(self, record: dict[str, Any]) -> None:
    if self._enabled:
      self._text += json.dumps(record) + "\n"
      self._path.write_text(self._text)


def _predict_all(eval_fn, params, batches, data_sharding):
  outs = [eval_fn(params, sharding.put_batch(b, data_sharding))
          for b in batches]
  # One host transfer after the loop rather than one per batch.
  outs = sharding.to_host(outs)
  return tuple(np.concatenate([o[i] for o in outs]) for i in range(3))


def _replace_params(state, params, state_sharding, tx, plateau):
  """A fresh state (step 0, new optimizer state) around host `params`."""
  params = jax.device_put(jax.tree.map(jnp.asarray, params),
                          state_sharding.params)
  return jax.jit(
      lambda p, r: steps.init_train_state(p, tx, plateau, r),
      out_shardings=state_sharding)(params, state.rng)


def init_sharded_state(task: base.Task, config: ml_collections.ConfigDict,
                       mesh, tx, plateau):
  """A fresh `TrainState` from `config.seed`, laid out by the sharding rules.

  The state is created directly in its layout (a jit with out_shardings), so
  no device ever holds a full copy of FSDP-sharded parameters.

  Returns:
    `(state, state_sharding)`.
  """
  init_rng, state_rng = jax.random.split(jax.random.key(config.seed))

  def init_state(r):
    return steps.init_train_state(task.init_params(r), tx, plateau, state_rng)

  abstract = jax.eval_shape(init_state, init_rng)
  state_sharding = sharding.state_shardings(abstract, mesh,
                                            config.sharding_rules)
  state = jax.jit(init_state, out_shardings=state_sharding)(init_rng)
  return state, state_sharding


class StepFns(NamedTuple):
  """The jitted steps of a run.

  `train` carries `pack(state)` from step to step (a `packing` view of the
  state when the run packs it, else the state itself); `unpack` gives the
  `TrainState` back for evaluation, the plateau scheduler and checkpoints.
  """
  train: Callable[[Any, dict], tuple[Any, dict]]
  eval: Callable[[Any, dict], tuple[jax.Array, jax.Array, jax.Array]]
  pack: Callable[[steps.TrainState], Any]
  unpack: Callable[[Any], steps.TrainState]


def _identity(x):
  return x


def make_step_fns(task: base.Task, tx, state_sharding, mesh, *,
                  packing: packing_lib.StatePacking | None = None,
                  flat_optimizer: bool = True,
                  compiler_options: dict[str, Any] | None = None
                  ) -> StepFns:
  """The jitted train and eval steps over `mesh` (also used by benchmarks/).

  The train step donates its carry and keeps its sharding; batches are split
  over the data axes; outputs (measurements, predictions) are replicated.

  Args:
    task: the task (its `loss_fn` and `predict_fn`).
    tx: the optax optimizer.
    state_sharding: `TrainState` of shardings (`sharding.state_shardings`).
    mesh: the device mesh.
    packing: carry the state packed (`state_packing`); only for a
      replicated state.
    flat_optimizer: with `packing`, run the optimizer on the parameters as
      one vector where `optim.FlatParams` can (same numbers up to float
      summation order in the global norms; 4,000 fewer small thunks a step
      on CPU for MOSI).
    compiler_options: XLA options of the train step
      (`runtime.compiler_options`). The eval step keeps XLA's defaults: the
      forward alone is 4% faster with YNNPACK's reductions.

  Returns:
    `StepFns`.
  """
  data_sharding = sharding.data_sharding(mesh)
  repl = sharding.replicated(mesh)
  step = functools.partial(steps.train_step, loss_fn=task.loss_fn, tx=tx)
  if packing is None:
    train_fn = jax.jit(step, in_shardings=(state_sharding, data_sharding),
                       out_shardings=(state_sharding, repl),
                       donate_argnums=(0,), compiler_options=compiler_options)
    pack_fn = unpack_fn = _identity
  else:
    if flat_optimizer:
      params = packing.treedef.unflatten(
          [jax.ShapeDtypeStruct(s, d)
           for s, d in zip(packing.shapes, packing.dtypes)]).params
      step = functools.partial(step, flat=optim.FlatParams.of(tx, params))

    def packed_step(carry, batch):
      state, measurements = step(packing.unpack(carry), batch)
      return packing.pack(state), measurements

    train_fn = jax.jit(packed_step, in_shardings=(repl, data_sharding),
                       out_shardings=(repl, repl), donate_argnums=(0,),
                       compiler_options=compiler_options)
    pack_fn = jax.jit(packing.pack, out_shardings=repl)
    unpack_fn = jax.jit(packing.unpack, out_shardings=state_sharding)
  eval_fn = jax.jit(
      functools.partial(steps.eval_step, predict_fn=task.predict_fn),
      in_shardings=(state_sharding.params, data_sharding), out_shardings=repl)
  return StepFns(train_fn, eval_fn, pack_fn, unpack_fn)


def state_packing(config: ml_collections.ConfigDict, state, state_sharding
                  ) -> packing_lib.StatePacking | None:
  """The packing of the train loop's state, or None to carry the tree.

  Packs when `config.pack_state` is on and every state leaf is replicated
  (an FSDP-sharded leaf keeps its own layout).
  """
  if not config.pack_state:
    return None
  if not all(s.is_fully_replicated for s in jax.tree.leaves(state_sharding)):
    return None
  return packing_lib.StatePacking.of(state)


def build_step_fns(config: ml_collections.ConfigDict, task: base.Task, tx,
                   state, state_sharding, mesh) -> StepFns:
  """`make_step_fns` as a run configures it (packing, compiler options)."""
  return make_step_fns(
      task, tx, state_sharding, mesh,
      packing=state_packing(config, state, state_sharding),
      flat_optimizer=config.flat_optimizer,
      compiler_options=runtime.compiler_options(config.runtime,
                                                mesh.devices.flat))


def compile_steps(fns: StepFns, state, task: base.Task, data_sharding, *,
                  train: bool = True) -> dict[str, dict[str, Any]]:
  """Compiles the run's programs ahead of the loop; says where each came from.

  The train step, the eval step and, for a packed state, `pack` and
  `unpack` (whose ~800 outputs take 9 s to compile for MOSI: as much a
  reason to keep the compiler out of the training process as the step).
  They are the programs the loop calls (same shapes and shardings), so jit
  reuses them rather than compiling again, and the first epoch's timing
  holds no compile.

  Args:
    fns: the run's `StepFns`.
    state: the `TrainState` (only its shapes are used).
    task: the task (its `example_batch` and first "valid" eval batch).
    data_sharding: the batches' sharding.
    train: also compile what training needs (all but the eval step).

  Returns:
    `{name: {"seconds": s, "from_cache": bool}}` for "train", "eval",
    "pack" and "unpack" (those compiled).
  """
  eval_batch = sharding.put_batch(next(iter(task.eval_batches["valid"]())),
                                  data_sharding)
  todo = [("eval", fns.eval, (state.params, eval_batch))]
  if train:
    carry = jax.eval_shape(fns.pack, state)
    todo.insert(0, ("train", fns.train, (
        carry, sharding.put_batch(task.example_batch, data_sharding))))
    if hasattr(fns.pack, "lower"):  # jitted: the state is packed
      todo += [("pack", fns.pack, (state,)), ("unpack", fns.unpack, (carry,))]
  report = {}
  for name, fn, args in todo:
    t0 = time.perf_counter()
    _, from_cache = runtime.compile_reporting_cache(fn.lower(*args))
    report[name] = {"seconds": time.perf_counter() - t0,
                    "from_cache": from_cache}
  return report


def run_one(config: ml_collections.ConfigDict, workdir: str, *,
            mode: str = "train", task: base.Task | None = None
            ) -> dict[str, Any]:
  """Trains (or tests) one seed; returns the best checkpoint's results.

  Resume order: the latest checkpoint in `workdir`, then
  `config.init_from` (a reference checkpoint), then scratch.

  Args:
    config: run config.
    workdir: this seed's output directory.
    mode: "train" or "test".
    task: a prebuilt task (else built from the config).

  Returns:
    `{"valid": metrics, "test": metrics, "best_epoch": int, ...}`.
  """
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  data_sharding = sharding.data_sharding(mesh)
  task = task or TASKS[config.task](
      config, workdir, shard_index=jax.process_index(),
      shard_count=jax.process_count())
  log.info("%s", task.info)

  tx = optim.make_optimizer(config)
  plateau = optim.make_plateau(config)
  state, state_sharding = init_sharded_state(task, config, mesh, tx, plateau)
  if task.pretrained is not None:
    params = task.pretrained(state.params)
    state = _replace_params(state, params, state_sharding, tx, plateau)
  if config.init_from:
    from decalign_jax import convert  # pylint: disable=g-import-not-at-top
    params = convert.params_from_reference(config.init_from, config)
    state = _replace_params(state, params, state_sharding, tx, plateau)

  sel_name, sel_mode = _selection(config)
  sched_name = config.scheduler_metric or sel_name
  latest = checkpoint.make_manager(os.path.join(workdir, "ckpt", "latest"))
  best = checkpoint.make_manager(os.path.join(workdir, "ckpt", "best"),
                                 best_mode=sel_mode)
  meta = {"epoch": 0, "best_score": None, "best_epoch": 0, "history": []}
  if latest.latest_step() is not None:
    state, meta = checkpoint.restore(latest, state)
    log.info("Resumed from %s at epoch %d", workdir, meta["epoch"])

  fns = build_step_fns(config, task, tx, state, state_sharding, mesh)
  log.info("%s", precompile.describe(compile_steps(
      fns, state, task, data_sharding, train=mode == "train")))
  plateau_fn = jax.jit(functools.partial(steps.plateau_update,
                                         plateau=plateau),
                       donate_argnums=(0,))
  writer = _MetricWriter(workdir)

  def evaluate(params, split):
    preds, labels, masks = _predict_all(
        fns.eval, params, task.eval_batches[split](), data_sharding)
    return task.evaluate(split, preds, labels, masks)

  if mode == "train":
    total_steps = config.num_epochs * task.steps_per_epoch
    # Checkpoints are taken at epoch ends, so the step is known on the host
    # (reading state.step would not work across processes).
    step = meta["epoch"] * task.steps_per_epoch
    bar = tqdm.tqdm(total=total_steps, initial=step,
                    desc=os.path.basename(os.path.normpath(workdir)),
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    for epoch in range(meta["epoch"], config.num_epochs):
      if epoch - meta["best_epoch"] >= config.early_stop_patience and (
          meta["best_score"] is not None):
        break
      t0, epoch_start_step = time.time(), step
      # The steps carry the packed state; the tree is rebuilt at the end of
      # the epoch (dropping `state` meanwhile keeps one copy alive).
      carry, state = fns.pack(state), None
      for batch in task.train_batches(epoch):
        batch = sharding.put_batch(batch, data_sharding)
        # Everything the step needs is on device: an implicit transfer here
        # would be a hidden host round trip per step.
        with jax.transfer_guard("disallow"):
          carry, measurements = fns.train(carry, batch)
        step += 1  # a host counter: reading state.step would sync
        bar.update(1)
        if step % config.log_training_steps == 0:
          m = {k: float(v) for k, v in
               sharding.to_host(measurements).items()}
          if not all(math.isfinite(v) for v in m.values()):
            raise TrainingError(
                f"non-finite training measurements at step {step}: {m}")
          writer.write({"step": step, "epoch": epoch, "split": "train", **m})
          bar.set_postfix(loss=f"{m['loss']:.4f}")
      state, carry = fns.unpack(carry), None
      # One sync per epoch (evaluation would wait here anyway).
      jax.block_until_ready(state)
      train_seconds = time.time() - t0
      epoch_steps = step - epoch_start_step
      valid = evaluate(state.params, "valid")
      score = valid[sel_name]
      state = plateau_fn(state, jnp.asarray(
          _score_for_plateau(valid[sched_name], metrics_lib.metric_mode(
              sched_name)), jnp.float32))
      improved = meta["best_score"] is None or (
          score > meta["best_score"] if sel_mode == "max"
          else score < meta["best_score"])
      if improved:
        meta["best_score"], meta["best_epoch"] = score, epoch + 1
      meta["epoch"] = epoch + 1
      meta["history"].append({"epoch": epoch + 1, sel_name: score})
      writer.write({"step": step, "epoch": epoch + 1, "split": "valid",
                    "seconds": time.time() - t0,
                    "train_seconds": train_seconds,
                    "train_samples_per_second":
                        epoch_steps * config.batch_size / train_seconds,
                    **valid})
      log.info("epoch %d: valid %s %.4f (best %.4f at epoch %d)", epoch + 1,
               sel_name, score, meta["best_score"], meta["best_epoch"])
      if improved:
        checkpoint.save(best, step, state, meta, score=score)
      checkpoint.save(latest, step, state, meta)
    bar.close()
    latest.wait_until_finished()
    best.wait_until_finished()

  if best.latest_step() is not None:
    state, best_meta = checkpoint.restore(best, state, best.best_step())
  elif mode == "test" and config.init_from:
    # Scoring a reference checkpoint as it is.
    best_meta = {"best_epoch": 0}
  else:
    raise TrainingError(f"no best checkpoint under {workdir}/ckpt/best: "
                        "train first (--mode train), or give "
                        "--config.init_from=<reference .pth> to score one")
  results = {
      "best_epoch": best_meta["best_epoch"],
      "selection_metric": sel_name,
      "valid": evaluate(state.params, "valid"),
      "test": evaluate(state.params, "test"),
      "baseline": {"test": task.baseline("test")},
  }
  latest.close()
  best.close()
  return results


def _summary(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
  names = sorted(next(iter(per_seed.values()))["test"])
  table = {}
  for name in names:
    vals = np.array([r["test"][name] for r in per_seed.values()], np.float64)
    table[name] = {"mean": float(vals.mean()), "std": float(vals.std())}
  return table


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       mode: str = "train") -> dict[str, Any]:
  """Runs every seed and writes `workdir/results.json`.

  Args:
    config: run config; `config.seeds` (if non-empty) overrides `seed`.
    workdir: output directory (one subdirectory per seed if several).
    mode: "train" or "test".

  Returns:
    the results dict written to results.json.
  """
  seeds = list(config.seeds) or [config.seed]
  # Build (and so validate) the data before anything is written.
  task_config = config.copy_and_resolve_references()
  splits = sentiment.load_splits(task_config, workdir) if (
      config.task == "sentiment") else None
  if splits is not None and mode == "train":
    first_seed = config.copy_and_resolve_references()
    with first_seed.unlocked():
      first_seed.seed = seeds[0]
    precompile.compile_in_child(first_seed, splits)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (epath.Path(workdir) / "config.json").write_text(
        config.to_json_best_effort(indent=2))
  per_seed = {}
  for seed in seeds:
    seed_config = config.copy_and_resolve_references()
    with seed_config.unlocked():
      seed_config.seed = seed
    seed_dir = workdir if len(seeds) == 1 else os.path.join(
        workdir, f"seed_{seed}")
    task = TASKS[config.task](seed_config, workdir, splits=splits,
                              shard_index=jax.process_index(),
                              shard_count=jax.process_count())
    per_seed[str(seed)] = run_one(seed_config, seed_dir, mode=mode, task=task)
  first = next(iter(per_seed.values()))
  results = {
      "test": first["test"] if len(seeds) == 1 else _summary(per_seed),
      "baseline": first["baseline"]["test"],
      "selection_metric": first["selection_metric"],
      "seeds": per_seed,
  }
  if jax.process_index() == 0:
    name = "results.json" if mode == "train" else "test_results.json"
    (epath.Path(workdir) / name).write_text(json.dumps(results, indent=2))
    _print_table(per_seed, results)
  return results


def _print_table(per_seed, results):
  names = list(results["baseline"])
  if len(per_seed) > 1:
    rows = [f"{n:>16s}: {results['test'][n]['mean']:.4f} +- "
            f"{results['test'][n]['std']:.4f}" for n in names]
  else:
    rows = [f"{n:>16s}: {results['test'][n]:.4f}   (baseline "
            f"{results['baseline'][n]:.4f})" for n in names]
  print("test metrics of the best checkpoint:\n" + "\n".join(rows))


def main(argv):
  del argv
  # Orbax logs every save/restore at INFO through absl; keep its warnings
  # only, and give our own messages their own handler.
  absl_logging.set_verbosity(absl_logging.WARNING)
  ours = logging.getLogger("decalign_jax")
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s",
                                         "%H:%M:%S"))
  ours.addHandler(handler)
  ours.setLevel(logging.INFO)
  ours.propagate = False
  config = _CONFIG.value
  # Before anything starts JAX's thread pools (see runtime.py).
  applied = runtime.configure(config.runtime)
  log.info("runtime: %s, compilation cache: %s", applied,
           runtime.compilation_cache_dir(config.runtime) or "off")
  jax.config.update("jax_threefry_partitionable", True)
  sharding.maybe_initialize_distributed()
  train_and_evaluate(config, _WORKDIR.value, mode=_MODE.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
