"""Optimizers: composed optax transforms, plus a plateau scheduler.

DecAlign's reference trains with `torch.optim.Adam(weight_decay=wd)`, which is
*coupled* L2 (the decay is added to the gradient before the Adam moments, not
AdamW), after `clip_grad_norm_(clip)`, and a `ReduceLROnPlateau` on a
validation metric. Here that is

    clip_by_global_norm -> add_decayed_weights -> scale_by_adam -> -lr

and `optax.contrib.reduce_on_plateau`, whose state is advanced once per
evaluation (not per step) and whose `scale` multiplies the updates.
"""

import re
from typing import Any

import ml_collections
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
  import jax  # pylint: disable=g-import-not-at-top
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
