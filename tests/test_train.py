"""End to end: a tiny training run, resume, test mode and bad inputs."""

import functools
import json
import logging
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from decalign_jax import checkpoint
from decalign_jax import precompile
from decalign_jax import sharding
from decalign_jax import train
from decalign_jax.data import mmsa
from decalign_jax.data import synthetic
from decalign_jax.tasks import sentiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config():
  sys.path.insert(0, REPO)
  from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top
  return synthetic_config.get_config("tiny")


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_tiny_run_resume_and_test_mode(tmp_path):
  workdir = str(tmp_path / "run")
  config = _tiny_config()
  results = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  for name in ("MAE", "Non0_acc_2", "Corr", "loss"):
    assert np.isfinite(on_disk["test"][name])
    assert name in on_disk["baseline"]
  recs = _records(workdir)
  train_recs = [r for r in recs if r["split"] == "train"]
  valid_recs = [r for r in recs if r["split"] == "valid"]
  assert [r["epoch"] for r in valid_recs] == [1, 2]
  assert len(train_recs) == 4  # 4 steps/epoch, logged every 2 steps
  assert all(np.isfinite(r["loss"]) for r in train_recs)
  assert {"task", "dec", "hete", "homo", "ct", "l2_grads"} <= set(
      train_recs[0])

  # Resume: two more epochs continue from the saved state, not from scratch.
  config.num_epochs = 4
  train.train_and_evaluate(config, workdir)
  valid_recs = [r for r in _records(workdir) if r["split"] == "valid"]
  assert [r["epoch"] for r in valid_recs] == [1, 2, 3, 4]
  steps = [r["step"] for r in _records(workdir) if r["split"] == "train"]
  assert steps == sorted(steps) and steps[-1] == 16

  # Test mode re-scores the best checkpoint without training.
  n_records = len(_records(workdir))
  tested = train.train_and_evaluate(config, workdir, mode="test")
  with open(os.path.join(workdir, "results.json")) as f:
    final = json.load(f)
  assert tested["test"] == pytest.approx(final["test"])
  assert len(_records(workdir)) == n_records  # nothing was trained
  assert results["baseline"] == final["baseline"]


def _one_device(monkeypatch):
  # For tests of what the run reports, not of the mesh (test_tiny_run_resume
  # trains on all 8 fake devices, test_sharding proves the equivalence):
  # one device compiles and steps faster on these 2 cores.
  monkeypatch.setattr(train.sharding, "make_mesh", functools.partial(
      sharding.make_mesh, devices=jax.devices()[:1]))


def test_multi_seed_table(tmp_path, monkeypatch):
  _one_device(monkeypatch)
  config = _tiny_config()
  config.num_epochs = 1
  config.seeds = (1, 2)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert set(results["seeds"]) == {"1", "2"}
  assert set(results["test"]["MAE"]) == {"mean", "std"}
  maes = [results["seeds"][s]["test"]["MAE"] for s in ("1", "2")]
  assert results["test"]["MAE"]["mean"] == pytest.approx(np.mean(maes))
  assert os.path.isdir(tmp_path / "seed_1" / "ckpt" / "best")


def _write_pickle(path, data):
  with open(path, "wb") as f:
    pickle.dump(data, f)


def _bad_data(tmp_path, mutate):
  data = synthetic.make_synthetic_mmsa(
      seed=0, num_train=16, num_valid=8, num_test=8, seq_len=6,
      feature_dims=(16, 5, 7))
  mutate(data)
  path = str(tmp_path / "bad.pkl")
  _write_pickle(path, data)
  return path


def _labels_nan(d):
  d["valid"]["regression_labels"][3] = np.nan


def _drop_audio(d):
  del d["test"]["audio"]


def _wrong_dim(d):
  for split in d.values():
    split["vision"] = split["vision"][..., :4]


def _empty(d):
  for k, v in d["valid"].items():
    d["valid"][k] = v[:0]


@pytest.mark.parametrize("mutate,pattern", [
    (_labels_nan, r"valid.*regression_labels"),
    (_drop_audio, r"test.*audio"),
    (_wrong_dim, r"vision.*model.feature_dims"),
    (_empty, r"valid.*empty"),
])
def test_bad_data_stops_before_touching_workdir(tmp_path, mutate, pattern):
  workdir = tmp_path / "existing"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("precious")
  config = _tiny_config()
  config.data.source = "mmsa"
  config.data.path = _bad_data(tmp_path, mutate)
  with pytest.raises(mmsa.DataError, match=pattern):
    train.train_and_evaluate(config, str(workdir))
  assert os.listdir(workdir) == ["keep.txt"]
  assert (workdir / "keep.txt").read_text() == "precious"


def test_missing_file(tmp_path):
  config = _tiny_config()
  config.data.source = "mmsa"
  config.data.path = str(tmp_path / "nope.pkl")
  with pytest.raises(mmsa.DataError, match="nope.pkl"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_cli_unknown_config_field(tmp_path):
  workdir = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, "-m", "decalign_jax.train", "--config",
       os.path.join(REPO, "configs", "synthetic.py"), "--workdir",
       str(workdir), "--config.model.bogus_field=3"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode != 0
  assert "bogus_field" in proc.stderr
  assert not workdir.exists()


def test_iemocap_config_trains_on_a_classification_pickle(tmp_path,
                                                          monkeypatch):
  _one_device(monkeypatch)
  sys.path.insert(0, REPO)
  from configs import iemocap  # pylint: disable=g-import-not-at-top
  path = synthetic.write_synthetic_mmsa(
      str(tmp_path / "iemocap.pkl"), num_train=48, num_valid=16,
      num_test=16, seq_len=4, feature_dims=(24, 12, 20),
      train_mode="classification", num_classes=6)
  c = iemocap.get_config()
  c.data.path = path
  c.seeds = ()
  c.model.feature_dims = (24, 12, 20)
  c.model.d_model, c.model.num_layers, c.model.pde_dim = 8, 1, 8
  c.num_epochs, c.batch_size = 1, 16
  c.runtime.compile_in_subprocess = False  # tested on its own below
  results = train.train_and_evaluate(c, str(tmp_path / "w"))
  assert set(results["test"]) >= {"Acc", "Weighted_F1", "WAF1", "loss"}
  assert results["selection_metric"] == "WAF1"
  # The baseline predicts the majority training class.
  assert 0 < results["baseline"]["Acc"] < 0.5


def test_checkpoint_directories_keep_urls():
  # A pod's workdir on shared storage must not be turned into a local path.
  assert checkpoint._absolute("gs://bucket/mosi/ckpt/latest") == (
      "gs://bucket/mosi/ckpt/latest")
  assert checkpoint._absolute("runs/x/ckpt") == os.path.abspath("runs/x/ckpt")


def test_metric_writer_keeps_earlier_records_on_resume(tmp_path):
  writer = train._MetricWriter(str(tmp_path))
  writer.write({"epoch": 1})
  writer.write({"epoch": 2})
  train._MetricWriter(str(tmp_path)).write({"epoch": 3})  # a resumed run
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def _cli_run(workdir, cache_dir, *overrides):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.run(
      [sys.executable, "-m", "decalign_jax.train", "--config",
       "configs/synthetic.py:tiny", "--config.num_epochs=1",
       f"--workdir={workdir}", *overrides],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    return proc.stderr, json.load(f)


def test_cli_compiles_in_a_child_and_trains_the_same(tmp_path):
  # Each run gets an empty cache: what the parent loads, the child stored.
  log, with_child = _cli_run(tmp_path / "a", tmp_path / "jit_a",
                             "--config.runtime.compile_in_subprocess=True")
  assert "compiled in a child process" in log, log
  assert "train step loaded from the compilation cache" in log, log
  # unpack (~800 outputs) is as much a compile as the step: the child's too.
  assert "unpack loaded from the compilation cache" in log, log
  log, here = _cli_run(tmp_path / "b", tmp_path / "jit_b")
  assert "child process" not in log, log  # tiny's default: off
  assert "train step compiled in" in log, log
  # The loaded executable is the one the other run compiled: same numbers.
  assert with_child["test"] == here["test"]
  valid = [r for r in _records(tmp_path / "a") if r["split"] == "valid"]
  assert valid[0]["train_samples_per_second"] > 0
  assert valid[0]["train_seconds"] <= valid[0]["seconds"]


def _splits(tmp_path):
  config = _tiny_config()
  return config, sentiment.load_splits(config, str(tmp_path))


def test_failed_child_compile_falls_back_to_this_process(tmp_path, caplog):
  config, splits = _splits(tmp_path)
  config.runtime.compile_in_subprocess = True
  config.batch_size = 10**6  # no full training batch: the child fails
  with caplog.at_level(logging.WARNING, logger="decalign_jax.precompile"):
    assert precompile.compile_in_child(config, splits) is None
  assert "compiling in a child process failed" in caplog.text
  assert "exceeds the split" in caplog.text  # the child's own error


def test_child_compile_skip_reasons(monkeypatch):
  config = _tiny_config()
  assert "compile_in_subprocess" in precompile.skip_reason(config)
  config.runtime.compile_in_subprocess = True
  assert precompile.skip_reason(config) is None  # CPU, cache on
  monkeypatch.setenv("DECALIGN_JAX_COMPILE_CHILD", "1")
  assert "child" in precompile.skip_reason(config)


def test_child_gets_the_first_rows_of_each_split(tmp_path):
  _, splits = _splits(tmp_path)
  rows = precompile.first_rows(splits["train"], 5)
  assert rows.text.shape == (5,) + splits["train"].text.shape[1:]
  np.testing.assert_array_equal(rows.label, splits["train"].label[:5])
  assert rows.standardization == splits["train"].standardization
