"""Mask2Former's masked-attention transformer decoder, ready for MP-Former's mask-pilot queries.

Each layer runs masked cross-attention to one feature level (1/32, 1/16, 1/8 cycling), then
self-attention, then an FFN, all post-norm. Shared prediction heads run on the initial queries
and after every layer, so `num_layers` layers give `num_layers + 1` predictions. The mask
predicted by one head, resized to the next layer's level, becomes that layer's attention mask
(spec section 2.4).

MP-Former (spec section 1) adds a block of "mask-pilot" (MP) queries in front of the matching
queries during training. They carry their own cross-attention masks (noised ground truth) and a
self-attention mask keeps the matching queries from seeing them. The decoder takes that block as
a `MaskPilotInputs` and returns its predictions separately; without it nothing extra is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mpformer_jax.models import layers
from mpformer_jax.models.conv import Conv2D
from mpformer_jax.models.position_encoding import sine_position_encoding
from mpformer_jax.ops.sampling import resize_bilinear

Dtype = Any


@flax.struct.dataclass
class MaskPilotInputs:
  """The mask-pilot block of MP-Former, prepared from the ground truth (training only).

  Attributes:
    queries: `[B, M, D]` content of the MP queries (label embeddings; zeros for padded slots).
    attn_masks: one entry per decoder layer `i`: a bool `[B, M, H_l * W_l]` cross-attention block
      mask (True = blocked) at the resolution of layer `i`'s level, or None where the MP queries
      use their own predicted masks (the reference's `ALL_LY_DN=False` in later layers).
    self_attn_mask: bool `[B, M + Q, M + Q]` (or `[M + Q, M + Q]` shared by the batch),
      True = blocked, over the concatenation `[MP queries; matching queries]`.
  """

  queries: jax.Array
  attn_masks: tuple[jax.Array | None, ...]
  self_attn_mask: jax.Array


class DecoderLayer(nn.Module):
  """Cross-attention -> self-attention -> FFN (post-norm by default, pre-norm optional)."""

  num_heads: int = 8
  ffn_dim: int = 2048
  pre_norm: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, query_pos, memory, memory_pos, cross_blocked, self_blocked):
    """One decoder layer.

    Args:
      x: queries `[B, T, D]`.
      query_pos: `[B, T, D]` query positional embedding, or None.
      memory: level features `[B, S, D]` (level embedding added).
      memory_pos: `[1, S, D]` positional encoding of the level.
      cross_blocked: bool `[B, 1, T, S]`, True = blocked.
      self_blocked: bool `[T, T]` or None.

    Returns:
      `[B, T, D]`.
    """
    d = x.shape[-1]
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    with_pos = lambda t: t if query_pos is None else t + query_pos
    mha = lambda name: layers.MultiHeadAttention(self.num_heads, self.dtype, name=name)

    # Masked cross-attention.
    y = ln("cross_attn_norm")(x) if self.pre_norm else x
    y = mha("cross_attn")(with_pos(y), memory + memory_pos, memory, cross_blocked)
    x = x + y
    if not self.pre_norm:
      x = ln("cross_attn_norm")(x)

    # Self-attention.
    y = ln("self_attn_norm")(x) if self.pre_norm else x
    y = mha("self_attn")(with_pos(y), with_pos(y), y, self_blocked)
    x = x + y
    if not self.pre_norm:
      x = ln("self_attn_norm")(x)

    # FFN: xavier_uniform_ weights, PyTorch default biases.
    y = ln("ffn_norm")(x) if self.pre_norm else x
    y = layers.torch_dense(self.ffn_dim, d, self.dtype, "linear1", layers.xavier_uniform)(y)
    y = layers.torch_dense(d, self.ffn_dim, self.dtype, "linear2", layers.xavier_uniform)(
      nn.relu(y)
    )
    x = x + y
    if not self.pre_norm:
      x = ln("ffn_norm")(x)
    return x


class PredictionHeads(nn.Module):
  """Shared heads: LayerNorm, class logits (K + 1) and the mask embedding.

  Mask logits are `einsum("btc,bhwc->bthw", mask_embed, mask_features)`; the decoder forms them
  itself (see `TransformerDecoder`) so that all predictions share one product.
  """

  num_classes: int
  mask_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """Predicts classes and mask embeddings.

    Args:
      x: queries `[B, T, D]`.

    Returns:
      `(class_logits [B, T, K + 1] float32, mask_embed [B, T, mask_dim])`.
    """
    d = x.shape[-1]
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="decoder_norm")(x)
    logits = layers.torch_dense(self.num_classes + 1, d, self.dtype, "class_embed")(x)
    embed = layers.MLP(d, self.mask_dim, 3, self.dtype, name="mask_embed")(x)
    return logits.astype(jnp.float32), embed


def mask_logits(mask_embed: jax.Array, mask_features: jax.Array) -> jax.Array:
  """`[..., T, C] x [B, H, W, C] -> [..., T, H, W]` mask logits, accumulated in float32."""
  return jnp.einsum(
    "...btc,bhwc->...bthw", mask_embed, mask_features, preferred_element_type=jnp.float32
  )


def attention_blocked(mask_embed: jax.Array, level_mask_features: jax.Array) -> jax.Array:
  """Masked-attention mask: block where the predicted mask's sigmoid is below 0.5.

  The reference resizes the stride-4 mask logits bilinearly to the level and thresholds them.
  Bilinear resizing is linear and acts on the spatial axes only, so it commutes with the
  channel product: resizing `mask_features` to the level once per level and taking the product
  there gives the same logits (up to float rounding) at a fraction of the cost.

  Args:
    mask_embed: `[B, T, C]`.
    level_mask_features: `mask_features` resized to the level, `[B, h, w, C]`.

  Returns:
    bool `[B, T, h * w]`, True = blocked, without gradient.
  """
  logits = mask_logits(jax.lax.stop_gradient(mask_embed), level_mask_features)
  blocked = jax.nn.sigmoid(logits) < 0.5
  return blocked.reshape(blocked.shape[0], blocked.shape[1], -1)


def unblock_full_rows(blocked: jax.Array) -> jax.Array:
  """Rows with every position blocked attend everywhere instead (the reference's rule)."""
  return blocked & ~jnp.all(blocked, axis=-1, keepdims=True)


class TransformerDecoder(nn.Module):
  """`MultiScaleMaskedTransformerDecoder` (and the MP-Former variant with `mask_pilot`).

  Attributes:
    num_classes: K, foreground classes.
    hidden_dim: query width.
    num_queries: matching (learnable) queries.
    num_heads: attention heads.
    ffn_dim: FFN width.
    num_layers: decoder layers (9 in the paper: 3 rounds over 3 levels).
    pre_norm: pre-norm layers instead of post-norm.
    mask_dim: channels of `mask_features`.
    enforce_input_proj: project level features even when widths match.
    query_pos_embed: learnable query positional embedding (Mask2Former: True; MP-Former: False).
    dtype: compute dtype.
  """

  num_classes: int
  hidden_dim: int = 256
  num_queries: int = 100
  num_heads: int = 8
  ffn_dim: int = 2048
  num_layers: int = 9
  pre_norm: bool = False
  mask_dim: int = 256
  enforce_input_proj: bool = False
  query_pos_embed: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    multi_scale_features: Sequence[jax.Array],
    mask_features: jax.Array,
    mask_pilot: MaskPilotInputs | None = None,
  ) -> dict[str, Any]:
    """Decodes queries into class and mask predictions.

    Args:
      multi_scale_features: level maps `[B, H_l, W_l, C]`, low to high resolution.
      mask_features: `[B, H4, W4, mask_dim]`.
      mask_pilot: the MP block (training only) or None.

    Returns:
      `{"pred_logits": [B, Q, K + 1], "pred_masks": [B, Q, H4, W4], "mask_embed": [B, Q, C],
      "aux_outputs": [...]}` for the matching queries (aux_outputs: one dict per earlier
      prediction, first from the initial queries), `"mask_features"` `[B, H4, W4, C]` (mask
      logits are `einsum("bqc,bhwc->bqhw", mask_embed, mask_features)`), and `"mask_pilot"` with
      the same structure for the MP queries when given.
    """
    num_levels = len(multi_scale_features)
    b = mask_features.shape[0]
    d = self.hidden_dim

    # Level features with level embedding, and their (constant) sine positional encodings.
    level_embed = nn.Embed(
      num_levels, d, embedding_init=layers.standard_normal, name="level_embed"
    ).embedding
    memories, memory_pos, sizes = [], [], []
    for lvl, x in enumerate(multi_scale_features):
      _, h, w, c = x.shape
      x = x.astype(self.dtype)
      if c != d or self.enforce_input_proj:
        x = Conv2D(
          d,
          1,
          dtype=self.dtype,
          kernel_init=layers.c2_xavier_fill,
          bias_init=nn.initializers.zeros,
          name=f"input_proj_{lvl}",
        )(x)
      memories.append(x.reshape(b, h * w, d) + level_embed[lvl].astype(self.dtype))
      pos = sine_position_encoding(h, w, d // 2).reshape(1, h * w, d)
      memory_pos.append(jnp.asarray(pos, self.dtype))
      sizes.append((h, w))

    queries = nn.Embed(
      self.num_queries, d, embedding_init=layers.standard_normal, name="query_feat"
    ).embedding
    x = layers.broadcast_to_batch(queries.astype(self.dtype), b)
    query_pos = None
    if self.query_pos_embed:
      query_pos = nn.Embed(
        self.num_queries, d, embedding_init=layers.standard_normal, name="query_embed"
      ).embedding.astype(self.dtype)
      # Over the batch once, not in each of the layers' additions (`broadcast_to_batch`).
      query_pos = layers.broadcast_to_batch(query_pos, b)

    num_mp = 0
    self_blocked = None
    if mask_pilot is not None:
      num_mp = mask_pilot.queries.shape[1]
      # MP queries first, matching queries last (the reference's layout).
      x = jnp.concatenate([mask_pilot.queries.astype(self.dtype), x], axis=1)
      if query_pos is not None:
        # The MP queries have no positional embedding (MP-Former drops it for all queries).
        query_pos = jnp.concatenate([jnp.zeros((b, num_mp, d), query_pos.dtype), query_pos], 1)
      self_blocked = mask_pilot.self_attn_mask
      if self_blocked.ndim == 3:
        self_blocked = self_blocked[:, None]  # broadcast over heads

    heads = PredictionHeads(self.num_classes, self.mask_dim, self.dtype, name="heads")
    mask_features = mask_features.astype(self.dtype)
    level_mask_features = [
      resize_bilinear(jax.lax.stop_gradient(mask_features), size) for size in sizes
    ]
    predictions = []

    def predict(x, layer_index):
      """Heads on `x`; returns the cross-attention mask for decoder layer `layer_index`."""
      logits, embed = heads(x)
      predictions.append((logits, embed))
      if layer_index >= self.num_layers:
        return None
      blocked = attention_blocked(embed, level_mask_features[layer_index % num_levels])
      if mask_pilot is not None and mask_pilot.attn_masks[layer_index] is not None:
        blocked = blocked.at[:, :num_mp].set(mask_pilot.attn_masks[layer_index])
      return blocked

    blocked = predict(x, 0)
    for i in range(self.num_layers):
      lvl = i % num_levels
      x = DecoderLayer(self.num_heads, self.ffn_dim, self.pre_norm, self.dtype, name=f"layer_{i}")(
        x,
        query_pos,
        memories[lvl],
        memory_pos[lvl],
        unblock_full_rows(blocked)[:, None],
        self_blocked,
      )
      blocked = predict(x, i + 1)

    # One product per prediction for its stride-4 masks [B, T, H4, W4], each written straight
    # into its own output. One stacked product split apart afterwards copies every mask once
    # more (forward and backward of the 10 masks: 650 -> 540 ms at 512 x 512, 149 -> 121 ms at
    # 256, R50 shapes, on a 2-core CPU). The training losses use the mask embeddings with
    # `mask_features` instead (cheaper at sampled points); the full masks are then never
    # computed.
    embeds = [embed for _, embed in predictions]
    masks = [mask_logits(embed, mask_features) for embed in embeds]
    logits = [lg for lg, _ in predictions]

    def pack(parts):
      """`parts[i]` = (logits, masks, embed) of prediction i -> the output dict."""
      outs = [{"pred_logits": lg, "pred_masks": mk, "mask_embed": em} for lg, mk, em in parts]
      return {**outs[-1], "aux_outputs": outs[:-1]}

    parts = list(zip(logits, masks, embeds, strict=True))
    if mask_pilot is None:
      result = pack(parts)
    else:
      mp_parts, match_parts = [], []
      for part in parts:
        # Each of (logits, masks, embed) splits along the query axis 1.
        halves = [jnp.split(t, [num_mp], axis=1) for t in part]
        mp_parts.append(tuple(h[0] for h in halves))
        match_parts.append(tuple(h[1] for h in halves))
      result = pack(match_parts)
      result["mask_pilot"] = pack(mp_parts)
    result["mask_features"] = mask_features
    return result
