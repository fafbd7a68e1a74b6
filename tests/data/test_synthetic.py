"""Tests for the synthetic MMSA generator and its planted structure."""

import time

import numpy as np
import pytest

from decalign_jax.data import mmsa
from decalign_jax.data import synthetic

_SMALL = dict(num_train=40, num_valid=12, num_test=10, seq_len=8,
              feature_dims=(16, 5, 6))


@pytest.fixture(scope="module")
def default_data():
  start = time.perf_counter()
  data = synthetic.make_synthetic_mmsa()
  # Generous bound for a shared 2-core machine; typically ~1.5 s.
  assert time.perf_counter() - start < 10.0
  return data


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for split in a:
    assert a[split].keys() == b[split].keys()
    for key in a[split]:
      assert a[split][key].dtype == b[split][key].dtype
      assert a[split][key].tobytes() == b[split][key].tobytes(), (split, key)


def test_same_seed_same_bytes_different_seed_differs():
  _assert_same(synthetic.make_synthetic_mmsa(seed=1, **_SMALL),
               synthetic.make_synthetic_mmsa(seed=1, **_SMALL))
  a = synthetic.make_synthetic_mmsa(seed=1, **_SMALL)
  b = synthetic.make_synthetic_mmsa(seed=2, **_SMALL)
  for key in ("text", "audio", "vision", "regression_labels"):
    assert not np.array_equal(a["train"][key], b["train"][key]), key


def test_resizing_train_leaves_other_splits_unchanged():
  a = synthetic.make_synthetic_mmsa(**_SMALL)
  b = synthetic.make_synthetic_mmsa(**{**_SMALL, "num_train": 25})
  _assert_same({"test": a["test"]}, {"test": b["test"]})


def test_format_matches_mmsa(default_data):
  for split, n in (("train", 1024), ("valid", 256), ("test", 256)):
    d = default_data[split]
    assert d["text"].shape == (n, 50, 768) and d["text"].dtype == np.float32
    assert d["audio"].shape == (n, 50, 5)
    assert d["vision"].shape == (n, 50, 20)
    assert d["regression_labels"].shape == (n, 1)
    assert d["regression_labels"].dtype == np.float32
    assert np.abs(d["regression_labels"]).max() <= 3.0
    assert d["classification_labels"].shape == (n, 1)
    assert len(d["id"]) == len(d["raw_text"]) == n
  assert default_data["train"]["raw_text"][12] == "synthetic sample 12"
  counts = np.bincount(
      default_data["train"]["classification_labels"][:, 0].astype(int))
  assert len(counts) == 3 and counts.min() > 0.25 * 1024  # near-balanced.


def test_padding_is_zero_tail_with_recorded_lengths(default_data):
  d = default_data["train"]
  for name in ("audio", "vision"):
    lengths = d[f"{name}_lengths"]
    assert 0.15 < np.mean(lengths < 50) < 0.35
    frame_is_zero = np.all(d[name] == 0, axis=-1)
    in_tail = np.arange(50)[None, :] >= lengths[:, None]
    np.testing.assert_array_equal(frame_is_zero, in_tail)


def test_classification_variant():
  d = synthetic.make_synthetic_mmsa(train_mode="classification",
                                    num_classes=5, **_SMALL)["train"]
  labels = d["classification_labels"][:, 0]
  assert set(np.unique(labels)) <= set(range(5))
  # Bins are monotone in the regression label.
  order = np.argsort(d["regression_labels"][:, 0])
  assert np.all(np.diff(labels[order]) >= 0)
  with pytest.raises(ValueError, match="needs num_classes >= 2"):
    synthetic.make_synthetic_mmsa(train_mode="classification", **_SMALL)
  # Regression configs pass num_classes=1 (the output width).
  d = synthetic.make_synthetic_mmsa(num_classes=1, **_SMALL)["train"]
  assert set(np.unique(d["classification_labels"])) <= {0, 1, 2}


def test_written_file_loads(tmp_path):
  path = synthetic.write_synthetic_mmsa(tmp_path / "sub" / "syn.pkl",
                                        **_SMALL)
  splits = mmsa.load_mmsa(path, feature_dims=_SMALL["feature_dims"],
                          train_mode="classification", num_classes=3)
  assert splits["valid"].num_examples == 12
  assert splits["train"].label.dtype == np.int32


def _pooled(d, modalities):
  """Time-mean over real frames, concatenated over modalities."""
  feats = []
  for m in modalities:
    lengths = d.get(f"{m}_lengths", np.full(len(d[m]), d[m].shape[1]))
    feats.append(d[m].sum(1) / lengths[:, None])
  return np.concatenate(feats, axis=1)


def _ridge_r2(train, test, modalities, lam=10.0):
  x, x_test = _pooled(train, modalities), _pooled(test, modalities)
  mu, sd = x.mean(0), x.std(0) + 1e-6
  x, x_test = (x - mu) / sd, (x_test - mu) / sd
  y, y_test = train["regression_labels"][:, 0], test["regression_labels"][:, 0]
  w = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ (y - y.mean()))
  pred = x_test @ w + y.mean()
  # R^2 against predicting the train mean.
  return 1 - np.mean((pred - y_test) ** 2) / np.mean((y.mean() - y_test) ** 2)


def test_linear_probe_needs_all_modalities(default_data):
  train, test = default_data["train"], default_data["test"]
  r2_all = _ridge_r2(train, test, ("text", "audio", "vision"))
  r2_single = {m: _ridge_r2(train, test, (m,))
               for m in ("text", "audio", "vision")}
  # Far better than the mean; and each modality misses the others' unique
  # factors (~40% of the variance), so no single one comes close.
  assert r2_all > 0.75, r2_all
  assert max(r2_single.values()) < r2_all - 0.2, (r2_single, r2_all)
  assert min(r2_single.values()) > 0.2, r2_single  # shared part is there.
