"""Multimodal sentiment / emotion task: DecAlign on MMSA-format data."""

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from decalign_jax import metrics as metrics_lib
from decalign_jax.data import mmsa
from decalign_jax.data import pipeline
from decalign_jax.data import synthetic
from decalign_jax.losses import objective
from decalign_jax.models import align
from decalign_jax.models import cpu_attention
from decalign_jax.models import decalign
from decalign_jax.models import text as text_lib
from decalign_jax.models import text_loading
from decalign_jax.tasks import base

MODEL_INPUTS = ("text", "audio", "vision")
log = logging.getLogger(__name__)


def text_encoder_config(config: ml_collections.ConfigDict
                        ) -> text_lib.BertConfig | None:
  """The BERT config of `model.text_model_dir`, or None (precomputed text)."""
  model_dir = config.model.text_model_dir
  if not model_dir:
    return None
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"config field model.text_model_dir={model_dir!r} has no config.json."
        " Nothing is downloaded; " + text_loading.HOW_TO_GET_WEIGHTS.replace(
            "DIR", repr(model_dir)))
  return text_lib.BertConfig.from_json_file(path)


def build_model(config: ml_collections.ConfigDict) -> decalign.DecAlign:
  """The DecAlign module described by `config.model` and `config.data`."""
  mc = config.model
  bert = text_encoder_config(config)
  feature_dims = tuple(mc.feature_dims)
  if bert is not None:
    feature_dims = (bert.hidden_size,) + feature_dims[1:]
  num_outputs = (config.data.num_classes
                 if config.data.train_mode == "classification" else 1)
  hetero = align.HeteroSettings(
      num_prototypes=mc.num_prototypes, gmm_em_iters=mc.gmm_em_iters,
      gmm_var_floor=mc.gmm_var_floor, ot_epsilon=mc.lambda_ot,
      ot_num_iters=mc.ot_num_iters, ot_mode=mc.ot_mode,
      cost_reduction=mc.hetero_cost_reduction,
      mahalanobis=mc.local_proto_mahalanobis)
  return decalign.DecAlign(
      feature_dims=feature_dims, num_outputs=num_outputs,
      d_model=mc.d_model, num_heads=mc.num_heads, num_layers=mc.num_layers,
      conv_kernels=tuple(mc.conv_kernels), hetero=hetero,
      pde_dim=mc.pde_dim, mmd_bandwidth=mc.mmd_bandwidth,
      use_sequence_mask=mc.use_sequence_mask,
      use_cross_modal_attention=mc.use_cross_modal_attention,
      attn_mask=mc.attn_mask, causal_in_cross=mc.causal_in_cross,
      attention_kernel=cpu_attention.resolve(mc.attention_kernel),
      active_modalities=tuple(mc.active_modalities),
      attn_dropout=mc.attn_dropout, attn_dropout_a=mc.attn_dropout_a,
      attn_dropout_v=mc.attn_dropout_v, relu_dropout=mc.relu_dropout,
      embed_dropout=mc.embed_dropout, res_dropout=mc.res_dropout,
      output_dropout=mc.output_dropout, text_dropout=mc.text_dropout,
      text_encoder=bert, freeze_text_encoder=mc.freeze_text)


def load_splits(config: ml_collections.ConfigDict, workdir: str
                ) -> dict[str, mmsa.Split]:
  """Reads (or, for `data.source='synthetic'`, first writes) the data."""
  dc = config.data
  path = dc.path
  if dc.source == "synthetic":
    if not path:
      path = os.path.join(workdir, "synthetic_mmsa.pkl")
    if not os.path.exists(path):
      log.info("Writing the synthetic MMSA-format dataset to %s", path)
      synthetic.write_synthetic_mmsa(
          path, seed=dc.synthetic.seed, num_train=dc.synthetic.num_train,
          num_valid=dc.synthetic.num_valid, num_test=dc.synthetic.num_test,
          seq_len=dc.synthetic.seq_len,
          feature_dims=tuple(config.model.feature_dims),
          train_mode=dc.train_mode, num_classes=dc.num_classes)
  elif not path:
    raise mmsa.DataError(
        "config field data.path is empty: give the MMSA pickle with "
        "--config.data.path=/path/to/file.pkl")
  return mmsa.load_mmsa(
      path, train_mode=dc.train_mode,
      use_bert=bool(config.model.text_model_dir),
      feature_dims=tuple(config.model.feature_dims),
      num_classes=dc.num_classes if dc.train_mode == "classification"
      else None,
      standardize=tuple(dc.standardize),
      clip_percentiles=tuple(dc.clip_percentiles))


def _model_inputs(batch: dict[str, Any]) -> tuple[Any, Any, Any]:
  return tuple(batch[k] for k in MODEL_INPUTS)


def make_task(config: ml_collections.ConfigDict, workdir: str, *,
              splits: dict[str, mmsa.Split] | None = None,
              shard_index: int = 0, shard_count: int = 1) -> base.Task:
  """Builds the sentiment task from the config.

  Args:
    config: run config.
    workdir: where synthetic data is written when needed.
    splits: already loaded data (skips reading).
    shard_index: this process's index, for per-host data slices.
    shard_count: number of processes.

  Returns:
    the Task.
  """
  splits = splits if splits is not None else load_splits(config, workdir)
  dc, lc = config.data, config.loss
  train_mode = dc.train_mode
  model = build_model(config)
  metrics_fn = metrics_lib.get_metrics_fn(
      dc.dataset, train_mode, reference_non0=config.eval.reference_non0)
  train_split = splits["train"]
  batch_size = config.batch_size

  def init_params(rng):
    shapes = {k: np.zeros((1,) + getattr(train_split, k).shape[1:],
                          np.int32 if getattr(train_split, k).dtype.kind in
                          "iu" else np.float32) for k in MODEL_INPUTS}
    return model.init({"params": rng}, *_model_inputs(shapes))["params"]

  def pretrained(params):
    # Host-side: the backbone's weights replace its random init.
    if not config.model.text_model_dir:
      return params
    _, bert_params = text_loading.load_pretrained(
        config.model.text_model_dir)
    return dict(params, text_model=bert_params)

  def loss_fn(params, batch, rng, train):
    logits, aux = model.apply(
        {"params": params}, *_model_inputs(batch), train=train,
        rngs={"dropout": rng} if train else None)
    return objective.decalign_objective(
        logits, aux, batch["label"], lc, train_mode=train_mode)

  def predict_fn(params, batch):
    logits, _ = model.apply({"params": params}, *_model_inputs(batch))
    return logits

  def train_batches(epoch: int):
    # One iterator per epoch, reseeded by epoch: resuming at an epoch
    # boundary needs no iterator state.
    return iter(pipeline.make_train_iterator(
        train_split, batch_size=batch_size, seed=config.seed * 1000 + epoch,
        num_epochs=1, shard_index=shard_index, shard_count=shard_count))

  def eval_batches(name):
    return lambda: pipeline.make_eval_batches(
        splits[name], batch_size=config.eval.batch_size or batch_size,
        shard_index=shard_index, shard_count=shard_count)

  def main_loss(y_pred, y_true):
    return float(objective.task_loss(
        jnp.asarray(y_pred), jnp.asarray(y_true), lc, train_mode=train_mode))

  def evaluate(name, preds, labels, masks):
    del name
    keep = masks > 0
    y_pred, y_true = preds[keep], labels[keep]
    results = metrics_fn(y_pred, y_true)
    # Sample-weighted mean; the reference averages per-batch means.
    results["loss"] = main_loss(y_pred, y_true)
    return results

  def baseline(name):
    y_true = splits[name].label
    y_pred = metrics_lib.baseline_predictions(
        train_split.label, len(y_true), train_mode=train_mode,
        num_classes=dc.num_classes)
    results = metrics_fn(y_pred, y_true)
    results["loss"] = main_loss(y_pred, y_true)
    return results

  example = next(train_batches(0))
  info = (f"DecAlign on {dc.source}:{dc.dataset} ({train_mode}); "
          f"train/valid/test = " + "/".join(
              str(splits[k].num_examples) for k in ("train", "valid", "test"))
          + ("; text: fine-tuning the BERT backbone in "
             f"{config.model.text_model_dir} on `text_bert` ids"
             + (" (frozen)" if config.model.freeze_text else "")
             if config.model.text_model_dir else
             f"; text: precomputed features {train_split.text.shape[1:]}")
          + f"; attention: {model.attention_kernel}")
  return base.Task(
      init_params=init_params, loss_fn=loss_fn, predict_fn=predict_fn,
      train_batches=train_batches,
      steps_per_epoch=pipeline.steps_per_epoch(train_split, batch_size),
      eval_batches={k: eval_batches(k) for k in ("valid", "test")},
      evaluate=evaluate, baseline=baseline, example_batch=example, info=info,
      pretrained=pretrained)
