"""Hugging Face BERT checkpoints and tokenizers from a local directory.

Nothing is ever downloaded: a model directory is what
`save_pretrained(DIR, safe_serialization=True)` writes (`config.json`,
`model.safetensors`, `tokenizer.json` and/or `vocab.txt`). Weights are mapped
onto `text.BertEncoder` parameters by name (see that module's docstring) and
every name and shape is checked.
"""

import json
import logging
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decalign_jax import torch_pickle
from decalign_jax.models import text

logger = logging.getLogger(__name__)

HOW_TO_GET_WEIGHTS = """\
Export the model once on a machine with internet access, then copy DIR here:
  from transformers import AutoModel, AutoTokenizer
  AutoModel.from_pretrained('bert-base-uncased').save_pretrained(
      DIR, safe_serialization=True)
  AutoTokenizer.from_pretrained('bert-base-uncased').save_pretrained(DIR)"""

# Weights that belong to heads or buffers rather than the encoder: skipped on
# load and reported at debug level, never as unexpected.
_IGNORED = re.compile(
    r"^(pooler|cls|classifier|qa_outputs)\.|"
    r"^embeddings\.(position_ids|token_type_ids)$")
# Old (TF-converted) checkpoints name LayerNorm parameters gamma/beta.
_OLD_NAMES = {"LayerNorm.gamma": "LayerNorm.weight",
              "LayerNorm.beta": "LayerNorm.bias"}
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight",
               "bias": "bias"}


def _hf_name(path: Sequence[str]) -> str:
  """HF name of a `BertEncoder` parameter path, e.g. `('layer_0', ...)`."""
  head, *rest = path
  m = re.fullmatch(r"layer_(\d+)", head)
  parts = ["encoder", "layer", m.group(1)] if m else [head]
  return ".".join(parts + rest[:-1] + [_LEAF_TO_HF[rest[-1]]])


def _param_shapes(config: text.BertConfig) -> dict[tuple[str, ...], Any]:
  """Flat `{path: ShapeDtypeStruct}` of `BertEncoder(config)` params."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  shapes = jax.eval_shape(text.BertEncoder(config).init,
                          jax.random.key(0), ids, ids)["params"]
  return {tuple(k.key for k in path): leaf for path, leaf
          in jax.tree_util.tree_leaves_with_path(shapes)}


def _normalize(name: str) -> str:
  if name.startswith("bert."):
    name = name[len("bert."):]
  for old, new in _OLD_NAMES.items():
    if name.endswith(old):
      name = name[:-len(old)] + new
  return name


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray], config: text.BertConfig, *,
    source: str = "state dict", dtype: Any = np.float32,
) -> dict[str, Any]:
  """Maps HF BERT weights onto `BertEncoder` parameters.

  Names may carry a `bert.` prefix (task-model checkpoints) or old-style
  `LayerNorm.gamma/beta`. Pooler and task heads are ignored. Linear weights
  (`[out, in]`) are transposed to kernels (`[in, out]`).

  Args:
    state_dict: HF name -> array.
    config: the architecture the weights must fit.
    source: where the weights came from, for error messages.
    dtype: dtype of the returned arrays.

  Returns:
    Nested params dict of numpy arrays (host memory, so the caller chooses
    placement): `BertEncoder(config).apply({"params": params}, ...)`.

  Raises:
    ValueError: listing every missing, unexpected or wrongly shaped weight.
  """
  wanted = {_hf_name(p): (p, s.shape) for p, s in _param_shapes(config).items()}
  found, ignored, dupes = {}, [], []
  for raw in state_dict:
    name = _normalize(raw)
    if _IGNORED.search(name):
      ignored.append(raw)
    elif name in found:
      dupes.append(f"{found[name]} and {raw}")
    else:
      found[name] = raw
  missing = sorted(set(wanted) - set(found))
  unexpected = sorted(found[n] for n in set(found) - set(wanted))
  wrong_shape, params = [], {}
  for name in sorted(set(wanted) & set(found)):
    path, shape = wanted[name]
    value = np.asarray(state_dict[found[name]])
    transpose = path[-1] == "kernel"
    hf_shape = shape[::-1] if transpose else shape
    if value.shape != hf_shape:
      wrong_shape.append(f"{found[name]}: expected {hf_shape}, "
                         f"got {value.shape}")
      continue
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = (value.T if transpose else value).astype(dtype)
  problems = [f"{title} ({len(items)}): {_listing(items)}" for title, items
              in (("missing", missing), ("unexpected", unexpected),
                  ("wrong shape", wrong_shape), ("duplicate", dupes)) if items]
  if problems:
    raise ValueError(f"{source} does not match BertConfig("
                     f"hidden_size={config.hidden_size}, num_hidden_layers="
                     f"{config.num_hidden_layers}, ...):\n  "
                     + "\n  ".join(problems))
  if ignored:
    logger.debug("%s: ignored %d non-encoder weights: %s", source,
                 len(ignored), ", ".join(sorted(ignored)))
  return params


def _listing(items: Sequence[str], limit: int = 12) -> str:
  # A wrong prefix makes every name mismatch; the first few say enough.
  more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def state_dict_from_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of `params_from_state_dict`: HF names (no prefix), HF layouts.

  Args:
    params: `BertEncoder` params.

  Returns:
    HF name -> numpy array, ready for `safetensors.numpy.save_file`.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = tuple(k.key for k in path)
    value = np.asarray(leaf)
    out[_hf_name(keys)] = np.ascontiguousarray(
        value.T if keys[-1] == "kernel" else value)
  return out


def _require(path: str, what: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{what} not found: {path}. Nothing is downloaded.\n"
        + HOW_TO_GET_WEIGHTS.replace("DIR", repr(os.path.dirname(path))))


def _read_weights(model_dir: str) -> tuple[dict[str, np.ndarray], str]:
  """Reads `model.safetensors` (sharded or not) or `pytorch_model.bin`."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  single = os.path.join(model_dir, "model.safetensors")
  index = single + ".index.json"
  torch_bin = os.path.join(model_dir, "pytorch_model.bin")
  if os.path.exists(single):
    return load_file(single), single
  if os.path.exists(index):
    with open(index, encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    weights = {}
    for shard in shards:
      weights.update(load_file(os.path.join(model_dir, shard)))
    return weights, index
  if os.path.exists(torch_bin):
    # Read without torch (see decalign_jax.torch_pickle).
    state = torch_pickle.load(torch_bin)
    return {k: np.asarray(v, np.float32) for k, v in state.items()}, torch_bin
  raise FileNotFoundError(
      f"no weights in {model_dir}: expected model.safetensors (or "
      "pytorch_model.bin). Nothing is downloaded.\n"
      + HOW_TO_GET_WEIGHTS.replace("DIR", repr(model_dir)))


def load_pretrained(
    model_dir: str | os.PathLike, *, dtype: Any = np.float32,
) -> tuple[text.BertConfig, dict[str, Any]]:
  """Loads an HF BERT model directory without network access.

  Args:
    model_dir: directory with `config.json` and `model.safetensors`
      (`model.safetensors.index.json` shards, or `pytorch_model.bin` when
      torch is installed).
    dtype: dtype of the returned parameters.

  Returns:
    `(config, params)`; params as in `params_from_state_dict`.

  Raises:
    FileNotFoundError: the directory, config or weights are missing.
    ValueError: the weights do not fit the config.
  """
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(
        f"BERT model directory not found: {model_dir}. Nothing is "
        "downloaded.\n" + HOW_TO_GET_WEIGHTS.replace("DIR", repr(model_dir)))
  config_path = os.path.join(model_dir, "config.json")
  _require(config_path, "config.json")
  config = text.BertConfig.from_json_file(config_path)
  weights, source = _read_weights(model_dir)
  return config, params_from_state_dict(weights, config, source=source,
                                        dtype=dtype)


def load_tokenizer(model_dir: str | os.PathLike) -> Any:
  """Loads the tokenizer of an HF model directory.

  Uses `tokenizer.json` if present, else builds a BERT WordPiece tokenizer
  from `vocab.txt` with casing and special tokens from
  `tokenizer_config.json` (default: lower case, `[PAD]`, ...).

  Args:
    model_dir: the model directory.

  Returns:
    A `tokenizers.Tokenizer`; pass it to `tokenize`.

  Raises:
    FileNotFoundError: neither file exists.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  model_dir = os.fspath(model_dir)
  tok_json = os.path.join(model_dir, "tokenizer.json")
  vocab = os.path.join(model_dir, "vocab.txt")
  if os.path.exists(tok_json):
    return tokenizers.Tokenizer.from_file(tok_json)
  _require(vocab, "tokenizer.json or vocab.txt")
  cfg = {}
  cfg_path = os.path.join(model_dir, "tokenizer_config.json")
  if os.path.exists(cfg_path):
    with open(cfg_path, encoding="utf-8") as f:
      cfg = json.load(f)
  special = {k: cfg.get(k) or default for k, default in (
      ("unk_token", "[UNK]"), ("sep_token", "[SEP]"), ("cls_token", "[CLS]"),
      ("pad_token", "[PAD]"), ("mask_token", "[MASK]"))}
  # Special tokens may be stored as AddedToken dicts.
  special = {k: v["content"] if isinstance(v, dict) else v
             for k, v in special.items()}
  wordpiece = tokenizers.BertWordPieceTokenizer(
      vocab, lowercase=cfg.get("do_lower_case", True),
      strip_accents=cfg.get("strip_accents"),
      handle_chinese_chars=cfg.get("tokenize_chinese_chars", True), **special)
  tok = tokenizers.Tokenizer.from_str(wordpiece.to_str())
  pad_id = tok.token_to_id(special["pad_token"])
  if pad_id is None:
    raise ValueError(f"{vocab}: pad token {special['pad_token']!r} is not in "
                     "the vocabulary")
  # Keeps the pad token with the tokenizer, where `tokenize` looks for it.
  tok.enable_padding(pad_id=pad_id, pad_token=special["pad_token"])
  return tok


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, *,
             text_pairs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Tokenizes like HF `tok(texts, padding="max_length", truncation=True)`.

  The tokenizer's own padding/truncation settings are overridden for the
  call and restored afterwards (so one tokenizer must not be shared across
  threads calling this).

  Args:
    tokenizer: from `load_tokenizer`.
    texts: N strings.
    max_length: L, the padded and truncated length (special tokens included).
    text_pairs: optional N second segments (token type 1), truncated
      longest-first with `texts`.

  Returns:
    `input_ids`, `attention_mask`, `token_type_ids`: int32 `[N, L]`.
  """
  texts = list(texts)
  if text_pairs is not None:
    if len(text_pairs) != len(texts):
      raise ValueError(f"tokenize: {len(texts)} texts but {len(text_pairs)} "
                       "text_pairs")
    texts = list(zip(texts, text_pairs, strict=True))
  padding, truncation = tokenizer.padding, tokenizer.truncation
  if padding is not None:
    pad = {k: padding[k] for k in ("pad_id", "pad_token", "pad_type_id")}
  elif tokenizer.token_to_id("[PAD]") is not None:
    pad = dict(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]",
               pad_type_id=0)
  else:
    raise ValueError("tokenize: the tokenizer has no padding settings and no "
                     "'[PAD]' token; call tokenizer.enable_padding(pad_id=..., "
                     "pad_token=...) first")
  try:
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, **pad)
    encodings = tokenizer.encode_batch(texts)
  finally:
    _restore(tokenizer, padding, truncation)
  out = {k: np.zeros((len(texts), max_length), np.int32)
         for k in ("input_ids", "attention_mask", "token_type_ids")}
  for i, enc in enumerate(encodings):
    out["input_ids"][i] = enc.ids
    out["attention_mask"][i] = enc.attention_mask
    out["token_type_ids"][i] = enc.type_ids
  return out


def _restore(tokenizer, padding, truncation) -> None:
  if padding is None:
    tokenizer.no_padding()
  else:
    tokenizer.enable_padding(**padding)
  if truncation is None:
    tokenizer.no_truncation()
  else:
    tokenizer.enable_truncation(**truncation)
