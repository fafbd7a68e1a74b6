"""16-bit dropout: unbiased, the right rate, deterministic, shard-local."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decalign_jax.models import dropout as dropout_lib


def test_rate_and_unbiased_scale():
  x = jnp.ones((64, 8, 50, 100), jnp.float32)  # 2.56M draws
  y = np.asarray(jax.jit(dropout_lib.dropout, static_argnums=1)(
      x, 0.1, jax.random.key(0)))
  p = dropout_lib.keep_threshold(0.1) / 2**16
  assert abs(p - 0.9) < 2**-17
  kept = y != 0
  sigma = np.sqrt(p * (1 - p) / y.size)
  assert abs(kept.mean() - p) < 5 * sigma
  np.testing.assert_allclose(y[kept], 1 / p, rtol=1e-7)
  # Unbiased: E[y] = 1 exactly for the realised p.
  assert abs(y.mean() - 1.0) < 5 * sigma / p
  # Each row and each column position sees the rate (no striping from the
  # four-elements-per-hash layout).
  col = kept.reshape(-1, 100).mean(0)
  assert np.all(np.abs(col - p) < 6 * np.sqrt(p * (1 - p) / (y.size / 100)))


def test_bits_are_uniform_and_neighbours_independent():
  bits = np.asarray(dropout_lib.random_bits16(jax.random.key(3), (256, 1024)))
  assert bits.dtype == np.uint16
  counts = np.bincount(bits.ravel() >> 12, minlength=16)
  expected = bits.size / 16
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 45  # chi-square, 15 dof: p < 1e-4
  # The four halves of one hash are not equal or correlated.
  b = bits.astype(np.float64).reshape(-1, 4)
  corr = np.corrcoef(b.T)
  assert np.all(np.abs(corr[np.triu_indices(4, 1)]) < 0.01)


def test_deterministic_per_key_and_shape_of_odd_widths():
  key = jax.random.key(7)
  a = dropout_lib.random_bits16(key, (3, 5, 7))
  np.testing.assert_array_equal(a, dropout_lib.random_bits16(key, (3, 5, 7)))
  other = dropout_lib.random_bits16(jax.random.key(8), (3, 5, 7))
  assert a.shape == (3, 5, 7)
  assert (np.asarray(a) != np.asarray(other)).mean() > 0.9
  # A raw uint32[2] key and the typed key with the same data draw the same
  # bits (both take the four-per-hash path).
  np.testing.assert_array_equal(
      dropout_lib.random_bits16(jax.random.PRNGKey(7), (3, 5, 7)), a)
  assert dropout_lib._threefry_key_words(key) is not None
  # Rows draw from different counters.
  assert not np.array_equal(a[0], a[1])


def test_edge_rates_and_gradient():
  x = jnp.arange(1.0, 13.0).reshape(3, 4)
  key = jax.random.key(0)
  np.testing.assert_array_equal(dropout_lib.dropout(x, 0.0, key), x)
  np.testing.assert_array_equal(dropout_lib.dropout(x, 1.0, key), 0 * x)
  np.testing.assert_array_equal(dropout_lib.dropout(x, 1 - 1e-7, key), 0 * x)
  np.testing.assert_array_equal(dropout_lib.dropout(x, 1e-7, key), x)
  for bad in (-0.1, 1.5):
    with pytest.raises(ValueError, match="dropout rate"):
      dropout_lib.dropout(x, bad, key)
  y = dropout_lib.dropout(x, 0.5, key)
  g = jax.grad(lambda x: jnp.sum(dropout_lib.dropout(x, 0.5, key)))(x)
  np.testing.assert_array_equal(g, np.where(np.asarray(y) != 0, 2.0, 0.0))


def test_module_is_identity_when_deterministic_and_uses_dropout_rng():
  layer = dropout_lib.Dropout(0.3)
  x = jnp.ones((4, 16))
  np.testing.assert_array_equal(layer.apply({}, x, True), x)
  y1 = layer.apply({}, x, False, rngs={"dropout": jax.random.key(1)})
  y2 = layer.apply({}, x, deterministic=False,
                   rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(y1, y2)
  assert 0 < float((y1 == 0).mean()) < 1
  with pytest.raises(Exception, match="dropout"):
    layer.apply({}, x, False)


def test_non_threefry_keys_fall_back():
  key = jax.random.key(0, impl="rbg")
  bits = np.asarray(dropout_lib.random_bits16(key, (8, 33)))
  assert bits.shape == (8, 33) and len(np.unique(bits)) > 200


def test_sharded_batch_gives_same_mask_without_collectives():
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs several (fake) devices")
  mesh = jax.make_mesh((len(devices),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = jnp.ones((8 * len(devices), 4, 30), jnp.float32)
  key = jax.random.key(5)
  f = jax.jit(lambda x: dropout_lib.dropout(x, 0.2, key),
              in_shardings=spec, out_shardings=spec)
  np.testing.assert_array_equal(f(jax.device_put(x, spec)),
                                dropout_lib.dropout(x, 0.2, key))
  hlo = f.lower(x).compile().as_text()
  for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
    assert op not in hlo, op


@pytest.mark.parametrize("shape", [(32, 50, 256), (3, 100, 64), (5, 7),
                                   (2, 3, 1), (9,), (4, 0)])
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.0, 1.0])
def test_cpu_kernel_masks_are_the_xla_masks(shape, rate):
  key = jax.random.key(11)
  draw = lambda impl: jax.jit(  # noqa: E731
      lambda k: dropout_lib.keep_mask(k, shape, rate, impl)[0])(key)
  xla, cpu = draw("xla"), draw("cpu")
  if rate == 0.0:
    assert xla is None and cpu is None
    return
  assert cpu.dtype == jnp.bool_ and cpu.shape == shape
  np.testing.assert_array_equal(cpu, xla)
  if rate == 0.5 and math.prod(shape) > 1000:
    assert 0.45 < float(jnp.mean(cpu)) < 0.55


def test_cpu_kernel_dropout_module_and_gradient_equal_xla():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 10, 24)),
                  jnp.float32)

  def run(impl):
    layer = dropout_lib.Dropout(0.3, implementation=impl)
    f = lambda x: jnp.sum(  # noqa: E731
        layer.apply({}, x, False, rngs={"dropout": jax.random.key(2)}) ** 2)
    return jax.jit(jax.value_and_grad(f))(x)

  (v_c, g_c), (v_x, g_x) = run("cpu"), run("xla")
  np.testing.assert_array_equal(g_c, g_x)
  np.testing.assert_array_equal(v_c, v_x)
  with pytest.raises(ValueError, match="implementation='gpu'"):
    dropout_lib.keep_mask(jax.random.key(0), (3,), 0.5, "gpu")


def test_cpu_kernel_masks_under_vmap_follow_each_key():
  keys = jax.random.split(jax.random.key(4), 3)
  draw = lambda impl: jax.jit(jax.vmap(  # noqa: E731
      lambda k: dropout_lib.keep_mask(k, (6, 40), 0.5, impl)[0]))(keys)
  cpu = draw("cpu")
  np.testing.assert_array_equal(cpu, draw("xla"))
  assert not np.array_equal(cpu[0], cpu[1])
