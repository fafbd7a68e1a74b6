"""Bringing reference (PyTorch `taco-group/DecAlign`) configs and checkpoints over.

* `config_from_reference(cfg)`: a reference JSON config (its `config/*.json`
  or a fully resolved one) -> our `ConfigDict`, refusing fields we do not
  support.
* `params_from_reference(state_dict, config)`: a `state_dict` (mapping of
  names to arrays, or a `.pth` / `.npz` path; `.pth` files are read without
  torch, see `torch_pickle`) -> Flax params, every name and shape checked;
  `params_to_reference(params, config)` goes back.

The converted config keeps the reference's behaviour where it differs from
our defaults (`causal_in_cross=False`, `ot_mode='reference'`,
`eval.reference_non0=True`), so a converted checkpoint computes what it was
trained to compute. Flip them to get our corrected behaviour.
"""

import json
import os
import re
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from decalign_jax import config_defaults
from decalign_jax import torch_pickle
from decalign_jax.models import text_loading

# Reference fields that only concern its own scripts (paths, logging, BERT
# loading names) and have no meaning here.
_IGNORED = {
    "model_name", "transformers", "pretrained", "need_data_aligned",
    "featurePath", "feature_T", "feature_A", "feature_V", "seq_lens", "when",
    "alpha1", "alpha2", "is_distill", "iemocap_protocol", "patience",
    "batch_size_eval", "cur_seed", "mode", "device", "model_save_path",
    "train_samples", "language", "use_finetune", "class_counts",
    "_feature_standardization_stats", "selection_mode", "scheduler_mode",
}

# Fields converted by hand in `config_from_reference` (not one-to-one).
_HANDLED_BELOW = {
    "use_bert", "bert_learning_rate", "dst_feature_dim_nheads", "seeds",
    "conv1d_kernel_size_l", "conv1d_kernel_size_a", "conv1d_kernel_size_v",
    "class_weight", "class_weights", "selection_metric", "scheduler_metric",
    "early_stop_patience", "scheduler_patience", "need_feature_standardized",
    "feature_standardize_modalities", "feature_clip_percentiles",
    "need_normalized",
}

# reference field -> (our dotted field, converter)
_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "dataset_name": ("data.dataset", lambda v: {"ch-sims": "sims"}.get(
        v.lower(), v.lower())),
    "train_mode": ("data.train_mode", str),
    "num_classes": ("data.num_classes", int),
    "feature_dims": ("model.feature_dims", lambda v: tuple(map(int, v))),
    "nlevels": ("model.num_layers", int),
    "num_prototypes": ("model.num_prototypes", int),
    "gmm_em_iters": ("model.gmm_em_iters", int),
    "gmm_var_floor": ("model.gmm_var_floor", float),
    "lambda_ot": ("model.lambda_ot", float),
    "ot_num_iters": ("model.ot_num_iters", int),
    "hetero_cost_reduction": ("model.hetero_cost_reduction", str),
    "local_proto_mahalanobis": ("model.local_proto_mahalanobis", bool),
    "pde_dim": ("model.pde_dim", int),
    "mmd_bandwidth": ("model.mmd_bandwidth", float),
    "use_sequence_mask": ("model.use_sequence_mask", bool),
    "use_cross_modal_attention": ("model.use_cross_modal_attention", bool),
    "attn_mask": ("model.attn_mask", bool),
    "active_modalities": ("model.active_modalities", tuple),
    "attn_dropout": ("model.attn_dropout", float),
    "attn_dropout_a": ("model.attn_dropout_a", float),
    "attn_dropout_v": ("model.attn_dropout_v", float),
    "relu_dropout": ("model.relu_dropout", float),
    "embed_dropout": ("model.embed_dropout", float),
    "res_dropout": ("model.res_dropout", float),
    "output_dropout": ("model.output_dropout", float),
    "text_dropout": ("model.text_dropout", float),
    "task_loss": ("loss.task_loss", lambda v: {"huber": "smooth_l1",
                                               "mae": "l1"}.get(v, v)),
    "smooth_l1_beta": ("loss.smooth_l1_beta", float),
    "binary_task_weight": ("loss.binary_task_weight", float),
    "dec_loss_weight": ("loss.dec_weight", float),
    "alpha": ("loss.alpha", float),
    "beta": ("loss.beta", float),
    "ct_weight": ("loss.ct_weight", float),
    "ct_temperature": ("loss.ct_temperature", float),
    "batch_size": ("batch_size", int),
    "learning_rate": ("optim.lr", float),
    "weight_decay": ("optim.weight_decay", float),
    "clip": ("optim.clip", float),
    "factor": ("optim.plateau_factor", float),
    "num_epochs": ("num_epochs", int),
}

_REFERENCE_METRICS = {"Acc_2": "Non0_acc_2", "F1_score": "Non0_F1_score"}


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def _selection_metric(name: str | None, cfg: Mapping[str, Any]) -> str:
  dataset = str(cfg.get("dataset_name", "mosi")).lower()
  if not name or name.upper() == dataset.upper():
    return "loss"  # the reference's "<DATASET>" key is the eval loss
  if name in ("F1Acc_score", "F1_Acc_score", "F1Acc"):
    raise ValueError(f"reference field selection_metric={name!r} (a blend "
                     "of F1 and Acc_2) is not supported")
  if dataset in ("mosi", "mosei") and cfg.get(
      "train_mode", "regression") == "regression":
    return _REFERENCE_METRICS.get(name, name)
  if dataset == "iemocap" and name == "F1_score":
    return "Weighted_F1"
  return name


# What the reference's config.py adds per dataset when a field is absent
# from the JSON file (its released files omit e.g. feature_dims).
_DATASET_DEFAULTS = {
    "mosi": {"feature_dims": [768, 5, 20], "train_mode": "regression"},
    "mosei": {"feature_dims": [768, 74, 35], "train_mode": "regression"},
    "sims": {"feature_dims": [768, 33, 709], "train_mode": "regression"},
    "iemocap": {"feature_dims": [1024, 512, 1024], "use_bert": False,
                "train_mode": "classification", "num_classes": 6,
                "selection_metric": "WAF1", "scheduler_metric": "WAF1"},
}


def config_from_reference(cfg: Mapping[str, Any] | str, *,
                          dataset: str | None = None,
                          text_model_dir: str | None = None
                          ) -> ml_collections.ConfigDict:
  """A reference JSON config -> our config.

  Args:
    cfg: the parsed JSON dict, or a path to the JSON file (a released
      `config/*.json` or a fully resolved config).
    dataset: mosi | mosei | sims | iemocap, when `cfg` has no
      `dataset_name` (the reference takes it from its command line). Fields
      absent from `cfg` are filled with the reference's dataset defaults.
    text_model_dir: a local BERT directory (save_pretrained) with the
      architecture of the reference's `pretrained` model; required when
      `cfg` has `use_bert: true`.

  Returns:
    a locked ConfigDict equivalent to `cfg`.

  Raises:
    ValueError: naming every field that is unknown or unsupported.
  """
  if isinstance(cfg, str):
    with open(cfg) as f:
      cfg = json.load(f)
  cfg = dict(cfg)
  name = (dataset or cfg.get("dataset_name") or "").lower()
  name = {"ch-sims": "sims", "ch_sims": "sims", "chsims": "sims"}.get(name,
                                                                       name)
  if name not in _DATASET_DEFAULTS:
    raise ValueError(
        f"reference config has dataset_name={cfg.get('dataset_name')!r}; "
        "pass dataset= one of " + ", ".join(_DATASET_DEFAULTS))
  cfg = {**_DATASET_DEFAULTS[name], **cfg, "dataset_name": name}
  c = config_defaults.base_config()
  # Reference behaviours, kept so converted checkpoints compute the same.
  c.model.causal_in_cross = False
  c.model.ot_mode = "reference"
  c.eval.reference_non0 = True
  c.data.source = "mmsa"
  problems = []
  if cfg.get("use_bert"):
    if not text_model_dir:
      problems.append(
          "use_bert=true: give text_model_dir, a local save_pretrained "
          f"directory of {cfg.get('pretrained', 'the BERT model')!r} (or set "
          "use_bert false to use the pickle's precomputed `text` features)")
    else:
      c.model.text_model_dir = text_model_dir
      c.model.freeze_text = not cfg.get("use_finetune", True)
      if cfg.get("bert_learning_rate") is not None:
        c.optim.text_lr = float(cfg["bert_learning_rate"])
  if cfg.get("model_name", "decalign").lower() != "decalign":
    problems.append(f"model_name={cfg['model_name']!r}: only 'decalign'")
  for key, value in cfg.items():
    if key in _IGNORED or key in _HANDLED_BELOW:
      continue
    if key not in _FIELDS:
      problems.append(f"unknown reference field {key!r}")
      continue
    dotted, conv = _FIELDS[key]
    if value is None:
      continue
    _set(c, dotted, conv(value))
  if "dst_feature_dim_nheads" in cfg:
    c.model.d_model, c.model.num_heads = map(int, cfg["dst_feature_dim_nheads"])
  if "pde_dim" not in cfg:
    c.model.pde_dim = c.model.d_model
  c.model.conv_kernels = tuple(
      int(cfg.get(f"conv1d_kernel_size_{m}", 1)) for m in "lav")
  if cfg.get("need_normalized"):
    problems.append("need_normalized=true (time-averaged features) is not "
                    "supported")
  if cfg.get("class_weight", "none") not in ("none", None):
    problems.append("class_weight='balanced' is computed from the training "
                    "data: set loss.class_weights explicitly instead")
  if cfg.get("class_weights") is not None:
    c.loss.class_weights = [float(w) for w in cfg["class_weights"]]
  if cfg.get("need_feature_standardized"):
    c.data.standardize = tuple(cfg.get("feature_standardize_modalities",
                                       ("audio", "vision")))
    c.data.clip_percentiles = tuple(cfg.get("feature_clip_percentiles",
                                            (0.5, 99.5)))
  if problems:
    raise ValueError("cannot convert the reference config:\n  " +
                     "\n  ".join(problems))
  if c.data.train_mode == "classification" and "task_loss" in cfg:
    c.loss.task_loss = "mse"  # unused under classification (CE)
  patience = cfg.get("patience", 20)
  c.early_stop_patience = int(cfg.get("early_stop_patience") or patience)
  c.optim.plateau_patience = int(cfg.get("scheduler_patience") or patience)
  c.selection_metric = _selection_metric(cfg.get("selection_metric"), cfg)
  sched = cfg.get("scheduler_metric")
  c.scheduler_metric = (_selection_metric(sched, cfg) if sched else "")
  c.lock()
  return c


# ---------------------------------------------------------------- parameters

_LINEAR = (lambda w: w.T, lambda k: k.T)
_CONV = (lambda w: np.transpose(w, (2, 1, 0)),
         lambda k: np.transpose(k, (2, 1, 0)))
_CONV1 = (lambda w: w[:, :, 0].T, lambda k: k.T[:, :, None])
_SAME = (lambda w: w, lambda k: k)

# (reference name, our name, (to ours, to reference)); placeholders: {m}
# modality, {i} layer, {n} sub-module name.
_RULES: list[tuple[str, str, tuple[Callable, Callable]]] = [
    ("proj_{m}.weight", "proj_{m}/kernel", _CONV),
    ("encoder_uni_{m}.weight", "encoder_uni_{m}/kernel", _CONV1),
    ("encoder_com.weight", "encoder_com/kernel", _CONV1),
    ("trans_{m}.layers.{i}.self_attn.out_proj.weight",
     "trans_{m}/layers_{i}/self_attn/out_proj/kernel", _LINEAR),
    ("trans_{m}.layers.{i}.self_attn.out_proj.bias",
     "trans_{m}/layers_{i}/self_attn/out_proj/bias", _SAME),
    ("trans_{m}.layers.{i}.{n}_layer_norm.weight",
     "trans_{m}/layers_{i}/{n}_layer_norm/scale", _SAME),
    ("trans_{m}.layers.{i}.{n}_layer_norm.bias",
     "trans_{m}/layers_{i}/{n}_layer_norm/bias", _SAME),
    ("trans_{m}.layers.{i}.fc{n}.weight", "trans_{m}/layers_{i}/fc{n}/kernel",
     _LINEAR),
    ("trans_{m}.layers.{i}.fc{n}.bias", "trans_{m}/layers_{i}/fc{n}/bias",
     _SAME),
    ("pde_{m}.net.{i}.weight", "pde_{m}/net_{i}/kernel", _LINEAR),
    ("pde_{m}.net.{i}.bias", "pde_{m}/net_{i}/bias", _SAME),
    ("out_layer.weight", "out_layer/kernel", _LINEAR),
    ("out_layer.bias", "out_layer/bias", _SAME),
]
_GROUPS = {"m": "[lav]", "i": r"\d+", "n": "[a-z0-9]+"}


def _match(template: str, name: str) -> dict[str, str] | None:
  pattern = re.escape(template)
  for key, rx in _GROUPS.items():
    pattern = pattern.replace(re.escape("{" + key + "}"), f"(?P<{key}>{rx})")
  m = re.fullmatch(pattern, name)
  return None if m is None else m.groupdict()


def _rename(name: str, *, to_ours: bool) -> tuple[str, Callable] | None:
  for ref, ours, (fwd, back) in _RULES:
    src, dst = (ref, ours) if to_ours else (ours, ref)
    groups = _match(src, name)
    if groups is not None:
      return dst.format(**groups), (fwd if to_ours else back)
  return None


# The reference wraps transformers' BertModel as `text_model.model`.
_BERT_PREFIX = "text_model.model."

_IN_PROJ = re.compile(
    r"trans_([lav])\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)")
_QKV = re.compile(
    r"trans_([lav])/layers_(\d+)/self_attn/([qkv])_proj/(kernel|bias)")


def load_state_dict(source: Mapping[str, Any] | str) -> dict[str, np.ndarray]:
  """A state_dict as numpy arrays, from a mapping, `.npz` or `.pth` file."""
  if isinstance(source, Mapping):
    return {k: np.asarray(v) for k, v in source.items()}
  path = os.fspath(source)
  if not os.path.exists(path):
    raise FileNotFoundError(f"reference checkpoint {path} does not exist")
  if path.endswith(".npz"):
    with np.load(path) as z:
      return {k: z[k] for k in z.files if "/" not in k}
  sd = torch_pickle.load(path)
  if isinstance(sd, Mapping) and "model_state_dict" in sd:
    sd = sd["model_state_dict"]
  if not isinstance(sd, Mapping):
    raise ValueError(f"{path} holds a {type(sd).__name__}, not a state_dict")
  return {k: np.asarray(v) for k, v in sd.items()}


def _expected_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple]:
  import jax  # pylint: disable=g-import-not-at-top
  from decalign_jax.tasks import sentiment  # pylint: disable=g-import-not-at-top
  model = sentiment.build_model(config)
  t = 8
  inputs = [np.zeros((2, t, d), np.float32) for d in config.model.feature_dims]
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), *inputs)["params"])
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {"/".join(k.key for k in path): tuple(v.shape) for path, v in flat}


def _nest(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for name, value in flat.items():
    node = out
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def params_from_reference(state_dict: Mapping[str, Any] | str,
                          config: ml_collections.ConfigDict
                          ) -> dict[str, Any]:
  """Reference `state_dict` -> our Flax params.

  Args:
    state_dict: names -> arrays (PyTorch layout), or a `.pth`/`.npz` path.
    config: our config (e.g. from `config_from_reference`).

  Returns:
    the nested params dict (numpy arrays, dtype preserved).

  Raises:
    ValueError: listing missing, unexpected and mis-shaped parameters.
  """
  sd = load_state_dict(state_dict)
  flat: dict[str, np.ndarray] = {}
  unexpected = []
  bert_sd = {k[len(_BERT_PREFIX):]: v for k, v in sd.items()
             if k.startswith(_BERT_PREFIX)}
  sd = {k: v for k, v in sd.items() if not k.startswith(_BERT_PREFIX)}
  text_params = None
  if bert_sd:
    bert = _bert_config(config)
    if bert is None:
      unexpected.append(f"{_BERT_PREFIX}* ({len(bert_sd)} BERT tensors; set "
                        "model.text_model_dir to use them)")
    else:
      text_params = text_loading.params_from_state_dict(
          bert_sd, bert, source="reference state_dict (text_model.model.*)")
  for name, w in sd.items():
    m = _IN_PROJ.fullmatch(name)
    if m:
      mod, layer, kind = m.groups()
      for part, chunk in zip("qkv", np.split(w, 3, axis=0)):
        key = f"trans_{mod}/layers_{layer}/self_attn/{part}_proj/"
        flat[key + ("kernel" if kind == "weight" else "bias")] = (
            chunk.T if kind == "weight" else chunk)
      continue
    renamed = _rename(name, to_ours=True)
    if renamed is None:
      unexpected.append(name)
    else:
      flat[renamed[0]] = renamed[1](w)
  expected = {k: v for k, v in _expected_shapes(config).items()
              if not k.startswith("text_model/")}
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  wrong = [f"{k}: reference gives {flat[k].shape}, config needs "
           f"{expected[k]}" for k in sorted(set(flat) & set(expected))
           if tuple(flat[k].shape) != expected[k]]
  if unexpected or missing or extra or wrong:
    lines = ([f"unexpected reference parameter {n}" for n in unexpected] +
             [f"missing parameter {n}" for n in missing] +
             [f"parameter {n} not used by this config" for n in extra] +
             wrong)
    raise ValueError("reference state_dict does not match the config:\n  "
                     + "\n  ".join(lines))
  params = _nest(flat)
  if text_params is not None:
    params["text_model"] = text_params
  return params


def _bert_config(config):
  from decalign_jax.tasks import sentiment  # pylint: disable=g-import-not-at-top
  return sentiment.text_encoder_config(config)


def params_to_reference(params: Mapping[str, Any],
                        config: ml_collections.ConfigDict
                        ) -> dict[str, np.ndarray]:
  """Our Flax params -> a reference `state_dict` (numpy, PyTorch layout)."""
  del config  # the layout is fully determined by the names
  import jax  # pylint: disable=g-import-not-at-top
  params = dict(params)
  sd: dict[str, np.ndarray] = {}
  if "text_model" in params:
    for k, v in text_loading.state_dict_from_params(
        params.pop("text_model")).items():
      sd[_BERT_PREFIX + k] = v
  flat = {"/".join(k.key for k in path): np.asarray(v) for path, v in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  qkv: dict[str, dict[str, np.ndarray]] = {}
  for name, k in flat.items():
    m = _QKV.fullmatch(name)
    if m:
      mod, layer, part, kind = m.groups()
      ref = (f"trans_{mod}.layers.{layer}.self_attn.in_proj_"
             f"{'weight' if kind == 'kernel' else 'bias'}")
      qkv.setdefault(ref, {})[part] = k.T if kind == "kernel" else k
      continue
    renamed = _rename(name, to_ours=False)
    if renamed is None:
      raise ValueError(f"no reference name for parameter {name}")
    sd[renamed[0]] = renamed[1](k)
  for ref, parts in qkv.items():
    sd[ref] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
  return sd
