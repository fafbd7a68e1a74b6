"""Structural checks of an MMSA feature pickle's splits, before conversion.

`mmsa.load_mmsa` runs `check_split` on every requested split before it
converts any array, so a bad file fails fast with a message naming the file,
split, key and shape. `canonical_bert_rows` settles the row order of
`text_bert`.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

TrainMode = Literal["regression", "classification"]

LABEL_KEYS = {
    "regression": "regression_labels",
    "classification": "classification_labels",
}


class DataError(ValueError):
  """A data file or its contents do not match what the loader expects."""


def location(path: str, split: str) -> str:
  """`'<path>: split <name>'`, how error messages name a split."""
  return f"{path}: split '{split}'"


def first_bad(mask: np.ndarray) -> int:
  """Index of the first sample whose entries contain a True."""
  return int(np.argmax(mask.reshape(mask.shape[0], -1).any(axis=1)))


def is_integral(x: np.ndarray) -> bool:
  if np.issubdtype(x.dtype, np.integer):
    return True
  return bool(np.issubdtype(x.dtype, np.floating)
              and np.all(np.isfinite(x)) and np.all(x == np.round(x)))


def check_split(
    raw: Mapping[str, Any], path: str, split: str, *, train_mode: TrainMode,
    use_bert: bool, feature_dims: Sequence[int] | None,
    num_classes: int | None) -> dict[str, np.ndarray]:
  """Validates one split's keys, shapes and labels; returns its arrays.

  Only cheap checks live here so that every split is checked before any
  split is converted; the (large) text finiteness check runs when
  `mmsa.load_mmsa` converts the split.
  """
  where = location(path, split)
  if split not in raw:
    raise DataError(
        f"{path}: missing split '{split}'; splits present: "
        f"{sorted(map(str, raw))}.")
  data = raw[split]
  if not isinstance(data, Mapping):
    raise DataError(
        f"{where} is a {type(data).__name__}, expected a dict of arrays.")
  text_key = "text_bert" if use_bert else "text"
  label_key = LABEL_KEYS[train_mode]
  for key in (text_key, "audio", "vision", label_key):
    if key not in data:
      hint = " (use_bert=True reads 'text_bert')" if key == "text_bert" else ""
      raise DataError(
          f"{where}: missing key '{key}'{hint}; keys present: "
          f"{sorted(map(str, data))}.")
  arrays = {key: np.asarray(data[key])
            for key in (text_key, "audio", "vision", label_key,
                        "audio_lengths", "vision_lengths", "id")
            if key in data}

  label = arrays[label_key]
  if not (label.ndim == 1 or (label.ndim == 2 and label.shape[1] == 1)):
    raise DataError(
        f"{where}: '{label_key}' has shape {label.shape}, expected [N] or "
        "[N, 1].")
  n = label.shape[0]
  if n == 0:
    raise DataError(f"{where} is empty ('{label_key}' has shape "
                    f"{label.shape}).")
  sizes = {key: (a.shape[0] if a.ndim else None) for key, a in arrays.items()}
  if any(size != n for size in sizes.values()):
    raise DataError(
        f"{where}: keys disagree on the number of samples N: {sizes}.")

  for key in (text_key, "audio", "vision"):
    a = arrays[key]
    if a.ndim != 3:
      expected = "[N, 3, T]" if key == "text_bert" else "[N, T, D]"
      raise DataError(
          f"{where}: '{key}' has shape {a.shape} (ndim {a.ndim}), expected "
          f"{expected}.")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
      raise DataError(f"{where}: '{key}' has non-numeric dtype {a.dtype}.")
  if use_bert:
    ids = arrays[text_key]
    if ids.shape[1] != 3:
      raise DataError(
          f"{where}: 'text_bert' has shape {ids.shape}, expected [N, 3, T] "
          "(ids, mask, segment rows).")
    if not is_integral(ids):
      raise DataError(
          f"{where}: 'text_bert' (dtype {ids.dtype}) holds non-integer "
          "values; expected token ids.")

  if feature_dims is not None:
    for key, expected in zip(("text", "audio", "vision"), feature_dims):
      if key == "text" and use_bert:
        continue  # BERT inputs are ids; the encoder fixes the text width.
      actual = arrays[key].shape
      if actual[2] != expected:
        raise DataError(
            f"{where}: '{key}' has shape {actual}, so feature dim "
            f"{actual[2]}, but model.feature_dims expects {expected} "
            f"(model.feature_dims={tuple(feature_dims)}).")

  for key in ("audio_lengths", "vision_lengths"):
    if key not in arrays:
      continue
    lengths = arrays[key].reshape(n, -1)
    if lengths.shape[1] != 1 or not is_integral(lengths):
      raise DataError(
          f"{where}: '{key}' has shape {arrays[key].shape} and dtype "
          f"{arrays[key].dtype}, expected [N] integer frame counts.")
    if np.any(lengths < 0):
      i = first_bad(lengths < 0)
      raise DataError(
          f"{where}: '{key}' is negative at index {i} ({lengths[i, 0]}).")

  if not (np.issubdtype(label.dtype, np.number)
          or label.dtype == np.bool_):
    raise DataError(f"{where}: '{label_key}' has non-numeric dtype "
                    f"{label.dtype}.")
  bad = ~np.isfinite(label.astype(np.float64))
  if np.any(bad):
    i = first_bad(bad)
    raise DataError(
        f"{where}: '{label_key}' is not finite at index {i} "
        f"({label.reshape(n)[i]}).")
  if train_mode == "classification":
    flat = label.reshape(n)
    if not is_integral(flat):
      i = first_bad(flat != np.round(flat))
      raise DataError(
          f"{where}: '{label_key}' must hold integer class ids; index {i} "
          f"is {flat[i]}.")
    high = num_classes if num_classes is not None else np.inf
    out_of_range = (flat < 0) | (flat >= high)
    if np.any(out_of_range):
      i = first_bad(out_of_range)
      raise DataError(
          f"{where}: '{label_key}' at index {i} is {flat[i]}, outside "
          f"[0, num_classes={num_classes}).")
  return arrays


def canonical_bert_rows(text_bert: np.ndarray, where: str) -> np.ndarray:
  """Reorders MMSA `text_bert` rows to (input_ids, attention_mask, segments).

  MMSA files store ids in row 0 but disagree on the order of the other two
  rows (mask/segments vs segments/mask), and the reference guesses from row
  sums. A mask row is 0/1, non-increasing along time (1s then 0s), and equals
  `input_ids != 0` (0 is BERT's [PAD]); exactly one of rows 1 and 2 must be
  such a row.

  Args:
    text_bert: `[N, 3, T]` integer array.
    where: file/split, for error messages.

  Returns:
    `[N, 3, T]` int32 with rows (ids, mask, segments).

  Raises:
    DataError: if neither or both rows look like the attention mask.
  """
  ids = text_bert[:, 0]

  def is_mask(row):
    binary = np.isin(row, (0, 1)).all()
    monotone = (np.diff(row, axis=1) <= 0).all()
    return bool(binary and monotone and (row == (ids != 0)).all())

  candidates = [r for r in (1, 2) if is_mask(text_bert[:, r])]
  if len(candidates) != 1:
    raise DataError(
        f"{where}: cannot tell which row of 'text_bert' [N, 3, T] is the "
        f"attention mask (rows matching 0/1, 1s-then-0s and ids != 0: "
        f"{candidates or 'none'}); expected exactly one of rows 1 and 2")
  mask_row = candidates[0]
  seg_row = 3 - mask_row
  return np.stack([ids, text_bert[:, mask_row], text_bert[:, seg_row]],
                  axis=1).astype(np.int32)
