"""A step on 8 devices equals the step on 1 device (global-batch semantics).

Every batch statistic of DecAlign (GMM EM, prototype marginals, OT, moments,
MMD, SupCon) is computed over the global batch because the step is one jit
over global arrays; these tests pin that down for the data-parallel and the
FSDP layouts, and read the compiled HLO for the collectives.

The comparison runs in float64: in float32 the sharded reductions reorder
sums, and a few gradients (the text projection's) carry cancellation that
turns that reordering into ~2.5e-4 relative noise, while in float64 the 1-
and 8-device steps agree to ~1e-12. That is the proof that the sharded step
computes the same function; float32 runs then differ by rounding only.
"""

import functools
import os
import re
import sys

import jax
import numpy as np
import optax
import pytest

from decalign_jax import optim
from decalign_jax import sharding
from decalign_jax import steps
from decalign_jax.tasks import sentiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {
    "single": ([("data", 1)], [(".*", "replicate")], 1),
    "dp8": ([("data", 8)], [(".*", "replicate")], 8),
    "fsdp": ([("data", 2), ("fsdp", 4)], [(".*", "fsdp")], 8),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  sys.path.insert(0, REPO)
  from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top
  c = synthetic_config.get_config()
  c.data.synthetic.update(num_train=64, num_valid=16, num_test=16, seq_len=6)
  c.model.feature_dims = (16, 5, 8)
  # d 12 keeps parameter shapes distinct from activation shapes (B 32).
  c.model.d_model, c.model.num_heads, c.model.num_layers = 12, 2, 1
  c.model.pde_dim, c.model.num_prototypes = 8, 3
  c.batch_size = 32
  # No decay: Adam's first moment after step 1 is then (1 - b1) times the
  # clipped gradient alone (test_sharded_step_equals_single_device).
  c.optim.weight_decay = 0.0
  workdir = str(tmp_path_factory.mktemp("data"))
  task = sentiment.make_task(c, workdir)
  batches = [b for _, b in zip(range(2), task.train_batches(0))]
  return c, task, batches


def _f64(tree):
  return jax.tree.map(
      lambda x: x.astype(np.float64) if x.dtype == np.float32 else x, tree)


def _run(setup, layout):
  with jax.enable_x64(True):
    return _run_x64(setup, layout)


def _run_x64(setup, layout):
  config, task, batches = setup
  batches = [_f64(b) for b in batches]
  axes, rules, n = LAYOUTS[layout]
  mesh = sharding.make_mesh(axes, devices=jax.devices()[:n])
  tx, plateau = optim.make_optimizer(config), optim.make_plateau(config)
  init = lambda r: steps.init_train_state(  # noqa: E731
      _f64(task.init_params(r)), tx, plateau, jax.random.key(1))
  abstract = jax.eval_shape(init, jax.random.key(0))
  state_sh = sharding.state_shardings(abstract, mesh, rules)
  data_sh = sharding.data_sharding(mesh)
  state = jax.jit(init, out_shardings=state_sh)(jax.random.key(0))
  # train.py packs a replicated state, and its step then runs the optimizer
  # on the parameters as one vector: "dp8" runs that update, "single" and
  # "fsdp" the leaf-by-leaf one.
  flat = optim.FlatParams.of(tx, abstract.params) if layout == "dp8" else None
  assert (flat is not None) == (layout == "dp8")
  step = jax.jit(functools.partial(steps.train_step, loss_fn=task.loss_fn,
                                   tx=tx, flat=flat),
                 in_shardings=(state_sh, data_sh),
                 out_shardings=(state_sh, sharding.replicated(mesh)),
                 donate_argnums=(0,))
  # One compile, reused for the steps and read by the HLO tests.
  compiled = step.lower(state, sharding.put_batch(batches[0],
                                                  data_sh)).compile()
  measurements, first_moments = [], None
  for b in batches:
    state, m = compiled(state, sharding.put_batch(b, data_sh))
    measurements.append(jax.device_get(m))
    if first_moments is None:
      # Adam's first moment: after one step, (1 - b1) * clip(gradient).
      first_moments = jax.device_get(
          optax.tree_utils.tree_get(state.opt_state, "mu"))
      assert first_moments is not None, "no Adam state in the optimizer"
  return (jax.device_get(state.params), measurements, compiled, state_sh,
          first_moments)


@pytest.fixture(scope="module")
def runs(setup):
  return {name: _run(setup, name) for name in LAYOUTS}


@pytest.mark.parametrize("layout", ["dp8", "fsdp"])
def test_sharded_step_equals_single_device(runs, layout):
  params1, meas1, _, _, mu1 = runs["single"]
  params8, meas8, _, _, mu8 = runs[layout]
  for m1, m8 in zip(meas1, meas8):
    for k in ("loss", "task", "dec", "hete", "homo", "ct", "l2_grads",
              "l2_updates"):
      np.testing.assert_allclose(m8[k], m1[k], rtol=1e-10, err_msg=k)
  close = lambda a, b: np.testing.assert_allclose(  # noqa: E731
      a, b, rtol=1e-9, atol=1e-10)  # atol: zero-gradient key biases
  # The gradients: Adam's first moment after step 1 is (1 - b1) * the
  # clipped gradient (no decay, see setup), and the clipping factor is a
  # function of l2_grads, equal above. Reading them from the step spares a
  # second compile per layout.
  assert all(np.abs(m).max() > 0 for m in jax.tree.leaves(mu1)
             if m.size > 1), "a gradient is all zeros"
  jax.tree.map(close, mu8, mu1)
  jax.tree.map(close, params8, params1)


def test_fsdp_layout_shards_parameters(runs):
  _, _, _, state_sh, _ = runs["fsdp"]
  specs = [s.spec for s in jax.tree.leaves(state_sh.params)]
  assert any("fsdp" in tuple(spec) for spec in specs)
  mu = jax.tree.leaves(state_sh.opt_state)
  assert any("fsdp" in tuple(s.spec) for s in mu)


def _collectives(hlo: str) -> dict[str, list[str]]:
  found = {}
  for op in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
             "collective-permute"):
    found[op] = re.findall(rf"= (\S+) {op}(?:-start)?\(", hlo)
  return found


def test_data_parallel_collectives(runs):
  params, _, compiled, _, _ = runs["dp8"]
  ops = _collectives(compiled.as_text())
  # Gradients (and batch statistics) are summed across devices.
  assert ops["all-reduce"], "no all-reduce in the data-parallel step"
  assert not ops["all-to-all"]
  # No parameter is all-gathered: they are replicated in this layout.
  param_shapes = {tuple(p.shape) for p in jax.tree.leaves(params)
                  if p.size > 64}
  gathered = set()
  for shape in ops["all-gather"]:
    dims = re.search(r"\[([\d,]*)\]", shape)
    if dims and dims.group(1):
      gathered.add(tuple(int(d) for d in dims.group(1).split(",")))
  assert not gathered & param_shapes, gathered & param_shapes


def test_fsdp_gathers_parameters(runs):
  _, _, compiled, _, _ = runs["fsdp"]
  ops = _collectives(compiled.as_text())
  assert ops["all-gather"], "FSDP step gathers no parameters"
  assert ops["all-reduce"] or ops["reduce-scatter"]
