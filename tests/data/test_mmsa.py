"""Tests for the MMSA pickle reader."""

import copy
import pickle
import re

import numpy as np
import pytest

from decalign_jax.data import mmsa
from decalign_jax.data import synthetic

_DIMS = (8, 3, 4)
_T = 6
_SIZES = {"train": 11, "valid": 7, "test": 5}


@pytest.fixture(scope="module")
def base_raw():
  return synthetic.make_synthetic_mmsa(
      seed=3, num_train=_SIZES["train"], num_valid=_SIZES["valid"],
      num_test=_SIZES["test"], seq_len=_T, feature_dims=_DIMS)


@pytest.fixture
def raw(base_raw):
  return copy.deepcopy(base_raw)


def _write(tmp_path, obj, name="data.pkl"):
  path = str(tmp_path / name)
  with open(path, "wb") as f:
    pickle.dump(obj, f)
  return path


def _reference_clean(audio, vision):
  """The reference loader's cleaning, written out independently."""
  with np.errstate(over="ignore"):
    audio = audio.astype(np.float32)
  vision = vision.astype(np.float32)
  audio[audio == -np.inf] = 0
  audio = np.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0)
  vision = np.nan_to_num(vision, nan=0.0, posinf=0.0, neginf=0.0)
  return audio, vision


def test_happy_path_shapes_and_dtypes(tmp_path, raw):
  path = _write(tmp_path, raw)
  splits = mmsa.load_mmsa(path, feature_dims=_DIMS)
  assert set(splits) == {"train", "valid", "test"}
  for name, n in _SIZES.items():
    s = splits[name]
    assert s.num_examples == n
    assert s.text.shape == (n, _T, _DIMS[0]) and s.text.dtype == np.float32
    assert s.audio.shape == (n, _T, _DIMS[1]) and s.audio.dtype == np.float32
    assert s.vision.shape == (n, _T, _DIMS[2])
    assert s.vision.dtype == np.float32
    assert s.label.shape == (n,) and s.label.dtype == np.float32
    np.testing.assert_array_equal(
        s.label, raw[name]["regression_labels"][:, 0])
    for key in ("audio_lengths", "vision_lengths"):
      assert getattr(s, key).dtype == np.int32
      np.testing.assert_array_equal(getattr(s, key), raw[name][key])
    assert list(s.ids) == list(raw[name]["id"])
    assert not s.standardization


def test_classification_labels_are_int32(tmp_path, raw):
  path = _write(tmp_path, raw)
  s = mmsa.load_mmsa(path, train_mode="classification", num_classes=3)
  assert s["train"].label.dtype == np.int32
  np.testing.assert_array_equal(
      s["train"].label, raw["train"]["classification_labels"][:, 0])


def test_inf_nan_cleaning_matches_reference(tmp_path, raw):
  audio = raw["train"]["audio"].astype(np.float64)
  audio[0, 0, 0] = -np.inf
  audio[1, 2, 1] = np.inf
  audio[2, 3, 2] = np.nan
  audio[3, 1, 0] = 1e300  # overflows float32 to inf, as in the reference.
  vision = raw["train"]["vision"].copy()
  vision[4, 0, 3] = np.nan
  vision[5, 5, 0] = -np.inf
  raw["train"]["audio"], raw["train"]["vision"] = audio, vision
  text = raw["train"]["text"].copy()
  s = mmsa.load_mmsa(_write(tmp_path, raw))["train"]
  want_audio, want_vision = _reference_clean(audio, vision)
  np.testing.assert_array_equal(s.audio, want_audio)
  np.testing.assert_array_equal(s.vision, want_vision)
  np.testing.assert_array_equal(s.text, text)
  assert np.isfinite(s.audio).all() and np.isfinite(s.vision).all()


def test_lengths_default_to_full_and_clip(tmp_path, raw):
  del raw["train"]["audio_lengths"], raw["train"]["vision_lengths"]
  raw["valid"]["audio_lengths"] = raw["valid"]["audio_lengths"] + 100
  del raw["test"]["id"]
  s = mmsa.load_mmsa(_write(tmp_path, raw))
  np.testing.assert_array_equal(s["train"].audio_lengths, _T)
  np.testing.assert_array_equal(s["train"].vision_lengths, _T)
  np.testing.assert_array_equal(s["valid"].audio_lengths, _T)
  assert s["test"].ids[0] == "test_0"


def _bert_rows(n, order, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, _T + 1, size=n)
  mask = (np.arange(_T)[None] < lengths[:, None]).astype(np.int64)
  ids = rng.integers(100, 1000, size=(n, _T)) * mask
  segments = np.zeros((n, _T), np.int64)
  rows = {"ids": ids, "mask": mask, "segments": segments}
  return np.stack([rows[k] for k in order], axis=1), rows


def test_use_bert_canonicalizes_row_order(tmp_path, raw):
  expected = {}
  for name, n in _SIZES.items():
    # MMSA files disagree on the order of the mask and segment rows.
    order = (("ids", "segments", "mask") if name == "train"
             else ("ids", "mask", "segments"))
    text_bert, rows = _bert_rows(n, order)
    # MMSA stores ids as floats; integral floats are accepted.
    raw[name]["text_bert"] = text_bert.astype(
        np.float64 if name == "train" else np.int64)
    expected[name] = np.stack([rows["ids"], rows["mask"], rows["segments"]],
                              axis=1)
  s = mmsa.load_mmsa(_write(tmp_path, raw), use_bert=True,
                     feature_dims=(768,) + _DIMS[1:])
  for name in _SIZES:
    assert s[name].text.dtype == np.int32
    np.testing.assert_array_equal(s[name].text, expected[name])


def test_use_bert_ambiguous_mask_row_is_an_error(tmp_path, raw):
  for name, n in _SIZES.items():
    text_bert, rows = _bert_rows(n, ("ids", "mask", "mask"))
    raw[name]["text_bert"] = text_bert
  with pytest.raises(mmsa.DataError, match="attention mask.*\\[1, 2\\]"):
    mmsa.load_mmsa(_write(tmp_path, raw), use_bert=True,
                   feature_dims=(768,) + _DIMS[1:])
  for name, n in _SIZES.items():
    raw[name]["text_bert"] = np.ones((n, 3, _T), np.int64) * 5
  with pytest.raises(mmsa.DataError, match="attention mask.*none"):
    mmsa.load_mmsa(_write(tmp_path, raw), use_bert=True,
                   feature_dims=(768,) + _DIMS[1:])


def _brute_force_standardize(train, other, lo_pct, hi_pct):
  out = np.empty_like(other)
  for j in range(train.shape[-1]):
    values = train[..., j].ravel()
    lo, hi = np.percentile(values, [lo_pct, hi_pct])
    clipped = np.clip(values, lo, hi)
    mean, std = clipped.mean(), max(clipped.std(), 1e-6)
    out[..., j] = (np.clip(other[..., j], lo, hi) - mean) / std
  return out


def test_standardization_uses_train_stats_only(tmp_path, raw):
  # Shift valid/test so their own statistics differ visibly from train's.
  for name in ("valid", "test"):
    raw[name]["audio"] = raw[name]["audio"] * 3 + 5
  raw["train"]["vision"][:, :, 1] = 0.0  # constant feature: std floor.
  path = _write(tmp_path, raw)
  plain = mmsa.load_mmsa(path)
  s = mmsa.load_mmsa(path, standardize=("audio", "vision", "text"),
                     clip_percentiles=(5.0, 95.0))
  for modality in ("audio", "vision", "text"):
    train = getattr(plain["train"], modality)
    for name in _SIZES:
      want = _brute_force_standardize(
          train, getattr(plain[name], modality), 5.0, 95.0)
      np.testing.assert_allclose(getattr(s[name], modality), want,
                                 rtol=1e-4, atol=1e-4)
      assert s[name].standardization[modality].std.shape == (
          1, 1, train.shape[-1])
  assert s["valid"].audio.mean() > 1.0  # transformed by train stats.
  np.testing.assert_array_equal(s["train"].vision[:, :, 1], 0.0)
  only_test = mmsa.load_mmsa(path, standardize=("audio",),
                             clip_percentiles=(5.0, 95.0), splits=("test",))
  assert set(only_test) == {"test"}
  np.testing.assert_array_equal(only_test["test"].audio, s["test"].audio)


def test_standardize_splits_returns_stats(tmp_path, raw):
  splits = mmsa.load_mmsa(_write(tmp_path, raw))
  out, stats = mmsa.standardize_splits(splits, ("audio",))
  assert set(stats) == {"audio"}
  np.testing.assert_allclose(
      out["valid"].audio, stats["audio"].apply(splits["valid"].audio))
  with pytest.raises(mmsa.DataError, match="needs the 'train' split"):
    mmsa.standardize_splits({"test": splits["test"]}, ("audio",))


def _set(split, key, fn):
  def mutate(raw):
    raw[split][key] = fn(raw[split][key])
  return mutate


def _delete(split, key):
  def mutate(raw):
    del raw[split][key]
  return mutate


def _nan_at(i, value=np.nan):
  def fn(a):
    a = a.copy()
    a.reshape(a.shape[0], -1)[i, 0] = value
    return a
  return fn


def _empty_test(raw):
  for key, value in raw["test"].items():
    raw["test"][key] = value[:0]


_BAD_CONTENT = {
    "missing_split": (lambda raw: raw.pop("valid"), {},
                      r"missing split 'valid'; splits present"),
    "split_not_dict": (lambda raw: raw.update(test=[1, 2]), {},
                       r"split 'test' is a list"),
    "missing_key": (_delete("train", "audio"), {},
                    r"split 'train': missing key 'audio'; keys present: "
                    r"\[.*'vision'"),
    "missing_bert_key": (_delete("train", "text_bert"), {"use_bert": True},
                         r"split 'train': missing key 'text_bert'"),
    "missing_label_key": (_delete("valid", "classification_labels"),
                          {"train_mode": "classification"},
                          r"split 'valid': missing key "
                          r"'classification_labels'"),
    "n_mismatch": (_set("valid", "vision", lambda a: a[:-1]), {},
                   r"split 'valid': keys disagree on the number of samples "
                   r"N: .*'vision': 6"),
    "lengths_mismatch": (_set("train", "audio_lengths", lambda a: a[:3]), {},
                         r"'audio_lengths': 3"),
    "feature_dim": (lambda raw: None, {"feature_dims": (8, 3, 9)},
                    r"'vision' has shape \(11, 6, 4\), so feature dim 4, but "
                    r"model.feature_dims expects 9"),
    "text_feature_dim": (lambda raw: None, {"feature_dims": (768, 3, 4)},
                         r"'text' has shape \(11, 6, 8\).*expects 768"),
    "nan_label": (_set("valid", "regression_labels", _nan_at(3)), {},
                  r"split 'valid': 'regression_labels' is not finite at "
                  r"index 3"),
    "inf_label": (_set("test", "regression_labels", _nan_at(1, np.inf)), {},
                  r"split 'test': 'regression_labels' is not finite at "
                  r"index 1 \(inf\)"),
    "label_shape": (_set("train", "regression_labels",
                         lambda a: np.repeat(a, 2, axis=1)), {},
                    r"'regression_labels' has shape \(11, 2\)"),
    "empty_split": (_empty_test, {}, r"split 'test' is empty"),
    "audio_ndim": (_set("train", "audio", lambda a: a[:, :, 0]), {},
                   r"'audio' has shape \(11, 6\) \(ndim 2\)"),
    "text_nan": (_set("valid", "text", _nan_at(2)), {},
                 r"split 'valid': 'text' has NaN/inf values \(first at "
                 r"sample index 2\)"),
    "class_not_integral": (_set("train", "classification_labels",
                                _nan_at(4, 1.5)),
                           {"train_mode": "classification"},
                           r"must hold integer class ids; index 4 is 1.5"),
    "class_out_of_range": (_set("train", "classification_labels",
                                _nan_at(2, 3.0)),
                           {"train_mode": "classification",
                            "num_classes": 3},
                           r"index 2 is 3.0, outside \[0, num_classes=3\)"),
    "negative_length": (_set("test", "vision_lengths", _nan_at(1, -2)), {},
                        r"'vision_lengths' is negative at index 1"),
    "bert_not_ids": (lambda raw: [raw[s].update(text_bert=raw[s]["text"])
                                  for s in raw],
                     {"use_bert": True},
                     r"'text_bert' has shape \(11, 6, 8\), expected "
                     r"\[N, 3, T\]"),
}


@pytest.mark.parametrize("case", sorted(_BAD_CONTENT))
def test_bad_content_raises(tmp_path, raw, case):
  mutate, kwargs, pattern = _BAD_CONTENT[case]
  mutate(raw)
  path = _write(tmp_path, raw)
  with pytest.raises(mmsa.DataError, match=pattern) as info:
    mmsa.load_mmsa(path, **kwargs)
  assert path in str(info.value)


def test_missing_file_says_how_to_get_features(tmp_path):
  path = str(tmp_path / "nope.pkl")
  with pytest.raises(mmsa.DataError,
                     match=re.escape(path) + r": no such file.*MMSA.*"
                     r"--config\.data\.path"):
    mmsa.load_mmsa(path)


def test_unreadable_and_non_dict_pickles(tmp_path):
  garbage = tmp_path / "garbage.pkl"
  garbage.write_bytes(b"not a pickle at all")
  with pytest.raises(mmsa.DataError, match=r"garbage.pkl: could not unpickle"):
    mmsa.load_mmsa(garbage)
  with pytest.raises(mmsa.DataError, match=r"top level is a list"):
    mmsa.load_mmsa(_write(tmp_path, [1, 2, 3]))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"train_mode": "ranking"}, r"train_mode='ranking'"),
    ({"standardize": ("audio", "smell")}, r"standardize=.*'smell'"),
    ({"standardize": ("text",), "use_bert": True}, r"use_bert=True"),
    ({"clip_percentiles": (99.0, 1.0)}, r"clip_percentiles=\(99.0, 1.0\)"),
    ({"feature_dims": (8, 3)}, r"model.feature_dims=\(8, 3\)"),
])
def test_bad_settings_raise(tmp_path, raw, kwargs, pattern):
  with pytest.raises(mmsa.DataError, match=pattern):
    mmsa.load_mmsa(_write(tmp_path, raw), **kwargs)


def test_every_split_checked_before_conversion(tmp_path, raw, monkeypatch):
  """A bad test split fails before any split is converted."""
  raw["test"]["regression_labels"][0] = np.nan
  calls = []
  monkeypatch.setattr(mmsa, "_read_split",
                      lambda *a, **k: calls.append(a) or None)
  with pytest.raises(mmsa.DataError, match="split 'test'"):
    mmsa.load_mmsa(_write(tmp_path, raw))
  assert not calls
