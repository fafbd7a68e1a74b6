"""The optimizer's flat view of the parameters (`optim.FlatParams`)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from decalign_jax import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"a": {"kernel": jax.random.normal(k[0], (3, 4)),
                "bias": jax.random.normal(k[1], (4,))},
          "b": jax.random.normal(k[2], (2, 3, 5))}


def test_flat_view_round_trips_params_and_state():
  config = synthetic_config.get_config("tiny")
  tx = optim.make_optimizer(config)
  params = _params()
  view = optim.FlatParams.of(tx, params)
  assert view is not None
  # The step count stays a leaf; Adam's two moments become vectors.
  assert view.moment_slots == (False, True, True)
  vec = view.ravel(params)
  assert vec.shape == (12 + 4 + 30,)
  back = view.unravel(vec)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
  # A state after one update (non-zero moments, count 1) survives the trip.
  grads = jax.tree.map(lambda x: 0.1 * x + 0.01, params)
  _, state = tx.update(grads, tx.init(params), params)
  flat_state = view.flatten_state(state)
  assert (jax.tree.structure(flat_state)
          == jax.tree.structure(tx.init(vec)))
  again = view.unflatten_state(flat_state)
  assert jax.tree.structure(again) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_flat_update_equals_the_tree_update():
  config = synthetic_config.get_config("tiny")
  config.optim.clip = 0.5  # clipping active: the global norm is > 0.5
  tx = optim.make_optimizer(config)
  params = _params()
  view = optim.FlatParams.of(tx, params)
  state, flat_state = tx.init(params), view.flatten_state(tx.init(params))
  p_tree, p_flat = params, view.ravel(params)
  # Both updates jitted, as the train step runs them (op by op, the
  # moments' rounding depends on how each eager op was compiled).
  @jax.jit
  def update(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for i in range(3):
    grads = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), params)
    p_tree, state = update(grads, state, p_tree)
    p_flat, flat_state = update(view.ravel(grads), flat_state, p_flat)
  for a, b in zip(jax.tree.leaves(p_tree),
                  jax.tree.leaves(view.unravel(p_flat))):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
  for a, b in zip(jax.tree.leaves(state),
                  jax.tree.leaves(view.unflatten_state(flat_state))):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9)


def test_flat_view_declines_what_it_cannot_flatten():
  config = synthetic_config.get_config("tiny")
  params = _params()
  # Per-leaf learning rates (optax.multi_transform): labels are per leaf.
  config.optim.groups = [("a/.*", 1e-4)]
  assert optim.FlatParams.of(optim.make_optimizer(config), params) is None
  config.optim.groups = []
  tx = optim.make_optimizer(config)
  # Mixed parameter dtypes cannot share one vector.
  mixed = dict(params, b=params["b"].astype(jnp.bfloat16))
  assert optim.FlatParams.of(tx, mixed) is None
  # A transform whose state is not elementwise in the parameters.
  assert optim.FlatParams.of(optax.adafactor(1e-3), params) is None
