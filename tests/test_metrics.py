"""Tests for decalign_jax.metrics against the reference's golden outputs."""

import json
import os
import warnings

import numpy as np
import pytest

from decalign_jax import metrics

_CASES = (
    "mosi_regression",
    "mosei_regression",
    "mosi_regression_constant_pred",
    "sims_regression",
    "iemocap_classification_6",
    "iemocap_classification_4",
    "mosi_classification_3",
)


@pytest.fixture(scope="module")
def golden():
  here = os.path.join(os.path.dirname(__file__), "fixtures")
  with open(os.path.join(here, "metrics_golden.json")) as f:
    cases = json.load(f)["cases"]
  with np.load(os.path.join(here, "metrics_golden.npz")) as arrays:
    arrays = dict(arrays)
  return cases, arrays


def _brute_weighted_f1(y_true, y_pred, labels=None):
  y_true, y_pred = list(np.ravel(y_true)), list(np.ravel(y_pred))
  if labels is None:
    labels = sorted(set(y_true) | set(y_pred))
  num, den = 0.0, 0
  for c in labels:
    tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
    fp = sum(t != c and p == c for t, p in zip(y_true, y_pred))
    fn = sum(t == c and p != c for t, p in zip(y_true, y_pred))
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    num += f1 * (tp + fn)
    den += tp + fn
  return num / den if den else 0.0


@pytest.mark.parametrize("case", _CASES)
def test_golden_reproduced(golden, case):
  cases, arrays = golden
  spec = cases[case]
  fn = metrics.get_metrics_fn(
      spec["dataset"], spec["train_mode"], reference_non0=True
  )
  ours = fn(arrays[f"{case}/y_pred"], arrays[f"{case}/y_true"])
  names = metrics.REFERENCE_METRIC_NAMES[
      metrics.metric_family(spec["dataset"], spec["train_mode"])
  ]
  assert set(names) == set(spec["results"])
  for ref_key, value in spec["results"].items():
    assert round(ours[names[ref_key]], 4) == value, ref_key
  assert all(type(v) is float for v in ours.values())
  assert "Acc_2" not in ours


def test_golden_default_matches_reference_outside_non0(golden):
  cases, arrays = golden
  for case in _CASES:
    spec = cases[case]
    args = arrays[f"{case}/y_pred"], arrays[f"{case}/y_true"]
    fixed = metrics.get_metrics_fn(spec["dataset"], spec["train_mode"])(*args)
    buggy = metrics.get_metrics_fn(
        spec["dataset"], spec["train_mode"], reference_non0=True
    )(*args)
    if case != "mosi_classification_3":
      assert fixed == buggy


def test_mosi_classification_non0_corrected(golden):
  _, arrays = golden
  logits = arrays["mosi_classification_3/y_pred"]
  y = arrays["mosi_classification_3/y_true"].reshape(-1)
  buggy = metrics.mosi_classification_metrics(logits, y, reference_non0=True)
  fixed = metrics.mosi_classification_metrics(logits, y)
  assert round(buggy["Non0_acc_2"], 4) == 0.4151
  # Brute force: keep negatives / positives, positive iff logit 2 > logit 0.
  pairs = [
      (int(z[2] > z[0]), int(t == 2)) for z, t in zip(logits, y) if t != 1
  ]
  acc = sum(p == t for p, t in pairs) / len(pairs)
  f1 = _brute_weighted_f1([t for _, t in pairs], [p for p, _ in pairs])
  assert fixed["Non0_acc_2"] == pytest.approx(acc, abs=1e-12)
  assert fixed["Non0_F1_score"] == pytest.approx(f1, abs=1e-12)
  assert round(fixed["Non0_acc_2"], 4) == 0.7484
  for key in ("Acc_3", "F1_score_3", "Has0_acc_2", "Has0_F1_score"):
    assert fixed[key] == buggy[key]


def test_weighted_f1_brute_force(np_rng):
  for _ in range(20):
    y_true = np_rng.integers(0, 5, 40)  # class 5 absent from truth
    y_pred = np_rng.integers(1, 6, 40)  # class 0 absent from predictions
    assert metrics.weighted_f1(y_true, y_pred) == pytest.approx(
        _brute_weighted_f1(y_true, y_pred), abs=1e-12
    )
    labels = np.arange(7)  # class 6 absent from both
    assert metrics.weighted_f1(y_true, y_pred, labels=labels) == pytest.approx(
        _brute_weighted_f1(y_true, y_pred, labels), abs=1e-12
    )
  assert metrics.weighted_f1([0, 0], [1, 1], labels=[2]) == 0.0


def test_accuracy_symmetric_and_shapes(np_rng):
  a = np_rng.integers(0, 3, 17)
  b = np_rng.integers(0, 3, 17)
  assert metrics.accuracy(a, b) == metrics.accuracy(b[:, None], a)
  y = np_rng.normal(size=17).astype(np.float32)
  p = y + np_rng.normal(size=17).astype(np.float32)
  assert metrics.mosi_regression_metrics(p, y) == (
      metrics.mosi_regression_metrics(p[:, None], y[:, None])
  )
  with pytest.raises(ValueError, match="16 predictions for 17 labels"):
    metrics.mosi_regression_metrics(p[:16], y)


def test_mosi_regression_keys_and_brute_force(np_rng):
  y = np.round(np_rng.uniform(-3, 3, 29) * 3) / 3
  y[:4] = 0.0
  p = y + np_rng.normal(size=29)
  p[4] = 0.0  # >= 0 but not > 0
  out = metrics.mosi_regression_metrics(p, y)
  assert list(out) == [
      "Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score",
      "Acc_5", "Acc_7", "MAE", "Corr",
  ]
  nz = y != 0
  assert out["Has0_acc_2"] == np.mean((p >= 0) == (y >= 0))
  assert out["Non0_acc_2"] == np.mean((p[nz] > 0) == (y[nz] > 0))
  assert out["Non0_F1_score"] == pytest.approx(
      _brute_weighted_f1(y[nz] > 0, p[nz] > 0), abs=1e-12
  )
  assert out["Acc_5"] == np.mean(
      np.round(np.clip(p, -2, 2)) == np.round(np.clip(y, -2, 2))
  )
  assert out["MAE"] == pytest.approx(np.mean(np.abs(p - y)))
  # Half to even: 0.5 -> 0 and 2.5 -> 2, so these all agree.
  half = metrics.mosi_regression_metrics(
      np.array([0.5, 2.5, -1.5]), np.array([0.0, 2.0, -2.0])
  )
  assert half["Acc_7"] == 1.0


def test_sims_bucket_edges_match_reference_loop():
  def ref_bucketize(values, splits):  # the reference's loop, restated
    out = values.copy()
    for i in range(len(splits) - 1):
      out[(values > splits[i]) & (values <= splits[i + 1])] = i
    return out

  values = np.array(
      [-2.0, -1.01, -1.0, -0.7, -0.69, -0.1, 0.0, 0.1, 0.7, 1.0, 1.01, 1.5,
       np.nan], dtype=np.float32,
  )
  # pylint: disable=protected-access
  for splits in metrics._SIMS_SPLITS.values():
    np.testing.assert_array_equal(
        metrics._bucketize(values, splits),
        ref_bucketize(values, splits),
    )
  # float32 -0.7 is not above the float32 split -0.7: lowest 5-bucket.
  out = metrics.sims_regression_metrics(
      np.float32([-0.7, 0.1]), np.float32([-0.8, 0.05])
  )
  assert out["Mult_acc_5"] == 1.0


def test_constant_predictions_corr_zero():
  y = np.linspace(-3, 3, 17, dtype=np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = metrics.mosi_regression_metrics(np.full(17, 0.3, np.float32), y)
    sims = metrics.sims_regression_metrics(np.full(17, 5.0), y)
    single = metrics.pearson_corr(np.ones(1), np.ones(1))
  assert out["Corr"] == 0.0 and sims["Corr"] == 0.0 and single == 0.0


def test_classification_metrics(np_rng):
  logits = np_rng.normal(size=(29, 4))
  y = np_rng.integers(0, 4, (29, 1)).astype(np.float32)
  out = metrics.classification_metrics(logits, y, num_labels=6)
  assert set(out) == {"Acc", "Weighted_F1", "WAcc", "WAF1"}
  assert out["Acc"] == out["WAcc"] == np.mean(logits.argmax(1) == y[:, 0])
  assert out["WAF1"] == out["Weighted_F1"] == pytest.approx(
      _brute_weighted_f1(y[:, 0], logits.argmax(1), range(6)), abs=1e-12
  )
  with pytest.raises(ValueError, match=r"\[N, 3\]"):
    metrics.mosi_classification_metrics(logits, y)


@pytest.mark.parametrize(
    "dataset, train_mode, fn",
    [
        ("mosi", "regression", metrics.mosi_regression_metrics),
        ("MOSEI", "regression", metrics.mosi_regression_metrics),
        ("iemocap", "regression", metrics.mosi_regression_metrics),
        ("sims", "regression", metrics.sims_regression_metrics),
    ],
)
def test_dispatch_regression(dataset, train_mode, fn):
  assert metrics.get_metrics_fn(dataset, train_mode) is fn


def test_dispatch_classification():
  fn = metrics.get_metrics_fn("iemocap", "classification")
  assert fn.func is metrics.classification_metrics
  assert fn.keywords == {"num_labels": 6}
  for dataset in ("mosi", "mosei", "sims"):
    fn = metrics.get_metrics_fn(dataset, "classification", reference_non0=True)
    assert fn.func is metrics.mosi_classification_metrics
    assert fn.keywords == {"reference_non0": True}


def test_dispatch_errors():
  with pytest.raises(ValueError, match=r"data\.dataset 'imdb'.*mosi"):
    metrics.get_metrics_fn("imdb", "regression")
  with pytest.raises(ValueError, match=r"train_mode 'ranking'.*regression"):
    metrics.get_metrics_fn("mosi", "ranking")


def test_metric_mode():
  for name in ("Non0_acc_2", "WAF1", "WAcc", "Corr", "Weighted_F1", "Acc_7"):
    assert metrics.metric_mode(name) == "max"
  for name in ("MAE", "loss", "MOSI", None):
    assert metrics.metric_mode(name) == "min"


def test_baseline_predictions():
  reg = metrics.baseline_predictions(
      np.float32([[1.0], [2.0], [-0.5]]), 5, train_mode="regression"
  )
  assert reg.shape == (5, 1) and reg.dtype == np.float32
  np.testing.assert_allclose(reg, 2.5 / 3)
  out = metrics.mosi_regression_metrics(reg, np.float32([1, -1, 0, 2, 3]))
  assert out["Corr"] == 0.0

  cls = metrics.baseline_predictions(
      np.array([2, 0, 2, 1, 1]), 4, train_mode="classification",
      num_classes=6,
  )
  assert cls.shape == (4, 6)
  np.testing.assert_array_equal(cls.argmax(1), 1)  # tie 1 vs 2 -> smaller
  assert cls.sum() == 4
  inferred = metrics.baseline_predictions(
      np.float32([[2], [2], [0]]), 3, train_mode="classification"
  )
  assert inferred.shape == (3, 3) and np.all(inferred.argmax(1) == 2)
  with pytest.raises(ValueError, match="train_mode"):
    metrics.baseline_predictions(np.ones(3), 2, train_mode="ranking")
  with pytest.raises(ValueError, match="0..2"):
    metrics.baseline_predictions(
        np.array([3]), 2, train_mode="classification", num_classes=3
    )
