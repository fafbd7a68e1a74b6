"""Optimizers: composed optax transforms, plus a plateau scheduler.

DecAlign's reference trains with `torch.optim.Adam(weight_decay=wd)`, which is
*coupled* L2 (the decay is added to the gradient before the Adam moments, not
AdamW), after `clip_grad_norm_(clip)`, and a `ReduceLROnPlateau` on a
validation metric. Here that is

    clip_by_global_norm -> add_decayed_weights -> scale_by_adam -> -lr

and `optax.contrib.reduce_on_plateau`, whose state is advanced once per
evaluation (not per step) and whose `scale` multiplies the updates.
"""

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import optax.contrib


def make_optimizer(config: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """Builds the per-step transform from `config.optim`.

  `config.optim.groups` is an optional list of `(regex, lr)` rules matched
  against '/'-joined parameter paths, first match wins; `lr=None` freezes the
  group. Unmatched parameters use `config.optim.lr`.

  Args:
    config: run config with `optim.{lr, weight_decay, clip, b1, b2, eps}`.

  Returns:
    An optax transform.
  """
  oc = config.optim

  def adam_l2(lr: float) -> optax.GradientTransformation:
    parts = []
    if oc.weight_decay:
      parts.append(optax.add_decayed_weights(oc.weight_decay))
    parts += [optax.scale_by_adam(b1=oc.b1, b2=oc.b2, eps=oc.eps),
              optax.scale_by_learning_rate(lr)]
    return optax.chain(*parts)

  groups = list(oc.get("groups", None) or [])
  if config.model.get("text_model_dir"):
    if config.model.freeze_text:
      groups.insert(0, ("text_model/.*", None))
    elif oc.text_lr is not None:
      groups.insert(0, ("text_model/.*", oc.text_lr))
  if not groups:
    inner = adam_l2(oc.lr)
  else:
    rules = [(re.compile(rx), lr) for rx, lr in groups]

    def label(path, _):
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      for i, (rx, _) in enumerate(rules):
        if rx.fullmatch(name):
          return str(i)
      return "default"

    transforms = {"default": adam_l2(oc.lr)}
    for i, (_, lr) in enumerate(rules):
      transforms[str(i)] = (optax.set_to_zero() if lr is None
                            else adam_l2(lr))
    inner = optax.multi_transform(
        transforms, lambda params: _map_with_path(label, params))
  if oc.clip:
    # torch's clip_grad_norm_ divides by (norm + 1e-6); optax by the norm.
    # The 1e-6 relative difference vanishes under Adam's normalisation.
    return optax.chain(optax.clip_by_global_norm(oc.clip), inner)
  return inner


def _map_with_path(fn, tree: Any) -> Any:
  return jax.tree_util.tree_map_with_path(fn, tree)


def make_plateau(config: ml_collections.ConfigDict
                 ) -> optax.GradientTransformationExtraArgs:
  """ReduceLROnPlateau on the validation metric (`config.optim.plateau_*`).

  The metric is always fed as "lower is better"; maximised metrics are
  negated by the caller. `plateau_patience` has torch's meaning (reduce once
  more than `patience` evaluations in a row failed to improve); optax reduces
  when the count *reaches* its patience, hence the +1.
  """
  oc = config.optim
  return optax.contrib.reduce_on_plateau(
      factor=oc.plateau_factor, patience=oc.plateau_patience + 1,
      rtol=oc.plateau_rtol, accumulation_size=1)


@dataclasses.dataclass(frozen=True)
class FlatParams:
  """The optimizer's view of the parameters as one flat vector.

  The MOSI model has 264 parameter arrays; run leaf by leaf, gradient
  clipping, Adam and the three norms the step logs are about 4,200 small
  XLA:CPU thunks (1,091 of them two-stage reductions) per step, about a
  tenth of the batch-32 step's thunk time (benchmarks/README.md, session 14).
  On one vector they are a handful of large loops. `optax.flatten` does
  the same for the update, but changes the optimizer state's layout (the
  moments become [n] vectors), which checkpoints and FSDP rules see; here
  the state keeps the tree layout of `tx.init(params)` and is flattened and
  split inside the step (the packed step already slices and re-concatenates
  it, `packing.py`; at MOSI's 842,241 parameters that copy takes ~1 ms).

  Valid for an optimizer whose state holds, per slot, either a params-shaped
  tree (a moment) or a leaf that does not depend on the parameters' layout
  (a step count), and whose update is elementwise apart from global norms:
  `FlatParams.of` returns None otherwise (e.g. `optax.multi_transform`,
  whose labels are per leaf). Numbers equal the tree update's up to float
  summation order in the global norms.

  Attributes:
    treedef: the parameters' tree structure.
    shapes: the parameter shapes, in tree order.
    state_def: the structure of `tx.init(flat vector)`.
    moment_slots: per leaf of that structure, whether it stands for a
      params-shaped subtree of the tree state.
  """

  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  state_def: Any
  moment_slots: tuple[bool, ...]

  @classmethod
  def of(cls, tx: optax.GradientTransformation,
         params: Any) -> "FlatParams | None":
    """The flat view for `tx` over `params` (arrays or shape structs)."""
    leaves, treedef = jax.tree.flatten(params)
    dtypes = {jnp.dtype(x.dtype) for x in leaves}
    if len(leaves) < 2 or len(dtypes) != 1:
      return None
    dtype = dtypes.pop()
    shapes = tuple(tuple(x.shape) for x in leaves)
    n = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
    flat_state = jax.eval_shape(tx.init, jax.ShapeDtypeStruct((n,), dtype))
    tree_state = jax.eval_shape(tx.init, params)
    flat_leaves, state_def = jax.tree.flatten(flat_state)
    try:
      subtrees = state_def.flatten_up_to(tree_state)
    except (ValueError, TypeError):
      return None
    slots = []
    for flat, sub in zip(flat_leaves, subtrees):
      sub_leaves, sub_def = jax.tree.flatten(sub)
      if (sub_def == treedef and flat.shape == (n,)
          and tuple(tuple(x.shape) for x in sub_leaves) == shapes):
        slots.append(True)
      elif (len(sub_leaves) == 1 and sub_def.num_nodes == 1
            and sub_leaves[0].shape == flat.shape
            and sub_leaves[0].dtype == flat.dtype):
        slots.append(False)
      else:
        return None
    return cls(treedef, shapes, state_def, tuple(slots))

  def ravel(self, tree: Any) -> Any:
    """A params-shaped tree as one vector (leaves in tree order)."""
    return jnp.concatenate(
        [jnp.ravel(x) for x in self.treedef.flatten_up_to(tree)])

  def unravel(self, vector: Any) -> Any:
    """The inverse of `ravel`: static slices, reshaped."""
    leaves, start = [], 0
    for shape in self.shapes:
      size = int(np.prod(shape, dtype=np.int64))
      leaves.append(vector[start:start + size].reshape(shape))
      start += size
    return self.treedef.unflatten(leaves)

  def flatten_state(self, opt_state: Any) -> Any:
    """`tx.init(params)`'s layout -> `tx.init(vector)`'s."""
    subtrees = self.state_def.flatten_up_to(opt_state)
    return self.state_def.unflatten(
        [self.ravel(s) if m else s
         for s, m in zip(subtrees, self.moment_slots)])

  def unflatten_state(self, flat_state: Any) -> Any:
    """`tx.init(vector)`'s layout -> `tx.init(params)`'s."""
    leaves = jax.tree.leaves(flat_state)
    return self.state_def.unflatten(
        [self.unravel(x) if m else x
         for x, m in zip(leaves, self.moment_slots)])
