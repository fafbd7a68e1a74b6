"""A train state packed into one flat buffer per dtype, for the jit boundary.

Each call of a jitted step turns every input and output leaf into a runtime
buffer on the calling (Python) thread: argument parsing, input events, one
output array per leaf. The MOSI train state has 792 leaves (parameters and
two Adam moments); at batch 32 on the 2-core CPU that host work took 10.5 ms
of the Python thread's CPU per step, on a machine whose two cores the step
itself keeps busy. The train loop therefore carries the state packed: the
leaves of each dtype concatenated into one vector, sliced back into the tree
inside the step and concatenated again at its end. With three buffers the
Python thread spends 3.1 ms a step and the step takes 85.8 instead of
90.4 ms (one interleaved A/B, `benchmarks/README.md`). The numbers are the
tree step's to float32 rounding (`tests/test_packing.py`). The price is
about one copy of the state in the step's temporaries (the updated leaves
before their concatenation): 181 instead of 169 MB at batch 32 of MOSI. For
a large model on an accelerator with little memory to spare, set
`config.pack_state=False`.

`jax.flatten_util.ravel_pytree` does not fit: it casts every leaf to one
result dtype (int32 counters and uint32 key words would become float32,
which does not hold them exactly) and takes no key arrays; hence one buffer
per dtype here. PRNG keys are packed as their uint32 key data (a typed key in the carry
would be rebuilt by Python code on every step); other leaves that cannot be
concatenated travel as they are. Packing is for replicated states: sharded
(FSDP) leaves keep their own layouts, so `train.py` packs only when every
leaf is replicated.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The packed state: {dtype name: flat vector, ..., "rest": (leaves, ...)}.
Packed = dict[str, Any]


def _key_impl(leaf) -> Any:
  """The PRNG implementation of a key array or its ShapeDtypeStruct."""
  impl = []
  jax.eval_shape(lambda k: impl.append(jax.random.key_impl(k)),
                 jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
  return impl[0]


def _stored(leaf) -> tuple[tuple[int, ...], Any, Any]:
  """(shape, dtype, key impl or None) of what the packed state stores."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    data = jax.eval_shape(jax.random.key_data,
                          jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return tuple(data.shape), data.dtype, _key_impl(leaf)
  return tuple(leaf.shape), leaf.dtype, None


def _group(dtype) -> str | None:
  """The flat buffer a stored dtype goes into (None: kept as is)."""
  if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
    return None
  return np.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class StatePacking:
  """Where each leaf of a state lives in its packed form.

  Attributes:
    treedef: the state's tree structure.
    shapes: leaf shapes, in tree order.
    dtypes: leaf dtypes, in tree order.
    groups: per leaf, the flat buffer's name, or None for leaves kept as is.
    offsets: per leaf, its offset in its flat buffer (or its index in
      "rest").
    key_impls: per leaf, the PRNG implementation of a key leaf (stored as
      its key data), else None.
    stored_shapes: per leaf, the shape it has in the packed state (a key
      leaf's key-data shape).
  """

  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[Any, ...]
  groups: tuple[str | None, ...]
  offsets: tuple[int, ...]
  key_impls: tuple[Any, ...]
  stored_shapes: tuple[tuple[int, ...], ...]

  @classmethod
  def of(cls, tree: Any) -> "StatePacking":
    """The packing of `tree` (arrays or `jax.ShapeDtypeStruct`s)."""
    leaves, treedef = jax.tree.flatten(tree)
    groups, offsets, impls, stored, used, rest = [], [], [], [], {}, 0
    for leaf in leaves:
      shape, dtype, impl = _stored(leaf)
      g = _group(dtype)
      groups.append(g)
      impls.append(impl)
      stored.append(shape)
      if g is None:
        offsets.append(rest)
        rest += 1
      else:
        offsets.append(used.get(g, 0))
        used[g] = used.get(g, 0) + int(np.prod(shape, dtype=np.int64))
    return cls(treedef, tuple(tuple(x.shape) for x in leaves),
               tuple(x.dtype for x in leaves), tuple(groups), tuple(offsets),
               tuple(impls), tuple(stored))

  def pack(self, tree: Any) -> Packed:
    """Concatenates the leaves of each dtype (jit-compatible).

    Args:
      tree: a state with the structure, shapes and dtypes this packing was
        made for.

    Returns:
      `{dtype name: [n] vector, "rest": tuple of the other leaves}`.

    Raises:
      ValueError: naming the first leaf that does not match.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if treedef != self.treedef:
      raise ValueError(f"pack: the state's structure {treedef} is not the "
                       f"packed one {self.treedef}")
    parts: dict[str, list] = {}
    rest = []
    for i, (leaf, g) in enumerate(zip(leaves, self.groups)):
      if (tuple(leaf.shape) != self.shapes[i]
          or leaf.dtype != self.dtypes[i]):
        path = jax.tree_util.keystr(
            jax.tree_util.tree_flatten_with_path(tree)[0][i][0])
        raise ValueError(
            f"pack: state leaf {path} is {leaf.dtype}{list(leaf.shape)}; "
            f"the packing expects {self.dtypes[i]}{list(self.shapes[i])}")
      if self.key_impls[i] is not None:
        leaf = jax.random.key_data(leaf)
      if g is None:
        rest.append(leaf)
      else:
        parts.setdefault(g, []).append(jnp.ravel(leaf))
    packed = {g: jnp.concatenate(p) if len(p) > 1 else p[0]
              for g, p in parts.items()}
    packed["rest"] = tuple(rest)
    return packed

  def unpack(self, packed: Packed) -> Any:
    """The state again: static slices of the flat buffers (jit-compatible)."""
    leaves = []
    for shape, g, off, impl in zip(self.stored_shapes, self.groups,
                                   self.offsets, self.key_impls):
      if g is None:
        leaf = packed["rest"][off]
      else:
        n = int(np.prod(shape, dtype=np.int64))
        leaf = packed[g][off:off + n].reshape(shape)
      if impl is not None:
        leaf = jax.random.wrap_key_data(leaf, impl=impl)
      leaves.append(leaf)
    return jax.tree.unflatten(self.treedef, leaves)
