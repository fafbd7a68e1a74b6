"""Tests for the grain train/eval pipelines."""

import numpy as np
import pytest

from decalign_jax.data import mmsa
from decalign_jax.data import pipeline

_N = 37


def _split(n=_N, classification=False, use_bert=False):
  """A split whose every feature value encodes the sample's row."""
  rows = np.arange(n, dtype=np.float32)[:, None, None]
  if use_bert:
    text = np.broadcast_to(np.arange(n)[:, None, None], (n, 3, 4)).copy()
  else:
    text = np.broadcast_to(rows + 0.5, (n, 4, 3)).copy()
  label = (np.arange(n) % 3).astype(np.int32) if classification else (
      np.arange(n, dtype=np.float32) + 0.25)
  return mmsa.Split(
      text=text, audio=np.broadcast_to(rows + 1, (n, 5, 2)).copy(),
      vision=np.broadcast_to(rows + 2, (n, 6, 3)).copy(), label=label,
      audio_lengths=np.full(n, 4, np.int32),
      vision_lengths=(np.arange(n) % 6 + 1).astype(np.int32),
      ids=np.array([f"id{i}" for i in range(n)], dtype=object))


@pytest.fixture(scope="module")
def split():
  return _split()


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_batch_consistent(batch, split):
  assert tuple(batch) == pipeline.BATCH_KEYS
  idx = batch["index"]
  real = batch["_mask"] == 1
  np.testing.assert_array_equal(batch["audio"][real, 0, 0], idx[real] + 1)
  np.testing.assert_array_equal(batch["vision"][real, 0, 0], idx[real] + 2)
  np.testing.assert_array_equal(batch["label"][real], split.label[idx[real]])
  np.testing.assert_array_equal(batch["vision_lengths"][real],
                                split.vision_lengths[idx[real]])


def test_train_batches_drop_remainder(split):
  assert pipeline.steps_per_epoch(split, 8) == 4
  batches = list(pipeline.make_train_iterator(split, batch_size=8, seed=0,
                                              num_epochs=1))
  assert len(batches) == 4
  for b in batches:
    _assert_batch_consistent(b, split)
    assert b["text"].shape == (8, 4, 3) and b["text"].dtype == np.float32
    assert b["label"].dtype == np.float32
    assert b["index"].dtype == np.int32 and b["_mask"].dtype == np.float32
    assert b["audio_lengths"].dtype == np.int32
    np.testing.assert_array_equal(b["_mask"], 1.0)
  seen = np.concatenate([b["index"] for b in batches])
  assert len(np.unique(seen)) == 32  # one epoch, 5 samples dropped.


def test_shuffle_is_seeded_and_varies_by_epoch(split):
  def order(seed):
    it = pipeline.make_train_iterator(split, batch_size=8, seed=seed)
    return np.stack([b["index"] for b in _take(it, 8)])
  a, b = order(7), order(7)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, order(8))
  assert not np.array_equal(a[:4], a[4:])  # epoch 2 reshuffled.
  for epoch in (a[:4], a[4:]):
    assert len(np.unique(epoch)) == 32  # no repeats within an epoch.


def test_shards_partition_the_global_batch(split):
  whole = _take(pipeline.make_train_iterator(split, batch_size=8, seed=3), 6)
  shards = [_take(pipeline.make_train_iterator(
      split, batch_size=8, seed=3, shard_index=i, shard_count=2), 6)
            for i in range(2)]
  for k in range(6):
    assert shards[0][k]["text"].shape[0] == 4
    got = np.concatenate([shards[0][k]["index"], shards[1][k]["index"]])
    np.testing.assert_array_equal(np.sort(got), np.sort(whole[k]["index"]))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(batch_size=8, shard_count=3), r"batch_size=8 is not divisible"),
    (dict(batch_size=8, shard_index=2, shard_count=2), r"shard_index=2"),
    (dict(batch_size=64), r"batch_size=64 exceeds the split's 37 samples"),
])
def test_bad_train_settings_raise(split, kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    pipeline.make_train_iterator(split, seed=0, **kwargs)


@pytest.mark.parametrize("taken", [3, 5])  # 5 crosses the epoch boundary.
def test_iterator_state_restores(split, taken):
  it = pipeline.make_train_iterator(split, batch_size=8, seed=1)
  _take(it, taken)
  state = it.get_state()
  expected = _take(it, 2)
  fresh = pipeline.make_train_iterator(split, batch_size=8, seed=1)
  fresh.set_state(state)
  for want, got in zip(expected, _take(fresh, 2)):
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(want[key], got[key])


def test_eval_covers_each_sample_once_with_static_shapes(split):
  assert pipeline.num_eval_batches(split, 8) == 5
  batches = list(pipeline.make_eval_batches(split, batch_size=8))
  assert len(batches) == 5
  for b in batches:
    assert b["text"].shape == (8, 4, 3)
    _assert_batch_consistent(b, split)
  idx = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["_mask"] for b in batches])
  np.testing.assert_array_equal(idx[mask == 1], np.arange(_N))  # in order.
  assert mask.sum() == _N
  last = batches[-1]
  pad = last["_mask"] == 0
  assert pad.sum() == 3
  np.testing.assert_array_equal(last["index"][pad], -1)
  for key in ("text", "audio", "vision", "label"):
    np.testing.assert_array_equal(last[key][pad], 0)
  np.testing.assert_array_equal(last["vision_lengths"][pad], 6)
  # Re-iterable and deterministic.
  again = list(pipeline.make_eval_batches(split, batch_size=8))
  np.testing.assert_array_equal(again[2]["audio"], batches[2]["audio"])


def test_eval_shards_cover_each_sample_once(split):
  idx, mask = [], []
  for i in range(4):
    for b in pipeline.make_eval_batches(split, batch_size=8, shard_index=i,
                                        shard_count=4):
      assert b["index"].shape == (2,)
      idx.append(b["index"])
      mask.append(b["_mask"])
  idx, mask = np.concatenate(idx), np.concatenate(mask)
  np.testing.assert_array_equal(np.sort(idx[mask == 1]), np.arange(_N))


def test_classification_and_bert_dtypes():
  b = next(pipeline.make_train_iterator(_split(classification=True),
                                        batch_size=4, seed=0))
  assert b["label"].dtype == np.int32
  ev = list(pipeline.make_eval_batches(_split(use_bert=True), batch_size=16))
  assert ev[0]["text"].dtype == np.int64 and ev[0]["text"].shape == (16, 3, 4)
  np.testing.assert_array_equal(ev[-1]["text"][ev[-1]["_mask"] == 0], 0)
