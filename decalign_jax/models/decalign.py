"""The DecAlign model (ICLR 2026): decouple, align hierarchically, fuse.

Layout is channel-last throughout: sequences are `[B, T, D]`. Parameter names
follow the reference (`proj_l`, `encoder_uni_a`, `encoder_com`,
`trans_v/layers_0/self_attn/q_proj`, `pde_l/net_0`, `out_layer`) so that
`decalign_jax.convert` maps checkpoints one to one.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from decalign_jax.losses import decomposition
from decalign_jax.losses import pooling
from decalign_jax.models import align
from decalign_jax.models import dots
from decalign_jax.models import dropout as dropout_lib
from decalign_jax.models import text as text_lib
from decalign_jax.models import transformer as tfm

MODALITY_KEYS = {"text": "l", "audio": "a", "vision": "v"}


class DistributionEncoder(nn.Module):
  """Linear(d, d) -> ReLU -> Dropout -> Linear(d, latent): the `pde_*` heads."""

  latent_dim: int
  dropout: float = 0.0
  dropout_implementation: str = "xla"

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    d = x.shape[-1]
    x = nn.relu(tfm.torch_dense(d, d, "net_0")(x))
    x = dropout_lib.Dropout(self.dropout,
                            implementation=self.dropout_implementation)(
                                x, deterministic)
    return tfm.torch_dense(self.latent_dim, d, "net_3")(x)


class DecAlign(nn.Module):
  """DecAlign for text/audio/vision sequences.

  Attributes:
    feature_dims: input feature sizes (d_l, d_a, d_v).
    num_outputs: 1 for regression, C for C-class classification.
    d_model: width of every encoder.
    num_heads: attention heads.
    num_layers: layers per cross-modal transformer.
    conv_kernels: Conv1d kernel sizes of the (l, a, v) input projections
      (padding 0, so length T -> T - k + 1); a projection is skipped when its
      input width already equals `d_model`, as in the reference.
    hetero: settings of the heterogeneous branch.
    pde_dim: latent size of the distribution encoders.
    mmd_bandwidth: Gaussian-kernel bandwidth of the homogeneous MMD.
    use_sequence_mask: mask all-zero audio/vision frames in projections and
      pooling (the reference's `x.abs().sum(-1) > 0`).
    use_cross_modal_attention: query one modality, key/value the time
      concatenation of the other active ones; else causal-capable self-attn.
    attn_mask: causal masking.
    causal_in_cross: apply `attn_mask` under cross-modal attention too. The
      reference silently ignores it there; `False` reproduces that.
    attention_kernel: 'xla', or 'cpu' for the fused CPU attention kernel of
      `cpu_attention.py` in the cross-modal transformers; 'cpu' also draws
      the model's other dropout masks with that library (the same masks).
    active_modalities: subset of ('text', 'audio', 'vision'); inactive ones
      contribute zeros to the fusion representation, and the alignment
      losses are 0 unless all three are active (as in the reference).
  """

  feature_dims: Sequence[int]
  num_outputs: int = 1
  d_model: int = 64
  num_heads: int = 8
  num_layers: int = 5
  conv_kernels: Sequence[int] = (1, 1, 1)
  hetero: align.HeteroSettings = align.HeteroSettings()
  pde_dim: int = 64
  mmd_bandwidth: float = 1.0
  use_sequence_mask: bool = False
  use_cross_modal_attention: bool = True
  attn_mask: bool = True
  causal_in_cross: bool = True
  attention_kernel: str = "xla"
  active_modalities: Sequence[str] = ("text", "audio", "vision")
  attn_dropout: float = 0.0
  attn_dropout_a: float = 0.0
  attn_dropout_v: float = 0.0
  relu_dropout: float = 0.0
  embed_dropout: float = 0.0
  res_dropout: float = 0.0
  output_dropout: float = 0.0
  text_dropout: float = 0.0
  # A BERT text backbone: `text` is then [B, 3, T] (ids, mask, segments).
  text_encoder: text_lib.BertConfig | None = None
  freeze_text_encoder: bool = False

  def _sequence_masks(self, audio, vision):
    if not self.use_sequence_mask:
      return {"l": None, "a": None, "v": None}
    frame_mask = lambda x: (jnp.abs(x).sum(-1) > 0).astype(x.dtype)  # noqa
    return {"l": None, "a": frame_mask(audio), "v": frame_mask(vision)}

  @nn.compact
  def __call__(self, text, audio, vision, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, Any]]:
    """Runs DecAlign.

    Args:
      text: `[B, T_l, d_l]` text features, or `[B, 3, T_l]` int token ids,
        attention mask and segment ids when `text_encoder` is set.
      audio: `[B, T_a, d_a]` audio features.
      vision: `[B, T_v, d_v]` vision features.
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      `(logits [B, num_outputs], aux)`; `aux["losses"]` has `dec`, `hete`,
      `homo`; `aux` also has `final_rep` [B, 6d], `s`/`c` (unique/common
      features per modality key), `masks` and `z_common`. Finer intermediates
      are sown into the 'intermediates' collection.
    """
    det = not train
    chosen = {MODALITY_KEYS[m] for m in self.active_modalities}
    active = tuple(m for m in align.MODALITIES if m in chosen)
    masks = self._sequence_masks(audio, vision)
    if self.text_encoder is not None:
      ids, attention, segments = text[:, 0], text[:, 1], text[:, 2]
      text = text_lib.BertEncoder(self.text_encoder, name="text_model")(
          ids, attention, segments, train=train)
      if self.freeze_text_encoder:
        # No backward pass through the backbone at all.
        text = jax.lax.stop_gradient(text)
      if self.use_sequence_mask:
        masks["l"] = attention.astype(text.dtype)
    text = dropout_lib.Dropout(self.text_dropout,
                               implementation=self.attention_kernel)(text, det)
    inputs = {"l": text, "a": audio, "v": vision}
    d = self.d_model

    proj, s, c = {}, {}, {}
    encoder_com = dots.Dense(d, use_bias=False, name="encoder_com",
                             kernel_init=tfm.torch_default_kernel_init)
    for i, m in enumerate(align.MODALITIES):
      x = inputs[m]
      if self.feature_dims[i] != d:
        x = nn.Conv(d, (self.conv_kernels[i],), padding="VALID",
                    use_bias=False, name=f"proj_{m}",
                    kernel_init=tfm.torch_default_kernel_init,
                    conv_general_dilated=dots.dense_conv_general_dilated)(x)
      if masks[m] is not None:
        # A kernel > 1 shortens the sequence; keep the first T' mask entries.
        masks[m] = masks[m][:, :x.shape[1]]
        x = x * masks[m][..., None]
      proj[m] = x
      s[m] = dots.Dense(d, use_bias=False, name=f"encoder_uni_{m}",
                        kernel_init=tfm.torch_default_kernel_init)(x)
      c[m] = encoder_com(x)
      self.sow("intermediates", f"projected_{m}", x)

    # DecAlign Eq. (decoupling): mean cos^2 between unique and common parts.
    dec_terms = [decomposition.decoupling_loss(s[m], c[m]) for m in active]
    dec_loss = jnp.stack(dec_terms).mean()

    zero = jnp.zeros((), text.dtype)
    z_common = None
    if len(active) == 3:
      pooled_s = {m: pooling.masked_mean(s[m], masks[m]) for m in active}
      hete_loss, hete_aux = align.hetero_alignment(pooled_s, self.hetero)
      pooled_c = {m: pooling.masked_mean(c[m], masks[m]) for m in active}
      z_common = {
          m: DistributionEncoder(self.pde_dim, self.output_dropout,
                                 self.attention_kernel, name=f"pde_{m}")(
                                     pooled_c[m], deterministic=det)
          for m in align.MODALITIES
      }
      homo_loss, homo_aux = align.homo_alignment(
          z_common, mmd_bandwidth=self.mmd_bandwidth)
      self.sow("intermediates", "hete", dict(hete_aux, pooled=pooled_s))
      self.sow("intermediates", "homo", dict(homo_aux, pooled=pooled_c))
    else:
      hete_loss = homo_loss = zero

    attn_dropouts = {"l": self.attn_dropout, "a": self.attn_dropout_a,
                     "v": self.attn_dropout_v}
    batch = text.shape[0]
    h, c_avg = {}, {}
    for m in align.MODALITIES:
      if m not in active:
        h[m] = c_avg[m] = jnp.zeros((batch, d), text.dtype)
        continue
      context = ()
      if self.use_cross_modal_attention:
        context = tuple(s[o] for o in align.MODALITIES
                        if o != m and o in active)
      encoded = tfm.TransformerEncoder(
          d, self.num_heads, self.num_layers,
          attn_dropout=attn_dropouts[m], relu_dropout=self.relu_dropout,
          res_dropout=self.res_dropout, embed_dropout=self.embed_dropout,
          causal=self.attn_mask, causal_in_cross=self.causal_in_cross,
          attention_kernel=self.attention_kernel, name=f"trans_{m}")(
              s[m], context, deterministic=det)
      h[m] = pooling.masked_mean(encoded, masks[m])
      c_avg[m] = pooling.masked_mean(c[m], masks[m])

    final_rep = jnp.concatenate(
        [h[m] for m in align.MODALITIES] +
        [c_avg[m] for m in align.MODALITIES], axis=-1)
    out = dropout_lib.Dropout(self.output_dropout,
                              implementation=self.attention_kernel)(
                                  final_rep, det)
    logits = tfm.torch_dense(self.num_outputs, 6 * d, "out_layer")(out)
    aux = {
        "losses": {"dec": dec_loss, "hete": hete_loss, "homo": homo_loss},
        "final_rep": final_rep,
        "s": s, "c": c, "h": h, "c_avg": c_avg, "masks": masks,
        "z_common": z_common,
    }
    return logits, aux
