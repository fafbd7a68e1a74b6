"""DecAlign's training objective (the reference trainer's `do_train` loss).

    total = task + w_dec * L_dec + alpha * L_hete + beta * L_homo
            + ct_weight * L_supcon

with the task loss MSE / L1 / smooth-L1 (plus the optional binary auxiliary
term) for regression and (weighted) cross-entropy for classification.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from decalign_jax.losses import contrastive
from decalign_jax.losses import task as task_lib


def task_loss(logits: jax.Array, labels: jax.Array,
              lc: ml_collections.ConfigDict, *, train_mode: str,
              weights: jax.Array | None = None) -> jax.Array:
  """The main (supervised) loss.

  Args:
    logits: `[B, 1]` (regression) or `[B, C]`.
    labels: `[B]` float (regression) or int (classification).
    lc: `config.loss`.
    train_mode: 'regression' or 'classification'.
    weights: optional `[B]` 0/1 validity of each sample.

  Returns:
    scalar loss.
  """
  if train_mode == "classification":
    cw = lc.get("class_weights", None)
    cw = None if cw is None else jnp.asarray(cw, logits.dtype)
    return task_lib.classification_loss(
        logits, labels.astype(jnp.int32), class_weights=cw, weights=weights)
  pred = logits.reshape(-1)
  loss = task_lib.regression_loss(
      pred, labels, kind=lc.task_loss, beta=lc.smooth_l1_beta,
      weights=weights)
  if lc.binary_task_weight > 0:
    loss = loss + lc.binary_task_weight * task_lib.binary_aux_loss(
        pred, labels)
  return loss


def decalign_objective(logits: jax.Array, aux: dict[str, Any],
                       labels: jax.Array, lc: ml_collections.ConfigDict, *,
                       train_mode: str
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total training loss and its terms.

  Args:
    logits: model output.
    aux: the model's aux dict (`losses` and `final_rep`).
    labels: `[B]` labels.
    lc: `config.loss` (`dec_weight, alpha, beta, ct_weight, ct_temperature`).
    train_mode: 'regression' or 'classification'.

  Returns:
    `(total, terms)` with terms `task, dec, hete, homo, ct, total_no_ct`.
  """
  main = task_loss(logits, labels, lc, train_mode=train_mode)
  terms = {"task": main, **aux["losses"]}
  combined = (main + lc.dec_weight * terms["dec"] + lc.alpha * terms["hete"]
              + lc.beta * terms["homo"])
  terms["total_no_ct"] = combined
  if lc.ct_weight > 0:
    if train_mode == "classification":
      classes = labels.astype(jnp.int32)
    else:
      classes = contrastive.regression_label_classes(labels)
    terms["ct"] = contrastive.supervised_contrastive_loss(
        aux["final_rep"], classes, temperature=lc.ct_temperature)
    combined = combined + lc.ct_weight * terms["ct"]
  return combined, terms
