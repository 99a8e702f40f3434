"""MP-Former's mask-pilot (MP) block: noised GT labels as queries, GT masks as attention masks.

During training MP-Former prepends `groups * max_gt` extra queries to the decoder (spec
section 1). Slot `g * max_gt + j` of image `b` carries GT segment `j` of `b`: its content is the
label embedding of the (possibly flipped) class, its cross-attention mask in every decoder layer
is the GT mask area-pooled to that layer's level (optionally with point noise), and the model is
trained to reconstruct the clean class and mask there. At inference the block does not exist.

Fixed shapes: the reference sizes the block by the largest GT count of its per-GPU batch,
`max_num`; we size it by `max_gt` and neutralise the slots the reference does not have. With
`max_num` taken over groups of `group_size` consecutive images (the reference's images per GPU),
slots `j < max_num` behave exactly like the reference's (zero content for images with fewer
segments, visible to their group, trained as "no object" in the class loss) and slots
`j >= max_num` are invisible to every other query, so they change nothing.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mpformer_jax.models import layers
from mpformer_jax.models.transformer_decoder import MaskPilotInputs
from mpformer_jax.ops import rng as rng_lib
from mpformer_jax.targets import Targets, area_pooled_masks

Dtype = Any


def group_max_count(valid: jax.Array, group_size: int) -> jax.Array:
  """The reference's `max_num`: most GT segments of an image, per group of images.

  Args:
    valid: bool `[B, M]`.
    group_size: images per group (the reference's images per GPU); must divide B.

  Returns:
    int32 `[B]`: for each image, the largest count in its group.
  """
  b = valid.shape[0]
  if b % group_size:
    raise ValueError(f"batch size {b} is not a multiple of the group size {group_size}")
  counts = valid.sum(-1).astype(jnp.int32).reshape(b // group_size, group_size)
  return jnp.repeat(counts.max(-1), group_size)


def self_attention_mask(
  groups: int, max_gt: int, num_queries: int, slot_used: jax.Array
) -> jax.Array:
  """Self-attention block mask over `[MP queries; matching queries]` (True = blocked).

  Matching queries never see MP queries; MP queries of one group do not see other groups; MP
  queries see every matching query and the used slots of their own group. Slots the reference
  does not have (`j >= max_num` of the image's group) are invisible to everyone.

  Args:
    groups: number of MP groups G.
    max_gt: slots per group M.
    num_queries: matching queries Q.
    slot_used: bool `[B, M]`, whether slot j exists in the reference for image b.

  Returns:
    bool `[B, G*M + Q, G*M + Q]`.
  """
  n_mp = groups * max_gt
  group_of = np.repeat(np.arange(groups), max_gt)
  static = np.zeros((n_mp + num_queries, n_mp + num_queries), bool)
  static[n_mp:, :n_mp] = True  # matching rows never see MP columns
  static[:n_mp, :n_mp] = group_of[:, None] != group_of[None, :]  # other groups
  b = slot_used.shape[0]
  hidden_columns = jnp.concatenate(
    [jnp.tile(~slot_used, (1, groups)), jnp.zeros((b, num_queries), bool)], axis=1
  )
  return jnp.asarray(static)[None] | hidden_columns[:, None, :]


def point_noise(keys: jax.Array, blocked: jax.Array, noise_scale: float) -> jax.Array:
  """MP-Former's point noise: flip every cell with probability `noise_scale * A / HW`.

  `A` is the number of attendable cells of the mask, so `noise_scale * A` cells flip on average,
  anywhere in the map (spec section 1.4).

  Args:
    keys: one PRNG key per mask, `[B, N]` (see `ops.rng.slot_keys`).
    blocked: bool `[B, N, HW]`, True = blocked.
    noise_scale: the reference's `NOISE_SCALE`.

  Returns:
    bool `[B, N, HW]`.
  """
  hw = blocked.shape[-1]
  attendable = jnp.sum(~blocked, axis=-1, keepdims=True).astype(jnp.float32)
  p = attendable * noise_scale / hw
  return blocked ^ (rng_lib.slot_uniform(keys, (hw,)) < p)


class MaskPilot(nn.Module):
  """Builds the `MaskPilotInputs` of a batch from its ground truth.

  Attributes:
    num_classes: K (the label embedding has K rows; no "no object" row).
    hidden_dim: query width.
    num_queries: matching queries Q (for the self-attention mask).
    num_layers: decoder layers.
    groups: MP groups G (the reference's `NUM_DN`; released setting 1).
    label_noise_ratio: probability of replacing a label by a uniform random class (released 0.2).
    noise_scale: point-noise scale of the GT masks (released 0.0).
    all_layers: GT masks in every layer (released) or in layers 0..3 only.
    group_size: images per reference GPU, over which the reference's `max_num` is taken.
    dtype: compute dtype of the queries.
  """

  num_classes: int
  hidden_dim: int
  num_queries: int
  num_layers: int = 9
  groups: int = 1
  label_noise_ratio: float = 0.2
  noise_scale: float = 0.0
  all_layers: bool = True
  group_size: int = 4
  dtype: Dtype = jnp.float32

  def setup(self):
    # nn.Embedding(num_classes, hidden_dim) in the reference: N(0, 1), no "no object" row.
    self.label_enc = nn.Embed(
      self.num_classes, self.hidden_dim, embedding_init=layers.standard_normal
    )

  def create_params(self) -> None:
    """Creates the parameters during `init` when no targets are given."""
    self.label_enc.embedding  # noqa: B018

  def __call__(self, targets: Targets, level_sizes: tuple[tuple[int, int], ...]) -> MaskPilotInputs:
    """Prepares the MP block.

    Uses the `label_noise` RNG stream for label flips and `mask_noise` for point noise.

    Args:
      targets: the batch's ground truth (`max_gt` slots per image).
      level_sizes: `(h, w)` of the decoder's levels, low to high resolution; layer `i` attends
        to level `i % len(level_sizes)`.

    Returns:
      The `MaskPilotInputs` for `TransformerDecoder`.
    """
    b, m = targets.labels.shape
    g = self.groups

    # Query content: label embeddings of (noised) labels, zeros for empty slots. [B, G*M, D]
    labels = jnp.tile(jnp.clip(targets.labels, 0, self.num_classes - 1), (1, g))
    if self.label_noise_ratio > 0:
      # Per-slot keys: a segment's draw does not depend on how far the batch is padded.
      rng = self.make_rng("label_noise")
      flip_keys = rng_lib.slot_keys(jax.random.fold_in(rng, 0), b, g, m)
      class_keys = rng_lib.slot_keys(jax.random.fold_in(rng, 1), b, g, m)
      flip = rng_lib.slot_uniform(flip_keys, ()) < self.label_noise_ratio
      labels = jnp.where(flip, rng_lib.slot_randint(class_keys, 0, self.num_classes), labels)
    valid = jnp.tile(targets.valid, (1, g))
    queries = jnp.where(valid[..., None], self.label_enc(labels), 0.0).astype(self.dtype)

    # Slots the reference would have: j < max_num of the image's group.
    max_num = group_max_count(targets.valid, self.group_size)  # [B]
    slot_used = jnp.arange(m)[None, :] < max_num[:, None]  # [B, M]
    self_mask = self_attention_mask(g, m, self.num_queries, slot_used)

    # GT attention masks per level (True = blocked), flattened: [B, G*M, h*w].
    pooled = area_pooled_masks(targets, tuple(level_sizes))
    level_blocked = [jnp.tile(~p.reshape(b, m, -1), (1, g, 1)) for p in pooled]
    gt_layers = self.num_layers if self.all_layers else min(4, self.num_layers)
    attn_masks = []
    for i in range(self.num_layers):
      if i >= gt_layers:
        attn_masks.append(None)  # the MP queries use their own predicted masks
        continue
      blocked = level_blocked[i % len(level_sizes)]
      if self.noise_scale > 0:
        # Fresh noise for every layer and group (groups are separate rows), keyed per slot.
        keys = rng_lib.slot_keys(jax.random.fold_in(self.make_rng("mask_noise"), i), b, g, m)
        blocked = point_noise(keys, blocked, self.noise_scale)
      attn_masks.append(blocked)
    return MaskPilotInputs(queries=queries, attn_masks=tuple(attn_masks), self_attn_mask=self_mask)
