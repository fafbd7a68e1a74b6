"""BERT-family text encoder (Devlin et al. 2019), as Hugging Face `BertModel`.

Used as DecAlign's text backbone: the model returns the last hidden states
`[B, T, H]`; there is no pooler. Layers are post-LN. Parameter names mirror
Hugging Face's so that `text_loading` maps checkpoints one to one:

  embeddings/{word,position,token_type}_embeddings/embedding
  embeddings/LayerNorm/{scale,bias}
  layer_{i}/attention/self/{query,key,value}/{kernel,bias}
  layer_{i}/attention/output/{dense,LayerNorm}/...
  layer_{i}/intermediate/dense/{kernel,bias}
  layer_{i}/output/{dense,LayerNorm}/...

HF's `encoder.layer.{i}.` becomes `layer_{i}/`, `weight` becomes `kernel`
(transposed), `embedding` or `scale`. Layouts are channel-last.
"""

import dataclasses
import json
import math
import os
from typing import Any, Literal, Mapping, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp

from decalign_jax.models import dots
from decalign_jax.models import dropout as dropout_lib

Activation = Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "relu"]
_ACTIVATIONS = {
    # HF "gelu" is the exact erf form; "gelu_new" is the tanh approximation.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT encoder; field names are those of HF config.json.

  Attributes:
    vocab_size: V, rows of the word embedding.
    hidden_size: H.
    num_hidden_layers: number of transformer layers.
    num_attention_heads: heads; must divide `hidden_size`.
    intermediate_size: width of the feed-forward block.
    max_position_embeddings: longest supported sequence T.
    type_vocab_size: number of token types (segments).
    layer_norm_eps: LayerNorm epsilon (HF: 1e-12).
    hidden_act: feed-forward activation.
    hidden_dropout_prob: dropout on embeddings and residual branches.
    attention_probs_dropout_prob: dropout on attention weights.
    initializer_range: std of the normal init used when not loading weights.
    pad_token_id: id of the padding token (informational; padding is given by
      the attention mask).
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: Activation = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  initializer_range: float = 0.02
  pad_token_id: int = 0

  def __post_init__(self):
    if self.hidden_act not in get_args(Activation):
      raise ValueError(f"BertConfig.hidden_act={self.hidden_act!r} is not "
                       f"supported; expected one of {get_args(Activation)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"BertConfig.hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "BertConfig":
    """Builds a config from an HF `config.json` dict.

    Keys that do not affect the encoder (`architectures`, `use_cache`,
    `transformers_version`, ...) are ignored; settings this implementation
    cannot honour raise.

    Args:
      d: the parsed config.json.

    Returns:
      The config.
    """
    model_type = d.get("model_type", "bert")
    if model_type != "bert":
      raise ValueError(
          f"config model_type={model_type!r}: only the BERT layout ('bert') "
          "is supported (RoBERTa-style position offsets and other families "
          "would load wrongly)")
    pos_type = d.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
      raise ValueError(f"config position_embedding_type={pos_type!r}: only "
                       "'absolute' is supported")
    for flag in ("is_decoder", "add_cross_attention"):
      if d.get(flag):
        raise ValueError(f"config {flag}=true: only encoders are supported")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> "BertConfig":
    """Reads an HF `config.json`; see `from_dict`."""
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f))

  def to_dict(self) -> dict[str, Any]:
    """HF-style dict (`from_dict(c.to_dict()) == c`)."""
    return dict(dataclasses.asdict(self), model_type="bert")


class _BertPart(nn.Module):
  """The fields every BERT sub-module shares."""

  config: BertConfig
  dtype: Any
  param_dtype: Any

  @property
  def part_kw(self) -> dict[str, Any]:
    """Keyword arguments that build a sibling part with the same settings."""
    return dict(config=self.config, dtype=self.dtype,
                param_dtype=self.param_dtype)


class _Embeddings(_BertPart):
  """HF BertEmbeddings: LN(word + position + token type), then dropout."""

  @nn.compact
  def __call__(self, input_ids, token_type_ids, *, train):
    c = self.config
    embed = lambda n, name: nn.Embed(  # noqa: E731
        n, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.initializers.normal(c.initializer_range), name=name)
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (embed(c.vocab_size, "word_embeddings")(input_ids)
         + embed(c.max_position_embeddings, "position_embeddings")(positions)
         + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids))
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="LayerNorm")(x)
    return dropout_lib.Dropout(c.hidden_dropout_prob)(
        x, deterministic=not train)


class _SelfAttention(_BertPart):
  """HF BertSelfAttention: softmax(q k^T / sqrt(d) + bias) v over heads."""

  @nn.compact
  def __call__(self, x, bias, *, train):
    c = self.config
    h = c.num_attention_heads
    hd = c.hidden_size // h
    dense = lambda name: dots.Dense(  # noqa: E731
        c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.normal(c.initializer_range), name=name)
    split = lambda y: y.reshape(*y.shape[:2], h, hd)  # noqa: E731
    q, k, v = (split(dense(n)(x)) for n in ("query", "key", "value"))
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(hd)
    # Softmax in float32 so that a bf16 compute dtype stays stable; with
    # float32 inputs this is HF's computation exactly.
    logits = logits.astype(jnp.float32) + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = dropout_lib.Dropout(c.attention_probs_dropout_prob)(
        weights, deterministic=not train)
    out = jnp.einsum("bhqk,bkhc->bqhc", weights, v)
    return out.reshape(x.shape)


class _DenseLayerNorm(_BertPart):
  """HF BertSelfOutput / BertOutput: LN(x + dropout(dense(y)))."""

  @nn.compact
  def __call__(self, y, x, *, train):
    c = self.config
    y = dots.Dense(c.hidden_size, dtype=self.dtype,
                   param_dtype=self.param_dtype,
                   kernel_init=nn.initializers.normal(c.initializer_range),
                   name="dense")(y)
    y = dropout_lib.Dropout(c.hidden_dropout_prob)(y, deterministic=not train)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="LayerNorm")(x + y)


class _Attention(_BertPart):
  """HF BertAttention: self-attention then BertSelfOutput."""

  @nn.compact
  def __call__(self, x, bias, *, train):
    kw = self.part_kw
    y = _SelfAttention(**kw, name="self")(x, bias, train=train)
    return _DenseLayerNorm(**kw, name="output")(y, x, train=train)


class _Intermediate(_BertPart):
  """HF BertIntermediate: act(dense(x))."""

  @nn.compact
  def __call__(self, x):
    c = self.config
    y = dots.Dense(c.intermediate_size, dtype=self.dtype,
                   param_dtype=self.param_dtype,
                   kernel_init=nn.initializers.normal(c.initializer_range),
                   name="dense")(x)
    return _ACTIVATIONS[c.hidden_act](y)


class _Layer(_BertPart):
  """One post-LN BERT layer (HF BertLayer)."""

  @nn.compact
  def __call__(self, x, bias, *, train):
    kw = self.part_kw
    x = _Attention(**kw, name="attention")(x, bias, train=train)
    y = _Intermediate(**kw, name="intermediate")(x)
    return _DenseLayerNorm(**kw, name="output")(y, x, train=train)


class BertEncoder(nn.Module):
  """BERT encoder without pooler; returns the last hidden states.

  Attributes:
    config: the architecture (`BertConfig.from_json_file(...)`).
    dtype: compute dtype (e.g. `jnp.bfloat16`); attention softmax and
      LayerNorm statistics are taken in float32 regardless.
    param_dtype: dtype of the parameters.
  """

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    """Encodes token ids.

    Args:
      input_ids: `[B, T]` int token ids.
      attention_mask: `[B, T]`, 1 for real tokens and 0 for padding; padded
        keys get no attention weight. Padded positions still get (unused)
        outputs, as in HF.
      token_type_ids: `[B, T]` int segment ids, or None for all zeros.
      train: enables dropout (needs a `dropout` rng).

    Returns:
      `[B, T, H]` last hidden states in `dtype`.
    """
    c = self.config
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
      raise ValueError(
          f"BertEncoder: input_ids {input_ids.shape} and attention_mask "
          f"{attention_mask.shape} must both be [B, T]")
    if input_ids.shape[1] > c.max_position_embeddings:
      raise ValueError(
          f"BertEncoder: sequence length {input_ids.shape[1]} exceeds "
          f"max_position_embeddings={c.max_position_embeddings}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    elif token_type_ids.shape != input_ids.shape:
      raise ValueError(f"BertEncoder: token_type_ids {token_type_ids.shape} "
                       f"must match input_ids {input_ids.shape}")
    kw = dict(config=c, dtype=self.dtype, param_dtype=self.param_dtype)
    x = _Embeddings(**kw, name="embeddings")(input_ids, token_type_ids,
                                             train=train)
    # HF's additive mask: the most negative float on padded keys, so that
    # their weights underflow to exactly 0. `[B, 1, 1, T]` broadcasts over
    # heads and queries.
    keep = attention_mask.astype(bool)[:, None, None, :]
    bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(
        jnp.float32)
    for i in range(c.num_hidden_layers):
      x = _Layer(**kw, name=f"layer_{i}")(x, bias, train=train)
    return x
