"""Synthetic MMSA-format data with planted multimodal structure.

This is SYNTHETIC data for smoke tests and quick CPU runs; it carries no
sentiment and its numbers say nothing about CMU-MOSI or any real dataset. It
only has the MMSA file layout (`load_mmsa` reads it like a real pickle) and a
known generative structure a model can learn:

* Per sample, `num_shared` latent factors z ~ N(0, 1) seen by all three
  modalities, and `num_unique` factors u_m ~ N(0, 1) seen only by modality m.
* A latent score s = a . z + sum_m b_m . u_m with |a|^2 = 0.4 and
  |b_m|^2 = 0.2, so s ~ N(0, 1): 40% of its variance is shared and each
  modality holds another 20% no other modality has. One modality alone can
  explain at most ~60% of the label variance; all three together nearly all.
* `regression_labels` = clip(3 tanh(0.8 s) + N(0, 0.15^2), -3, 3), [N, 1].
  `classification_labels` [N, 1] = that label cut at the equal-mass
  quantiles of the noiseless 3 tanh(0.8 s), so classes are near-balanced.
* Frames of modality m: x_t = env_t * ([z, u_m] W_m) + r_t V_m + noise, with
  fixed random linear maps W_m, V_m, a slow per-sample envelope env_t, slow
  per-sample sinusoidal nuisance r_t (temporal variation that carries no
  label), and i.i.d. Gaussian noise.
* About `pad_fraction` of samples have zero tail frames in audio and vision
  (independently per modality), with `audio_lengths` / `vision_lengths`
  recording the real frame counts. Text is never padded.

The maps W_m, V_m and the label weights depend only on `seed`; each split
draws its samples from its own stream, so resizing one split leaves the
others unchanged.
"""

import os
import pickle
import statistics
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

_SPLITS = ("train", "valid", "test")
_SHARED_VAR = 0.4
_UNIQUE_VAR = 0.2
_LABEL_GAIN = 0.8
_LABEL_NOISE = 0.15
_NUM_NUISANCE = 2


def _unit(rng: np.random.Generator, k: int) -> np.ndarray:
  v = rng.standard_normal(k)
  return v / np.linalg.norm(v)


def _model(seed: int, feature_dims: Sequence[int], num_shared: int,
           num_unique: int) -> dict[str, Any]:
  """Draws the fixed linear maps and label weights shared by all splits."""
  rng = np.random.default_rng([seed, 0])
  k = num_shared + num_unique
  model = {"a": _unit(rng, num_shared) * np.sqrt(_SHARED_VAR)}
  for m, d in enumerate(feature_dims):
    model[f"b{m}"] = _unit(rng, num_unique) * np.sqrt(_UNIQUE_VAR)
    # Scaled so each feature's signal part has unit variance.
    model[f"W{m}"] = (rng.standard_normal((k, d)) / np.sqrt(k)).astype(
        np.float32)
    model[f"V{m}"] = (rng.standard_normal((_NUM_NUISANCE, d))
                      / np.sqrt(_NUM_NUISANCE)).astype(np.float32)
  return model


def _sinusoids(rng: np.random.Generator, n: int, t: int, k: int,
               max_cycles: float) -> np.ndarray:
  """[n, t, k] slow sinusoids with random per-sample frequency and phase."""
  freq = rng.uniform(0.25, max_cycles, (n, 1, k))
  phase = rng.uniform(0, 2 * np.pi, (n, 1, k))
  steps = np.arange(t, dtype=np.float64)[None, :, None] / t
  return np.sin(2 * np.pi * freq * steps + phase).astype(np.float32)


def _make_split(
    split: str, rng: np.random.Generator, model: dict[str, Any], *, n: int,
    seq_len: int, feature_dims: Sequence[int], num_shared: int,
    num_unique: int, noise: float, pad_fraction: float,
    thresholds: np.ndarray) -> dict[str, Any]:
  shared = rng.standard_normal((n, num_shared))
  unique = [rng.standard_normal((n, num_unique)) for _ in feature_dims]
  score = shared @ model["a"] + sum(
      u @ model[f"b{m}"] for m, u in enumerate(unique))
  label = 3 * np.tanh(_LABEL_GAIN * score)
  label = np.clip(label + _LABEL_NOISE * rng.standard_normal(n), -3, 3)

  out = {}
  for m, (name, d) in enumerate(zip(("text", "audio", "vision"),
                                    feature_dims)):
    factors = np.concatenate([shared, unique[m]], 1).astype(np.float32)
    signal = factors @ model[f"W{m}"]  # [n, d]
    envelope = 1 + 0.3 * _sinusoids(rng, n, seq_len, 1, 2.0)
    nuisance = _sinusoids(rng, n, seq_len, _NUM_NUISANCE, 4.0)
    x = rng.standard_normal((n, seq_len, d), dtype=np.float32)
    x *= noise
    x += envelope * signal[:, None, :]
    x += nuisance @ model[f"V{m}"]
    if name != "text":
      padded = rng.random(n) < pad_fraction
      lengths = np.where(
          padded, rng.integers(seq_len // 2, seq_len, n), seq_len)
      x[np.arange(seq_len)[None, :] >= lengths[:, None]] = 0.0
      out[f"{name}_lengths"] = lengths.astype(np.int64)
    out[name] = x

  out["regression_labels"] = label.astype(np.float32)[:, None]
  # MMSA stores class ids as floats; the loader casts them.
  out["classification_labels"] = np.digitize(label, thresholds).astype(
      np.float32)[:, None]
  out["id"] = np.array([f"synthetic_{split}_{i:05d}" for i in range(n)])
  out["raw_text"] = np.array([f"synthetic sample {i}" for i in range(n)])
  # Drawn last so the other arrays do not depend on it.
  out["text_bert"] = _text_bert(
      rng, np.concatenate([shared, unique[0]], 1), seq_len)
  return out


def _text_bert(rng: np.random.Generator, factors: np.ndarray,
               seq_len: int) -> np.ndarray:
  """MMSA-style `[N, 3, T]` (ids, mask, segments) spelling the text factors.

  Token t (after [CLS]) names factor t mod F and a noisy 8-level bucket of
  its value, as word id 2000 + 8 * factor + bucket (ids valid in any
  BERT-base-sized vocabulary); then [SEP] and [PAD] = 0 to a random length.
  """
  n, f = factors.shape
  body = seq_len - 2
  which = np.arange(body) % f
  noisy = factors[:, which] + 0.3 * rng.standard_normal((n, body))
  bucket = np.clip(np.floor((noisy + 2.0) * 2.0), 0, 7).astype(np.int64)
  words = 2000 + 8 * which[None, :] + bucket
  lengths = rng.integers(max(1, body // 2), body + 1, n)
  keep = np.arange(body)[None, :] < lengths[:, None]
  ids = np.zeros((n, seq_len), np.int64)
  ids[:, 0] = 101  # [CLS]
  ids[:, 1:-1] = np.where(keep, words, 0)
  ids[np.arange(n), lengths + 1] = 102  # [SEP]
  mask = (ids != 0).astype(np.int64)
  return np.stack([ids, mask, np.zeros_like(ids)], axis=1)


def make_synthetic_mmsa(
    *,
    seed: int = 0,
    num_train: int = 1024,
    num_valid: int = 256,
    num_test: int = 256,
    seq_len: int = 50,
    feature_dims: Sequence[int] = (768, 5, 20),
    train_mode: Literal["regression", "classification"] = "regression",
    num_classes: int | None = None,
    num_shared: int = 2,
    num_unique: int = 2,
    noise: float = 0.5,
    pad_fraction: float = 0.25,
) -> dict[str, dict[str, Any]]:
  """Generates an MMSA-format dict with planted structure (see module doc).

  Defaults mimic aligned MOSI's shapes (T=50, dims 768/5/20) at a size that
  trains quickly on CPU. Both label keys are always written so either loader
  mode can read the result.

  Args:
    seed: determines every array.
    num_train: train samples.
    num_valid: valid samples.
    num_test: test samples.
    seq_len: frames per modality.
    feature_dims: (d_l, d_a, d_v). Keep num_shared + num_unique <= each dim so
      each modality's factors are linearly recoverable.
    train_mode: 'classification' requires `num_classes` >= 2; 'regression'
      bins the auxiliary classification labels into `num_classes`, or 3 when
      it is None or below 2.
    num_classes: number of classification label bins.
    num_shared: latent factors shared by all modalities.
    num_unique: latent factors private to each modality.
    noise: std of the i.i.d. per-frame feature noise.
    pad_fraction: chance that a sample's audio (and, independently, vision)
      ends in zero padding frames.

  Returns:
    {'train'|'valid'|'test': {key: array}} with keys 'text', 'audio',
    'vision' ([N, T, D] float32), 'audio_lengths', 'vision_lengths' ([N]
    int64), 'regression_labels' ([N, 1] float32 in [-3, 3]),
    'classification_labels' ([N, 1] float32 class ids), 'id', 'raw_text'.
  """
  if train_mode not in ("regression", "classification"):
    raise ValueError(f"train_mode={train_mode!r}: expected 'regression' or "
                     "'classification'.")
  if train_mode == "classification":
    if num_classes is None or num_classes < 2:
      raise ValueError(f"train_mode='classification' needs num_classes >= 2, "
                       f"got {num_classes}.")
  elif num_classes is None or num_classes < 2:
    # Regression configs often carry num_classes=1 (the output width); the
    # auxiliary class labels then use MOSI's neg/neu/pos-like 3 bins.
    num_classes = 3
  if len(feature_dims) != 3 or min(feature_dims) < 1:
    raise ValueError(f"feature_dims={tuple(feature_dims)}: expected three "
                     "positive (d_l, d_a, d_v).")
  sizes = {"train": num_train, "valid": num_valid, "test": num_test}
  if min(sizes.values()) < 1 or seq_len < 2:
    raise ValueError(f"split sizes {sizes} and seq_len={seq_len} must be "
                     "positive (seq_len >= 2).")
  model = _model(seed, feature_dims, num_shared, num_unique)
  # s ~ N(0, 1), so these cut the noiseless label into equal-mass bins.
  normal = statistics.NormalDist()
  thresholds = np.array([
      3 * np.tanh(_LABEL_GAIN * normal.inv_cdf(c / num_classes))
      for c in range(1, num_classes)])
  return {
      split: _make_split(
          split, np.random.default_rng([seed, 1 + i]), model,
          n=sizes[split], seq_len=seq_len, feature_dims=feature_dims,
          num_shared=num_shared, num_unique=num_unique, noise=noise,
          pad_fraction=pad_fraction, thresholds=thresholds)
      for i, split in enumerate(_SPLITS)}


def write_synthetic_mmsa(path: str | os.PathLike[str], **kwargs: Any) -> str:
  """Writes `make_synthetic_mmsa(**kwargs)` as an MMSA pickle at `path`.

  Args:
    path: destination file; parent directories are created.
    **kwargs: forwarded to `make_synthetic_mmsa`.

  Returns:
    `path` as a string.
  """
  path = os.fspath(path)
  data = make_synthetic_mmsa(**kwargs)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Write then rename so a concurrent reader never sees a partial pickle.
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
  os.replace(tmp, path)
  return path
