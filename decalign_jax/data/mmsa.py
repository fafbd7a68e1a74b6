"""Reader for MMSA-format feature pickles (CMU-MOSI/MOSEI, CH-SIMS, IEMOCAP).

An MMSA pickle is a dict `{split: {key: array}}` with splits `train`, `valid`,
`test` and keys `text` [N, T, D_l] (or `text_bert` [N, 3, T] token ids),
`audio` [N, T_a, D_a], `vision` [N, T_v, D_v], optional `audio_lengths` /
`vision_lengths` [N], `regression_labels` [N] or [N, 1],
`classification_labels`, `id` and `raw_text`.

`load_mmsa` checks the whole file's structure (`mmsa_checks.py`) before it
converts anything, then cleans audio/vision the way the reference loader does
and optionally standardizes features with statistics taken from the train
split only.
"""

import dataclasses
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from decalign_jax.data import mmsa_checks as checks

TrainMode = checks.TrainMode
Modality = Literal["text", "audio", "vision"]

MODALITIES = ("text", "audio", "vision")
# Re-exported: callers catch `mmsa.DataError`.
DataError = checks.DataError
canonical_bert_rows = checks.canonical_bert_rows
_TRAIN_MODES = ("regression", "classification")
_GET_FEATURES = (
    "MMSA feature pickles (e.g. MOSI 'unaligned_50.pkl', MOSEI "
    "'unaligned_50.pkl', SIMS 'unaligned_39.pkl') come from the MMSA project "
    "(github.com/thuiar/MMSA, 'Datasets' section); pass the file with "
    "--config.data.path=/path/to/file.pkl, or write a synthetic one with "
    "decalign_jax.data.synthetic.write_synthetic_mmsa"
)


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Train-split statistics of one modality, each [1, 1, D] float32."""

  low: np.ndarray
  high: np.ndarray
  mean: np.ndarray
  std: np.ndarray

  def apply(self, features: np.ndarray) -> np.ndarray:
    """Clips to [low, high], standardizes, and zeroes non-finite values."""
    out = (np.clip(features, self.low, self.high) - self.mean) / self.std
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(
        np.float32)


# eq=False: the fields are arrays, whose `==` is elementwise.
@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split of an MMSA file, cleaned and ready for batching.

  Attributes:
    text: [N, T, D_l] float32 features, or [N, 3, T] int64 BERT inputs (rows
      as stored in the pickle) when loaded with `use_bert=True`.
    audio: [N, T_a, D_a] float32.
    vision: [N, T_v, D_v] float32.
    label: [N] float32 (regression) or [N] int32 class ids (classification).
    audio_lengths: [N] int32 valid audio frames (T_a when the file has none).
    vision_lengths: [N] int32 valid vision frames (T_v when the file has none).
    ids: [N] sample ids as stored in the file (str or object array).
    standardization: per-modality train statistics already applied to this
      split's features; empty when nothing was standardized.
  """

  text: np.ndarray
  audio: np.ndarray
  vision: np.ndarray
  label: np.ndarray
  audio_lengths: np.ndarray
  vision_lengths: np.ndarray
  ids: np.ndarray
  standardization: Mapping[str, FeatureStats] = dataclasses.field(
      default_factory=dict)

  @property
  def num_examples(self) -> int:
    return int(self.label.shape[0])


def _read_pickle(path: str) -> Mapping[str, Any]:
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file. {_GET_FEATURES}.")
  try:
    with open(path, "rb") as f:
      raw = pickle.load(f)
  except Exception as e:  # pickle raises many unrelated types.
    raise DataError(
        f"{path}: could not unpickle ({type(e).__name__}: {e}); expected an "
        f"MMSA feature pickle. {_GET_FEATURES}.") from e
  if not isinstance(raw, Mapping):
    raise DataError(
        f"{path}: top level is a {type(raw).__name__}, expected a dict with "
        "splits 'train', 'valid', 'test'.")
  return raw


def _read_split(
    arrays: Mapping[str, np.ndarray], path: str, split: str, *,
    train_mode: TrainMode, use_bert: bool) -> Split:
  """Converts checked arrays into a cleaned `Split`."""
  where = checks.location(path, split)
  n = arrays[checks.LABEL_KEYS[train_mode]].shape[0]
  if use_bert:
    text = checks.canonical_bert_rows(
        arrays["text_bert"].astype(np.int64), where)
  else:
    with np.errstate(over="ignore"):  # Overflow is reported just below.
      text = arrays["text"].astype(np.float32, copy=False)
    # The reference feeds text as-is, so a NaN here would silently turn the
    # whole run's loss into NaN; refuse it instead (after the float32 cast,
    # which is what would be trained on and can overflow to inf).
    bad = ~np.isfinite(text)
    if np.any(bad):
      i = checks.first_bad(bad)
      raise DataError(
          f"{where}: 'text' has NaN/inf values (first at sample index {i}); "
          "the reference would train on them silently.")

  # Same cleaning as the reference: it first sets audio -inf to 0, which the
  # nan_to_num(neginf=0) below already covers. Cast first, as it does, so
  # float64 values beyond float32 range become inf and then 0.
  with np.errstate(over="ignore"):
    audio = arrays["audio"].astype(np.float32)
    vision = arrays["vision"].astype(np.float32)
  # astype copied, so cleaning in place leaves the caller's arrays alone.
  np.nan_to_num(audio, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
  np.nan_to_num(vision, copy=False, nan=0.0, posinf=0.0, neginf=0.0)

  def lengths(key: str, num_frames: int) -> np.ndarray:
    if key not in arrays:
      # Aligned files carry no lengths: every frame is real.
      return np.full((n,), num_frames, np.int32)
    # A count above T (frames before truncation) means every frame is real;
    # clipping keeps downstream gathers at `length - 1` in bounds.
    return np.minimum(arrays[key].reshape(n), num_frames).astype(np.int32)

  if train_mode == "regression":
    label = arrays["regression_labels"].reshape(n).astype(np.float32)
  else:
    label = arrays["classification_labels"].reshape(n).astype(np.int32)
  if "id" in arrays:
    ids = arrays["id"].reshape(n)
  else:
    ids = np.array([f"{split}_{i}" for i in range(n)], dtype=object)
  return Split(
      text=text, audio=audio, vision=vision, label=label,
      audio_lengths=lengths("audio_lengths", audio.shape[1]),
      vision_lengths=lengths("vision_lengths", vision.shape[1]),
      ids=ids)


def compute_feature_stats(
    features: np.ndarray, clip_percentiles: Sequence[float]) -> FeatureStats:
  """Per-feature clip bounds, mean and std over samples and frames.

  Matches the reference: percentiles and moments over axes (0, 1) of
  [N, T, D] (padding frames included), std floored at 1e-6.

  Args:
    features: [N, T, D] float32 train features.
    clip_percentiles: (low, high) percentiles in [0, 100].

  Returns:
    The statistics, each [1, 1, D] float32.
  """
  low, high = np.percentile(features, list(clip_percentiles), axis=(0, 1),
                            keepdims=True)
  clipped = np.clip(features, low, high)
  mean = clipped.mean(axis=(0, 1), keepdims=True)
  std = clipped.std(axis=(0, 1), keepdims=True)
  return FeatureStats(
      low=low.astype(np.float32), high=high.astype(np.float32),
      mean=mean.astype(np.float32),
      std=np.maximum(std, 1e-6).astype(np.float32))


def standardize_splits(
    splits: Mapping[str, Split], modalities: Sequence[Modality],
    clip_percentiles: Sequence[float] = (0.5, 99.5),
) -> tuple[dict[str, Split], dict[str, FeatureStats]]:
  """Standardizes features of every split with train-split statistics.

  Args:
    splits: must contain 'train'; its statistics are applied to all splits.
    modalities: names among 'text', 'audio', 'vision'.
    clip_percentiles: (low, high) percentiles used to clip before the moments.

  Returns:
    (new splits with `standardization` set, {modality: FeatureStats}).
  """
  if "train" not in splits:
    raise DataError(
        "standardize_splits needs the 'train' split for statistics; got "
        f"splits {sorted(splits)}.")
  _check_standardize_args(modalities, clip_percentiles)
  train = splits["train"]
  stats = {}
  for name in modalities:
    features = getattr(train, name)
    if not np.issubdtype(features.dtype, np.floating):
      raise DataError(
          f"cannot standardize '{name}' of dtype {features.dtype} (BERT "
          "token ids when use_bert=True); drop it from standardize.")
    stats[name] = compute_feature_stats(features, clip_percentiles)
  out = {}
  for split_name, split in splits.items():
    updates = {name: s.apply(getattr(split, name)) for name, s in stats.items()}
    out[split_name] = dataclasses.replace(
        split, standardization=dict(stats), **updates)
  return out, stats


def _check_standardize_args(
    modalities: Sequence[str], clip_percentiles: Sequence[float]) -> None:
  unknown = [m for m in modalities if m not in MODALITIES]
  if unknown or isinstance(modalities, str):
    raise DataError(
        f"standardize={modalities!r}: expected a tuple of names among "
        f"{MODALITIES}.")
  if (len(clip_percentiles) != 2
      or not 0 <= clip_percentiles[0] <= clip_percentiles[1] <= 100):
    raise DataError(
        f"clip_percentiles={tuple(clip_percentiles)!r}: expected (low, high) "
        "with 0 <= low <= high <= 100.")


def load_mmsa(
    path: str | os.PathLike[str], *,
    train_mode: TrainMode = "regression",
    use_bert: bool = False,
    feature_dims: Sequence[int] | None = None,
    num_classes: int | None = None,
    standardize: Sequence[Modality] = (),
    clip_percentiles: Sequence[float] = (0.5, 99.5),
    splits: Sequence[str] = ("train", "valid", "test"),
) -> dict[str, Split]:
  """Loads, checks and cleans an MMSA feature pickle.

  Every structural check (file, splits, keys, sample counts, ranks, feature
  dims, lengths, labels) runs on all splits before any array is converted;
  only the scan of float text for NaN/inf runs during conversion.

  Args:
    path: the MMSA pickle.
    train_mode: 'regression' reads `regression_labels` as [N] float32;
      'classification' reads `classification_labels` as [N] int32.
    use_bert: read `text_bert` [N, 3, T] token ids instead of `text`.
    feature_dims: expected (d_l, d_a, d_v), or None to accept any; d_l is not
      checked when `use_bert`.
    num_classes: when given, classification labels must lie in
      [0, num_classes).
    standardize: modalities to clip and standardize with train statistics
      (the 'train' split is read for them even if not in `splits`).
    clip_percentiles: (low, high) percentiles for that clipping.
    splits: which splits to return.

  Returns:
    {split name: Split} for the requested splits.

  Raises:
    DataError: on any problem with the file, its contents or these settings.
  """
  path = os.fspath(path)
  if train_mode not in _TRAIN_MODES:
    raise DataError(f"train_mode={train_mode!r}: expected one of "
                    f"{_TRAIN_MODES}.")
  if feature_dims is not None and len(feature_dims) != 3:
    raise DataError(
        f"model.feature_dims={tuple(feature_dims)!r}: expected (d_l, d_a, "
        "d_v).")
  if isinstance(splits, str) or not splits:
    raise DataError(f"splits={splits!r}: expected a non-empty tuple of "
                    "split names.")
  standardize = tuple(standardize)
  _check_standardize_args(standardize, clip_percentiles)
  if use_bert and "text" in standardize:
    raise DataError(
        "standardize includes 'text' but use_bert=True makes text token ids; "
        "drop 'text' from standardize.")

  raw = _read_pickle(path)
  to_read = tuple(splits)
  if standardize and "train" not in to_read:
    to_read += ("train",)
  checked = {
      name: checks.check_split(raw, path, name, train_mode=train_mode,
                               use_bert=use_bert, feature_dims=feature_dims,
                               num_classes=num_classes)
      for name in to_read}
  result = {
      name: _read_split(arrays, path, name, train_mode=train_mode,
                        use_bert=use_bert)
      for name, arrays in checked.items()}
  if standardize:
    result, _ = standardize_splits(result, standardize, clip_percentiles)
  return {name: result[name] for name in splits}
