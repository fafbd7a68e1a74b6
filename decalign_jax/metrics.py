"""Sentiment and emotion metrics, ported from DecAlign's `MetricsTop`.

Pure numpy functions over host arrays; every metric function returns a
`dict[str, float]` of plain, unrounded Python floats. Key names say which
binary split is meant (`Has0_*` splits at `>= 0`, `Non0_*` drops neutral
labels), so the reference's ambiguous `Acc_2` / `F1_score` never appear;
`REFERENCE_METRIC_NAMES` maps the reference's keys onto ours.

Float inputs keep their dtype, so thresholds are compared in that dtype as the
reference does (a float32 prediction of -0.7 is not above the split -0.7).
"""

import functools
import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np

Metrics = dict[str, float]
MetricsFn = Callable[[np.ndarray, np.ndarray], Metrics]
TrainMode = Literal["regression", "classification"]

DATASETS = ("mosi", "mosei", "sims", "iemocap")
TRAIN_MODES = ("regression", "classification")
IEMOCAP_NUM_LABELS = 6

# Reference key -> our key, per metric family (see `metric_family`).
REFERENCE_METRIC_NAMES: dict[str, dict[str, str]] = {
    "mosi_regression": {
        "Acc_2": "Non0_acc_2", "F1_score": "Non0_F1_score", "MAE": "MAE",
        "Corr": "Corr", "Acc_7": "Acc_7",
    },
    "sims_regression": {
        k: k for k in ("Mult_acc_2", "Mult_acc_3", "Mult_acc_5", "F1_score",
                       "MAE", "Corr")
    },
    "classification": {
        "WAcc": "WAcc", "WAF1": "WAF1", "Acc": "Acc", "F1_score": "Weighted_F1",
    },
    # Same names; with reference_non0=False the Non0 values differ on purpose.
    "mosi_classification": {
        k: k for k in ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2",
                       "Non0_F1_score", "Acc_3", "F1_score_3")
    },
}

# (lo, hi] bucket edges of the SIMS multi-class accuracies.
_SIMS_SPLITS = {
    2: (-1.01, 0.0, 1.01),
    3: (-1.01, -0.1, 0.1, 1.01),
    5: (-1.01, -0.7, -0.1, 0.1, 0.7, 1.01),
}


def accuracy(y_a: np.ndarray, y_b: np.ndarray) -> float:
  """Fraction of equal entries (symmetric, like sklearn's `accuracy_score`).

  Args:
    y_a: labels, any shape with N entries.
    y_b: labels, any shape with N entries.

  Returns:
    mean(y_a == y_b); NaN when N == 0.
  """
  y_a, y_b = _flat_pair(y_a, y_b)
  return float(np.mean(y_a == y_b)) if y_a.size else float("nan")


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray, *,
                labels: np.ndarray | None = None) -> float:
  """Support-weighted F1, as sklearn `f1_score(average='weighted')`.

  Per class, F1 = 2 tp / (2 tp + fp + fn), 0 when the denominator is 0
  (`zero_division=0`); classes are averaged with weights = their support in
  `y_true`. Samples whose true label is outside `labels` count only as false
  positives of their predicted class.

  Args:
    y_true: true labels, any shape with N entries.
    y_pred: predicted labels, any shape with N entries.
    labels: classes to score; defaults to the sorted union of `y_true` and
      `y_pred`.

  Returns:
    The weighted F1; 0.0 when no true label lies in `labels`.
  """
  y_true, y_pred = _flat_pair(y_true, y_pred)
  if labels is None:
    labels = np.unique(np.concatenate([y_true, y_pred]))
  labels = np.asarray(labels).reshape(-1, 1)  # [L, 1]
  is_true = y_true[None, :] == labels  # [L, N]
  is_pred = y_pred[None, :] == labels
  tp = np.sum(is_true & is_pred, axis=1)
  support = np.sum(is_true, axis=1)
  denom = support + np.sum(is_pred, axis=1)  # 2 tp + fp + fn
  f1 = np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0)
  total = np.sum(support)
  return float(np.sum(f1 * support) / total) if total else 0.0


def pearson_corr(y_pred: np.ndarray, y_true: np.ndarray) -> float:
  """Pearson correlation via `np.corrcoef`; NaN (e.g. constant input) -> 0.

  Args:
    y_pred: predictions, any shape with N entries.
    y_true: targets, any shape with N entries.

  Returns:
    The correlation coefficient, or 0.0 where it is undefined.
  """
  y_pred, y_true = _flat_pair(y_pred, y_true)
  # A constant input divides 0 by 0 and N < 2 warns about degrees of freedom;
  # both are defined here as "no correlation", so keep them quiet.
  with np.errstate(all="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    corr = float(np.corrcoef(y_pred, y_true)[0, 1])
  return 0.0 if np.isnan(corr) else corr


def mosi_regression_metrics(y_pred: np.ndarray, y_true: np.ndarray) -> Metrics:
  """CMU-MOSI / CMU-MOSEI regression metrics (sentiment in [-3, 3]).

  Args:
    y_pred: predictions, `[N]` or `[N, 1]`.
    y_true: targets, `[N]` or `[N, 1]`.

  Returns:
    `Has0_acc_2`, `Has0_F1_score`: binary accuracy / weighted F1 of the `>= 0`
    split over all samples. `Non0_acc_2`, `Non0_F1_score` (the reference's
    `Acc_2` / `F1_score`): the same with the `> 0` split over samples whose
    label is not 0 (NaN / 0.0 if there are none). `Acc_5`, `Acc_7`:
    mean(round(clip(p)) == round(clip(y))) on [-2, 2] / [-3, 3], rounding half
    to even. `MAE` of the unclipped values. `Corr`: Pearson, 0.0 if undefined.
  """
  y_pred, y_true = _flat_pair(_as_float(y_pred), _as_float(y_true))
  non0 = y_true != 0
  return {
      "Has0_acc_2": accuracy(y_pred >= 0, y_true >= 0),
      "Has0_F1_score": weighted_f1(y_true >= 0, y_pred >= 0),
      "Non0_acc_2": accuracy(y_pred[non0] > 0, y_true[non0] > 0),
      "Non0_F1_score": weighted_f1(y_true[non0] > 0, y_pred[non0] > 0),
      "Acc_5": _rounded_acc(y_pred, y_true, bound=2.0),
      "Acc_7": _rounded_acc(y_pred, y_true, bound=3.0),
      "MAE": _mae(y_pred, y_true),
      "Corr": pearson_corr(y_pred, y_true),
  }


def sims_regression_metrics(y_pred: np.ndarray, y_true: np.ndarray) -> Metrics:
  """CH-SIMS regression metrics (sentiment in [-1, 1]).

  Both inputs are clipped to [-1, 1], then bucketed into (lo, hi] intervals
  (5 classes: edges -1.01, -0.7, -0.1, 0.1, 0.7, 1.01; see `_SIMS_SPLITS`). As
  in the reference, a value in no interval keeps its value (only NaN can).

  Args:
    y_pred: predictions, `[N]` or `[N, 1]`.
    y_true: targets, `[N]` or `[N, 1]`.

  Returns:
    `Mult_acc_2`, `Mult_acc_3`, `Mult_acc_5` (bucket accuracies), `F1_score`
    (weighted F1 of the 2 buckets), `MAE` and `Corr` (of the clipped values).
  """
  y_pred, y_true = _flat_pair(_as_float(y_pred), _as_float(y_true))
  y_pred, y_true = np.clip(y_pred, -1.0, 1.0), np.clip(y_true, -1.0, 1.0)
  buckets = {k: (_bucketize(y_pred, s), _bucketize(y_true, s))
             for k, s in _SIMS_SPLITS.items()}
  return {
      "Mult_acc_2": accuracy(*buckets[2]),
      "Mult_acc_3": accuracy(*buckets[3]),
      "Mult_acc_5": accuracy(*buckets[5]),
      "F1_score": weighted_f1(buckets[2][1], buckets[2][0]),
      "MAE": _mae(y_pred, y_true),
      "Corr": pearson_corr(y_pred, y_true),
  }


def classification_metrics(logits: np.ndarray, y_true: np.ndarray, *,
                           num_labels: int | None = None) -> Metrics:
  """Multi-class emotion metrics (IEMOCAP style).

  Args:
    logits: class scores, `[N, C]`; the prediction is their argmax.
    y_true: integer class labels, `[N]` or `[N, 1]` (floats are truncated to
      int, as the reference does).
    num_labels: if given, the weighted F1 scores classes `0..num_labels-1`
      (the reference always uses 6 for IEMOCAP); otherwise the union of true
      and predicted classes. Either way an absent class adds nothing.

  Returns:
    Dict with keys `Acc` (accuracy), `Weighted_F1` (support-weighted F1,
    zero_division=0) and their reference names `WAcc`, `WAF1` (same values).
  """
  y_hat = np.argmax(_as_logits(logits), axis=1)
  y_true = np.asarray(y_true).reshape(-1).astype(np.int64)
  labels = None if num_labels is None else np.arange(num_labels)
  acc = accuracy(y_true, y_hat)
  f1 = weighted_f1(y_true, y_hat, labels=labels)
  return {"Acc": acc, "Weighted_F1": f1, "WAcc": acc, "WAF1": f1}


def mosi_classification_metrics(logits: np.ndarray, y_true: np.ndarray, *,
                                reference_non0: bool = False) -> Metrics:
  """3-class sentiment metrics (Negative 0, Neutral 1, Positive 2).

  The binary metrics score argmax over `logits[:, [0, 2]]` (0 = negative,
  1 = positive). `Has0_*` uses all samples, labels split `y <= 1 -> 0, y == 2
  -> 1` (neutral joins negative, as in the reference). `Non0_*` drops y == 1.

  The reference compares that 0/1 argmax with the raw labels 0/2, so a correct
  positive never counts and its weighted F1 scores a phantom class 1 (on the
  golden case: Non0_acc_2 0.4151 where the intended value is 0.7484). By
  default (`reference_non0=False`) the label 2 is mapped to 1 before both
  comparisons, which is the corrected metric; `reference_non0=True`
  reproduces the reference bit for bit.

  Args:
    logits: class scores, `[N, 3]`.
    y_true: labels in {0, 1, 2}, `[N]` or `[N, 1]`.
    reference_non0: reproduce the reference's `Non0_*` bug (see above).

  Returns:
    Dict with keys `Acc_3`, `F1_score_3` (3-class accuracy / weighted F1),
    `Has0_acc_2`, `Has0_F1_score`, `Non0_acc_2`, `Non0_F1_score`; the `Non0`
    pair is NaN / 0.0 when every label is neutral.
  """
  logits = _as_logits(logits, width=3)
  y_true = np.asarray(y_true).reshape(-1)
  y_hat_3 = np.argmax(logits, axis=1)
  y_hat_2 = np.argmax(logits[:, [0, 2]], axis=1)
  has0_true = (y_true > 1).astype(np.int64)
  non0 = y_true != 1
  non0_true = y_true[non0] if reference_non0 else has0_true[non0]
  return {
      "Acc_3": accuracy(y_hat_3, y_true),
      "F1_score_3": weighted_f1(y_true, y_hat_3),
      "Has0_acc_2": accuracy(y_hat_2, has0_true),
      "Has0_F1_score": weighted_f1(has0_true, y_hat_2),
      "Non0_acc_2": accuracy(y_hat_2[non0], non0_true),
      "Non0_F1_score": weighted_f1(non0_true, y_hat_2[non0]),
  }


def metric_family(dataset: str, train_mode: str) -> str:
  """Names the metric family (a key of `REFERENCE_METRIC_NAMES`) to use.

  Args:
    dataset: `config.data.dataset`, one of `DATASETS` (case-insensitive).
    train_mode: `config.train_mode`, one of `TRAIN_MODES`.

  Returns:
    `mosi_regression`, `sims_regression`, `classification` (IEMOCAP) or
    `mosi_classification`.

  Raises:
    ValueError: for an unknown dataset or training mode.
  """
  name = str(dataset).lower()
  if name not in DATASETS:
    raise ValueError(
        f"Unknown data.dataset {dataset!r}; expected one of {DATASETS}.")
  _check_train_mode(train_mode)
  if train_mode == "regression":
    return "sims_regression" if name == "sims" else "mosi_regression"
  return "classification" if name == "iemocap" else "mosi_classification"


def get_metrics_fn(dataset: str, train_mode: TrainMode, *,
                   reference_non0: bool = False) -> MetricsFn:
  """Picks the metric function as the reference's `MetricsTop` does.

  Regression: mosi, mosei, iemocap -> `mosi_regression_metrics`; sims ->
  `sims_regression_metrics`. Classification: iemocap -> `classification_metrics`
  (6 labels); mosi, mosei, sims -> `mosi_classification_metrics`.

  Args:
    dataset: `config.data.dataset`, one of `DATASETS` (case-insensitive).
    train_mode: `config.train_mode`, one of `TRAIN_MODES`.
    reference_non0: passed to `mosi_classification_metrics`.

  Returns:
    `fn(y_pred, y_true) -> dict[str, float]`.

  Raises:
    ValueError: for an unknown dataset or training mode.
  """
  return {
      "mosi_regression": mosi_regression_metrics,
      "sims_regression": sims_regression_metrics,
      "classification": functools.partial(
          classification_metrics, num_labels=IEMOCAP_NUM_LABELS),
      "mosi_classification": functools.partial(
          mosi_classification_metrics, reference_non0=reference_non0),
  }[metric_family(dataset, train_mode)]


def metric_mode(name: str) -> Literal["max", "min"]:
  """Whether a metric improves upwards, as the reference trainer decides.

  Args:
    name: a metric name, e.g. `Non0_F1_score`, `WAF1`, `MAE`, `loss`.

  Returns:
    `'max'` if the lowercased name contains `acc`, `f1` or `corr`, else `'min'`.
  """
  name = (name or "").lower()
  return "max" if any(t in name for t in ("acc", "f1", "corr")) else "min"


def baseline_predictions(train_labels: np.ndarray, n: int, *,
                         train_mode: TrainMode,
                         num_classes: int | None = None) -> np.ndarray:
  """Predictions of the trivial baseline fitted on the training labels.

  Args:
    train_labels: training labels, any shape.
    n: number of predictions (evaluation samples).
    train_mode: `'regression'` or `'classification'`.
    num_classes: classification only; the logit width, by default the largest
      training label + 1.

  Returns:
    Regression: the training-label mean, `[n, 1]` (float32 unless the labels
    are another float type). Classification: `[n, num_classes]` float32 logits,
    1 at the majority training class (ties -> smallest class), 0 elsewhere.

  Raises:
    ValueError: unknown `train_mode`, no labels, or a label out of range.
  """
  labels = np.asarray(train_labels).reshape(-1)
  _check_train_mode(train_mode)
  if labels.size == 0:
    raise ValueError("baseline_predictions needs at least one training label.")
  if train_mode == "regression":
    is_float = np.issubdtype(labels.dtype, np.floating)
    return np.full((n, 1), np.mean(labels, dtype=np.float64),
                   dtype=labels.dtype if is_float else np.float32)
  classes = labels.astype(np.int64)
  if num_classes is None:
    num_classes = int(classes.max()) + 1
  if classes.min() < 0 or classes.max() >= num_classes:
    raise ValueError(f"Training labels must lie in 0..{num_classes - 1}, "
                     f"got {classes.min()}..{classes.max()}.")
  majority = int(np.argmax(np.bincount(classes, minlength=num_classes)))
  logits = np.zeros((n, num_classes), dtype=np.float32)
  logits[:, majority] = 1.0
  return logits


def _check_train_mode(train_mode: str) -> None:
  if train_mode not in TRAIN_MODES:
    raise ValueError(
        f"Unknown train_mode {train_mode!r}; expected one of {TRAIN_MODES}.")


def _as_float(x: np.ndarray) -> np.ndarray:
  """Keeps a float array's dtype (the reference thresholds in it)."""
  x = np.asarray(x)
  return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def _as_logits(logits: np.ndarray, width: int | None = None) -> np.ndarray:
  logits = np.asarray(logits)
  if logits.ndim != 2 or width not in (None, logits.shape[1]):
    raise ValueError(
        f"Expected [N, {width or 'C'}] logits, got shape {logits.shape}.")
  return logits


def _flat_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Flattens two arrays ([N] or [N, 1]) and checks they pair up."""
  a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
  if a.shape != b.shape:
    raise ValueError(f"Got {a.size} predictions for {b.size} labels.")
  return a, b


def _rounded_acc(y_pred: np.ndarray, y_true: np.ndarray, *, bound: float):
  """Accuracy of the half-to-even rounded values clipped to [-bound, bound]."""
  return accuracy(np.round(np.clip(y_pred, -bound, bound)),
                  np.round(np.clip(y_true, -bound, bound)))


def _mae(y_pred: np.ndarray, y_true: np.ndarray) -> float:
  """Mean in the input dtype, as the reference does before its float64 cast."""
  return float(np.mean(np.abs(y_pred - y_true)))


def _bucketize(values: np.ndarray, splits: tuple[float, ...]) -> np.ndarray:
  """Index i of the interval (splits[i], splits[i+1]] holding each value.

  Splits are compared in the values' dtype. Values in no interval keep their
  own value, as in the reference.
  """
  edges = np.asarray(splits, dtype=values.dtype)
  idx = np.searchsorted(edges, values, side="left") - 1  # edges[i] < v <= ..
  inside = (idx >= 0) & (idx < len(edges) - 1)
  return np.where(inside, idx, values).astype(values.dtype)
