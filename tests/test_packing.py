"""The packed train state: round trips, errors, and the packed train step."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decalign_jax import optim
from decalign_jax import packing
from decalign_jax import runtime
from decalign_jax import sharding
from decalign_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mixed_tree():
  return {
      "w": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3),
      "s": jnp.float32(2.5),
      "opt": (jnp.int32(3), jnp.arange(4, dtype=jnp.int32)),
      "key": jax.random.key(5),
      "keys": jax.random.split(jax.random.key(1), 3),
      "u": jnp.full((2,), 7, jnp.uint32),
      "h": jnp.ones((3,), jnp.bfloat16),
  }


def _key_data(x):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  return x


def test_round_trip_keeps_values_dtypes_and_keys():
  tree = _mixed_tree()
  spec = packing.StatePacking.of(tree)
  packed = jax.jit(spec.pack)(tree)
  # One flat buffer per stored dtype; keys travel as their uint32 data.
  assert packed["rest"] == ()
  assert {k: (v.shape, v.dtype) for k, v in packed.items() if k != "rest"} == {
      "float32": ((7,), jnp.float32), "int32": ((5,), jnp.int32),
      "uint32": ((2 + 2 + 6,), jnp.uint32), "bfloat16": ((3,), jnp.bfloat16)}
  back = jax.jit(spec.unpack)(packed)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(_key_data(a), _key_data(b))
  # The unpacked keys draw what the originals draw.
  np.testing.assert_array_equal(jax.random.uniform(back["keys"][1], (4,)),
                                jax.random.uniform(tree["keys"][1], (4,)))
  # A packing made from shapes alone is the same packing.
  assert packing.StatePacking.of(jax.eval_shape(lambda: tree)) == spec


def test_pack_names_the_leaf_that_does_not_match():
  tree = _mixed_tree()
  spec = packing.StatePacking.of(tree)
  bad = dict(tree, w=jnp.zeros((3, 2), jnp.float32))
  with pytest.raises(ValueError, match=r"\['w'\] is float32\[3, 2\].*"
                     r"expects float32\[2, 3\]"):
    spec.pack(bad)
  with pytest.raises(ValueError, match="structure"):
    spec.pack({"w": tree["w"]})


@pytest.fixture(scope="module")
def tiny_run():
  sys.path.insert(0, REPO)
  from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top
  config = synthetic_config.get_config("tiny")
  task = train.TASKS[config.task](config, "/tmp")
  mesh = sharding.make_mesh(config.mesh)
  tx = optim.make_optimizer(config)
  plateau = optim.make_plateau(config)
  state, state_sharding = train.init_sharded_state(task, config, mesh, tx,
                                                  plateau)
  batches = [sharding.put_batch(b, sharding.data_sharding(mesh))
             for b, _ in zip(task.train_batches(0), range(2))]
  return config, task, mesh, tx, plateau, state, state_sharding, batches


def test_packed_steps_equal_tree_steps(tiny_run):
  """Also: the packed runs compile as train.py does (`config.runtime`'s
  compile options: reductions as XLA loops), the tree run with XLA:CPU's
  defaults; "packed" runs the optimizer on the parameters as one vector
  (`optim.FlatParams`, train.py's default), "packed_tree_opt"
  (`config.flat_optimizer=False`) and the tree run leaf by leaf. The numbers
  agree to float32 rounding."""
  config, task, mesh, tx, _, state, state_sharding, batches = tiny_run
  spec = train.state_packing(config, state, state_sharding)
  assert spec is not None and len(spec.shapes) == len(jax.tree.leaves(state))
  assert config.flat_optimizer
  assert optim.FlatParams.of(tx, state.params) is not None
  opts = runtime.compiler_options(config.runtime, mesh.devices.flat)
  assert opts  # config_defaults: ynn_reductions=False, and these are CPUs
  runs = {}
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  for name, p, o, flat in (("tree", None, None, True),
                           ("packed", spec, opts, True),
                           ("packed_tree_opt", spec, opts, False)):
    fns = train.make_step_fns(task, tx, state_sharding, mesh, packing=p,
                              flat_optimizer=flat, compiler_options=o)
    # The step works on a copy: every run starts from the same state.
    carry = fns.pack(jax.tree.map(jnp.copy, state))
    if p is not None:
      # Three buffers (float32, int32, uint32) instead of the state's leaves.
      assert len(jax.tree.leaves(carry)) == 3
    text = fns.train.lower(carry, batches[0]).compile().as_text()
    roots = runtime.ynn_fusion_roots(text)
    assert roots["dot"] > 0
    if o is not None:
      # A guard only: at these tiny shapes XLA's defaults give YNNPACK no
      # reduction either. test_benchmark's MOSI step (135 of them with the
      # defaults) is where the option's wiring shows.
      assert roots["reduce"] == 0, roots
    # Flat, Adam's moments and the updates are [n_params] vectors.
    assert (f"f32[{n_params}]" in text) == (name == "packed"), name
    history = []
    for batch in batches:
      carry, measurements = fns.train(carry, batch)
      history.append(jax.device_get(measurements))
    assert fns.train._cache_size() == 1  # pylint: disable=protected-access
    runs[name] = (jax.device_get(fns.unpack(carry)), history)
  tree_state, tree_hist = runs.pop("tree")
  lr = config.optim.lr
  for name, (packed_state, packed_hist) in runs.items():
    for a, b in zip(tree_hist, packed_hist):
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=1e-6,
                                   err_msg=f"{name} {k}")
    assert int(packed_state.step) == int(tree_state.step) == 2
    leaves_t = jax.tree.leaves_with_path(tree_state)
    leaves_p = jax.tree.leaves(packed_state)
    assert len(leaves_t) == len(leaves_p)
    for (path, a), b in zip(leaves_t, leaves_p):
      where = f"{name} {jax.tree_util.keystr(path)}"
      # A key projection's bias has a zero gradient (softmax ignores a
      # constant per query row): its float32 noise, which fusion choices
      # change, is what Adam normalises, so its steps are noise of size lr.
      noise = "k_proj']['bias" in where and ".params" in where
      np.testing.assert_allclose(_key_data(b), _key_data(a), rtol=2e-5,
                                 atol=2 * lr if noise else 1e-6,
                                 err_msg=where)


def test_packing_only_for_replicated_states(tiny_run):
  config, task, _, tx, plateau, _, _, _ = tiny_run
  off = config.copy_and_resolve_references()
  off.pack_state = False
  mesh = sharding.make_mesh(config.mesh)
  _, sh = train.init_sharded_state(task, off, mesh, tx, plateau)
  assert train.state_packing(off, None, sh) is None
  fsdp = config.copy_and_resolve_references()
  fsdp.mesh = [("data", 2), ("fsdp", 4)]
  fsdp.sharding_rules = [(".*kernel.*", "fsdp")]
  mesh = sharding.make_mesh(fsdp.mesh)
  state, sh = train.init_sharded_state(task, fsdp, mesh, tx, plateau)
  assert not all(s.is_fully_replicated for s in jax.tree.leaves(sh))
  assert train.state_packing(fsdp, state, sh) is None
