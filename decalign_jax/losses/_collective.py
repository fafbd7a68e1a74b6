"""Per-device building blocks of the sharded contrastive losses.

Block logits, the ring that shows every device's block to every other
(`ppermute`), the streaming log-sum-exp, and the `shard_map` wrapper used by
`global_contrastive` (all-gather kernels) and `ring_contrastive` (ring
kernels).
"""

import functools

import jax
import jax.numpy as jnp

P = jax.sharding.PartitionSpec
Axis = str | tuple[str, ...]

# Logits are scaled by 1 / temperature; TF32 noise would be amplified.
_HIGHEST = jax.lax.Precision.HIGHEST


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def block_logits(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
  """`[n, m]` logits `a @ b.T / t` of two blocks."""
  return mm(a, b.T) / t


def pos_logits(x: jax.Array, y: jax.Array, t: jax.Array) -> jax.Array:
  """`[n]` logits of the matching pairs `x_i . y_i / t`."""
  return jnp.sum(x * y, axis=-1) / t


def supcon_masks(labels, valid, labels_blk, valid_blk, is_self):
  """SupCon's `(pair, positive)` masks of an anchor block against a block."""
  pair = ~is_self & valid[:, None] & valid_blk[None, :]
  positive = pair & (labels[:, None] == labels_blk[None, :])
  return pair, positive




def _axis_size(mesh: jax.sharding.Mesh, axis: Axis) -> int:
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  size = 1
  for name in names:
    size *= mesh.shape[name]
  return size


def varying(value: float, shape: tuple[int, ...], dtype, axis: Axis
            ) -> jax.Array:
  """A fresh accumulator typed as per-device (shard_map's vma check)."""
  return jax.lax.pcast(jnp.full(shape, value, dtype), axis, to="varying")


def _shift(tree, axis: Axis, size: int):
  perm = [(i, (i + 1) % size) for i in range(size)]
  return jax.tree.map(lambda a: jax.lax.ppermute(a, axis, perm), tree)


def ring(body, carry, block, moving, *, axis: Axis, size: int):
  """Shows every device's `block` to `body` once, our own first.

  Args:
    body: `(step, carry, block, moving) -> (carry, moving)`; at `step` s the
      block is that of device `(me - s) % size`.
    carry: our accumulators; they stay here.
    block: read-only pytree of `[n, ...]` arrays, one device on per step.
    moving: the block's accumulators; they travel with it.

  Returns:
    `(carry, moving)`, `moving` being those of our own block (one more
    shift brings them home).
  """
  def visit(step, state):
    carry, block, moving = state
    carry, moving = body(step, carry, block, moving)
    return carry, _shift(block, axis, size), _shift(moving, axis, size)

  carry, block, moving = jax.lax.fori_loop(0, size - 1, visit,
                                           (carry, block, moving))
  carry, moving = body(size - 1, carry, block, moving)
  return carry, _shift(moving, axis, size)


def online_lse(state, logits: jax.Array, axis: int):
  """Streams `logits` reduced over `axis` into a (max, sum-exp) pair."""
  m, s = state
  m_new = jnp.maximum(m, jnp.max(logits, axis=axis))
  s = s * jnp.exp(m - m_new) + jnp.sum(
      jnp.exp(logits - jnp.expand_dims(m_new, axis)), axis=axis)
  return m_new, s


def sharded(kernel, mesh, axis, in_specs, out_specs, **kwargs):
  """`jax.shard_map` of `kernel`, specs given as 'b' (batch) / 'r'."""
  spec = lambda c: P(axis) if c == "b" else P()
  return jax.shard_map(
      functools.partial(kernel, axis=axis, size=_axis_size(mesh, axis),
                        **kwargs),
      mesh=mesh, in_specs=tuple(map(spec, in_specs)),
      out_specs=tuple(map(spec, out_specs)))
