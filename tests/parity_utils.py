"""Helpers to run our DecAlign on a reference golden fixture."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from decalign_jax import convert
from decalign_jax.losses import objective
from decalign_jax.tasks import sentiment

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
VARIANTS = ("small_regression", "small_regression_f64",
            "small_classification", "small_seqmask", "small_conv5_seqmask",
            "small_selfattn_causal", "small_tinybatch", "small_mosi_arch")


@functools.lru_cache(maxsize=None)
def load(variant: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(FIXTURES, f"golden_{variant}.npz")) as z:
    return {k: z[k] for k in z.files}


def reference_config(variant: str, *, ot_mode: str = "reference"
                     ) -> ml_collections.ConfigDict:
  g = load(variant)
  cfg = convert.config_from_reference(json.loads(str(g["meta/config_json"])))
  with cfg.unlocked():
    cfg.model.ot_mode = ot_mode
  return cfg


def state_dict(variant: str) -> dict[str, np.ndarray]:
  return {k: v for k, v in load(variant).items() if "/" not in k}


def inputs(variant: str):
  g = load(variant)
  x = tuple(jnp.asarray(g[f"in/{k}"]) for k in ("text", "audio", "vision"))
  labels = g["in/labels"].reshape(-1)
  return x, jnp.asarray(labels)


def run_model(variant: str, *, ot_mode: str = "reference"):
  """Returns (cfg, params, logits, aux, intermediates)."""
  cfg = reference_config(variant, ot_mode=ot_mode)
  params = jax.tree.map(jnp.asarray,
                        convert.params_from_reference(state_dict(variant),
                                                      cfg))
  model = sentiment.build_model(cfg)
  x, _ = inputs(variant)
  (logits, aux), state = model.apply({"params": params}, *x,
                                     mutable=["intermediates"])
  return cfg, params, logits, aux, state["intermediates"]


def loss_and_grads(variant: str, *, ot_mode: str = "reference"):
  cfg = reference_config(variant, ot_mode=ot_mode)
  params = jax.tree.map(jnp.asarray,
                        convert.params_from_reference(state_dict(variant),
                                                      cfg))
  return loss_and_grads_at(variant, params, ot_mode=ot_mode)


def loss_and_grads_at(variant: str, params, *, ot_mode: str = "reference"):
  """(cfg, params, total, terms, grads) of the fixture batch at `params`."""
  cfg = reference_config(variant, ot_mode=ot_mode)
  model = sentiment.build_model(cfg)
  x, labels = inputs(variant)
  if cfg.data.train_mode == "classification":
    labels = labels.astype(jnp.int32)

  def loss_fn(p):
    logits, aux = model.apply({"params": p}, *x)
    return objective.decalign_objective(
        logits, aux, labels, cfg.loss, train_mode=cfg.data.train_mode)

  (total, terms), grads = jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True))(params)
  return cfg, params, total, terms, grads


def to_channel_last(x: np.ndarray) -> np.ndarray:
  """Reference [B, D, T] -> ours [B, T, D]."""
  return np.swapaxes(x, 1, 2)
