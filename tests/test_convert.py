"""Reference checkpoints: torch-free .pth reading and `--mode test` on one."""

import json
import os
import pickle
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from decalign_jax import convert
from decalign_jax import metrics
from decalign_jax import torch_pickle
from tests import parity_utils as pu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTH = os.path.join(pu.FIXTURES, "reference_small_regression.pth")
CONFIG_JSON = os.path.join(pu.FIXTURES,
                           "reference_small_regression_config.json")


def test_torch_pickle_reads_views_dtypes_and_state_dicts():
  # torch_views.pth: torch.save of a transposed view, a row view sharing its
  # storage, float64, int64, bfloat16 and a 0-d tensor (made with torch 2.13).
  obj = torch_pickle.load(os.path.join(pu.FIXTURES, "torch_views.pth"))
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  np.testing.assert_array_equal(obj["w"], x.T)
  np.testing.assert_array_equal(obj["shared_a"], x[1])
  assert obj["f64"].dtype == np.float64
  np.testing.assert_array_equal(obj["i64"], [1, 2, 3])
  assert obj["bf"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(obj["bf"].astype(np.float32), [1.5, 2.0])
  assert obj["scalar"].shape == () and float(obj["scalar"]) == 3.0
  sd = convert.load_state_dict(PTH)
  expected = pu.state_dict("small_regression")
  assert set(sd) == set(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(sd[k], v)


def test_torch_pickle_refuses_arbitrary_objects(tmp_path):
  import zipfile  # pylint: disable=g-import-not-at-top
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps(os.system, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="refusing.*system"):
    torch_pickle.load(str(path))
  (tmp_path / "legacy.pth").write_bytes(b"\x80\x02not a zip")
  with pytest.raises(ValueError, match="not a torch>=1.6 zip"):
    torch_pickle.load(str(tmp_path / "legacy.pth"))


def test_released_config_needs_dataset_and_fills_its_defaults():
  released = {"dst_feature_dim_nheads": [64, 8], "num_prototypes": 7,
              "use_bert": False, "pde_dim": 64, "task_loss": "mse"}
  with pytest.raises(ValueError, match="dataset"):
    convert.config_from_reference(released)
  c = convert.config_from_reference(released, dataset="mosi")
  assert c.model.feature_dims == (768, 5, 20)
  c = convert.config_from_reference({"use_bert": False}, dataset="iemocap")
  assert c.data.train_mode == "classification" and c.data.num_classes == 6
  assert c.selection_metric == "WAF1"


def test_cli_scores_a_reference_checkpoint(tmp_path):
  g = pu.load("small_regression")
  split = {
      "text": g["in/text"], "audio": g["in/audio"], "vision": g["in/vision"],
      "regression_labels": g["in/labels"],
      "id": np.array([f"s{i}" for i in range(16)]),
      "raw_text": np.array(["x"] * 16),
  }
  data = str(tmp_path / "data.pkl")
  with open(data, "wb") as f:
    pickle.dump({"train": split, "valid": split, "test": split}, f)
  workdir = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, "-m", "decalign_jax.train", "--config",
       f"configs/reference.py:{CONFIG_JSON}", f"--config.init_from={PTH}",
       f"--config.data.path={data}", f"--workdir={workdir}", "--mode=test"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "test_results.json") as f:
    results = json.load(f)
  expected = metrics.mosi_regression_metrics(g["out/output_logit"],
                                             g["in/labels"])
  for name in ("MAE", "Corr", "Non0_acc_2", "Acc_7"):
    assert results["test"][name] == pytest.approx(expected[name], rel=1e-5,
                                                  abs=1e-6)
