"""Dropout that draws 16 random bits per element instead of 32.

`flax.linen.Dropout` draws a 32-bit uniform per element, and with JAX's
partitionable Threefry each element costs a whole Threefry-2x32 hash (64
bits, XOR-ed down to 32). XLA recomputes the mask in the backward pass rather
than storing it, so the hashes are paid twice; at the MOSI shape they were a
quarter of a cross-modal transformer's step (`benchmarks/README.md`). Here one
hash feeds four elements (both output words, split into 16-bit halves along
the last axis, so a sharded batch axis needs no communication), and an
element is kept when its 16 bits fall under `round(keep * 2^16)`. The kept
values are scaled by the inverse of that *realised* keep probability, so the
layer stays exactly unbiased; the realised rate differs from `rate` by at
most 2^-17 (7.6e-6).
"""

import flax.linen as nn
import jax
from jax import lax
import jax.extend.random as jex_random
import jax.numpy as jnp

_BITS = 16


def keep_threshold(rate: float) -> int:
  """The 16-bit keep threshold: P(keep) = threshold / 2^16.

  Args:
    rate: dropout rate in [0, 1].

  Returns:
    `round((1 - rate) * 2^16)`.
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"dropout rate must be in [0, 1], got {rate}")
  return round((1.0 - rate) * 2**_BITS)


def _threefry_key_words(key: jax.Array):
  """The two uint32 key words of a Threefry key (typed or raw), else None."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    # key_impl gives the implementation's name (a str in current JAX).
    if str(jax.random.key_impl(key)) != jex_random.threefry_prng_impl.name:
      return None
    key = jax.random.key_data(key)
  return (key[0], key[1]) if key.shape == (2,) else None


def random_bits16(key: jax.Array, shape) -> jax.Array:
  """Random bits, four 16-bit draws per Threefry-2x32 hash.

  Element `[..., j]` comes from hash `(i, j // 4)`, `i` the row-major index
  over the leading axes (which must number fewer than 2^32). Keys of another
  PRNG implementation fall back to `jax.random.bits` (two draws per word).

  Args:
    key: a typed or raw PRNG key.
    shape: output shape, at least 1-D.

  Returns:
    `uint16[shape]`.
  """
  *lead, n = shape
  words = _threefry_key_words(key)
  if words is None:
    bits = jax.random.bits(key, (*lead, -(-n // 2)), jnp.uint32)
    halves = lax.bitcast_convert_type(bits, jnp.uint16)
    return halves.reshape(*lead, -1)[..., :n]
  quarter = -(-n // 4)
  counts = lax.iota(jnp.uint32, quarter)
  rows = jnp.zeros(lead, jnp.uint32)
  for axis, size in enumerate(lead):
    rows = rows * size + lax.broadcasted_iota(jnp.uint32, lead, axis)
  hi = jnp.broadcast_to(rows[..., None], (*lead, quarter))
  lo = jnp.broadcast_to(counts, (*lead, quarter))
  b1, b2 = jex_random.threefry2x32_p.bind(words[0], words[1], hi, lo)
  halves = lax.bitcast_convert_type(jnp.stack([b1, b2], axis=-1), jnp.uint16)
  return halves.reshape(*lead, -1)[..., :n]


def keep_mask(key: jax.Array, shape, rate: float, implementation: str = "xla"
              ) -> tuple[jax.Array | None, float]:
  """Which elements survive dropout, and their scale.

  Args:
    key: PRNG key (unused when nothing or everything is dropped).
    shape: the shape to mask.
    rate: dropout rate in [0, 1].
    implementation: 'xla', or 'cpu' to draw a Threefry key's mask with the
      CPU kernel library (`cpu_attention.keep_mask`: the same bits in one
      pass, for a single CPU device; see `cpu_attention.resolve`).

  Returns:
    `(keep, scale)`: `keep` a bool array, or None when the rate rounds to
    keeping everything (scale 1); `scale` the inverse of the realised keep
    probability, 0 when everything is dropped.
  """
  if implementation not in ("xla", "cpu"):
    raise ValueError(f"dropout implementation={implementation!r}; expected "
                     "'xla' or 'cpu'")
  threshold = keep_threshold(rate)
  if threshold == 2**_BITS:
    return None, 1.0
  if threshold == 0:
    return jnp.zeros(shape, bool), 0.0
  words = _threefry_key_words(key)
  if implementation == "cpu" and words is not None and len(shape) >= 1:
    # Imported here: cpu_attention imports this module.
    from decalign_jax.models import cpu_attention  # pylint: disable=g-import-not-at-top
    keep = cpu_attention.keep_mask(jnp.stack(words), shape, threshold)
  else:
    keep = random_bits16(key, shape) < jnp.uint16(threshold)
  return keep, 2**_BITS / threshold


def dropout(x: jax.Array, rate: float, key: jax.Array,
            implementation: str = "xla") -> jax.Array:
  """Inverted dropout with 16-bit keep decisions (see the module docstring).

  Args:
    x: input.
    rate: dropout rate in [0, 1].
    key: PRNG key.
    implementation: how the mask is drawn ('xla' or 'cpu', see `keep_mask`);
      the mask is the same.

  Returns:
    `x * keep / P(keep)`, of `x`'s shape and dtype.
  """
  keep, scale = keep_mask(key, x.shape, rate, implementation)
  if keep is None:
    return x
  return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros_like(x))


class Dropout(nn.Module):
  """`nn.Dropout`'s interface (`rate`, `deterministic`, 'dropout' rngs).

  `implementation` ('xla' or 'cpu') only chooses how the mask is drawn.
  """

  rate: float
  rng_collection: str = "dropout"
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng(self.rng_collection),
                   self.implementation)
