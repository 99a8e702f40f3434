"""Small building blocks shared by the pixel decoder and the transformer decoder.

The initialisers reproduce PyTorch's so that a model trained from scratch starts where the
reference starts (spec section 2): default `nn.Linear` init, `xavier_uniform_`, detectron2's
`c2_xavier_fill`, and `nn.MultiheadAttention`'s xavier bound over its fused `[3D, D]` input
projection.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# xavier_uniform_ on a [out, in] weight: U(-a, a), a = sqrt(6 / (fan_in + fan_out)).
xavier_uniform = nn.initializers.xavier_uniform()
# nn.MultiheadAttention applies xavier_uniform_ to its fused [3D, D] in_proj_weight, so each of the
# q/k/v [D, D] blocks has the bound sqrt(6 / (D + 3D)) = sqrt(3 * 0.5 / D).
fused_qkv_xavier_uniform = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")
# PyTorch's default nn.Linear weight init (kaiming_uniform_ a=sqrt(5)): U(-1/sqrt(fan_in), ...).
torch_linear_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# detectron2 c2_xavier_fill (kaiming_uniform_ a=1): U(-sqrt(3 / fan_in), sqrt(3 / fan_in)).
c2_xavier_fill = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
# nn.Embedding and the pixel decoder's level_embed: N(0, 1).
standard_normal = nn.initializers.normal(stddev=1.0)


def broadcast_to_batch(x: jax.Array, batch: int) -> jax.Array:
  """`x` `[...]` repeated along a new leading axis: `[batch, ...]`.

  The value of `jnp.broadcast_to(x[None], (batch, *x.shape))`. Its gradient, the sum over the
  batch, is written as explicit additions of the batch's slices (for batches up to 16):
  XLA:CPU reduces a small leading axis into a large output very slowly (summing
  `[2, 5376, 256]` over axis 0: 23 ms, against 0.4 ms for `g[0] + g[1]`; the pixel decoder's
  positional embedding is broadcast like this in each of its 6 layers).

  Args:
    x: any array, typically a learned or fixed embedding `[S, D]`.
    batch: size of the new leading axis.

  Returns:
    `[batch, *x.shape]`.
  """
  return _broadcast_to_batch(x, batch)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _broadcast_to_batch(x, batch: int):
  return jnp.broadcast_to(x[None], (batch, *x.shape))


def _broadcast_to_batch_fwd(x, batch):
  return _broadcast_to_batch(x, batch), None


def _broadcast_to_batch_bwd(batch, _, g):
  if batch > 16:
    return (jnp.sum(g, axis=0),)
  parts = [g[i] for i in range(batch)]
  while len(parts) > 1:  # a balanced tree of additions
    pairs = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
    parts = pairs + parts[len(pairs) * 2 :]
  return (parts[0],)


_broadcast_to_batch.defvjp(_broadcast_to_batch_fwd, _broadcast_to_batch_bwd)


def torch_linear_bias(fan_in: int):
  """PyTorch's default nn.Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / fan_in**0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_dense(
  features: int, in_features: int, dtype: Dtype, name: str | None = None, kernel_init=None
) -> nn.Dense:
  """A Dense layer with PyTorch's default Linear init (or another kernel init, torch bias)."""
  return nn.Dense(
    features,
    dtype=dtype,
    kernel_init=kernel_init or torch_linear_kernel,
    bias_init=torch_linear_bias(in_features),
    name=name,
  )


class MLP(nn.Module):
  """`num_layers` Dense layers with ReLU between them (Mask2Former's mask-embedding MLP).

  Attributes:
    hidden_dim: width of the hidden layers.
    output_dim: width of the last layer.
    num_layers: number of Dense layers.
    dtype: compute dtype.
  """

  hidden_dim: int
  output_dim: int
  num_layers: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_dim = x.shape[-1]
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      out_dim = self.output_dim if last else self.hidden_dim
      x = torch_dense(out_dim, in_dim, self.dtype, name=f"layers_{i}")(x)
      if not last:
        x = nn.relu(x)
      in_dim = out_dim
    return x


class MultiHeadAttention(nn.Module):
  """Multi-head attention with `nn.MultiheadAttention` semantics and a boolean block mask.

  Query and key carry their positional embeddings; the value does not (DETR convention). Masked
  positions get probability exactly 0, as PyTorch's `-inf` does; callers make sure no row is fully
  blocked (Mask2Former unblocks such rows).

  Attributes:
    num_heads: attention heads.
    dtype: compute dtype; softmax runs in float32.
  """

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    blocked: jax.Array | None = None,
  ) -> jax.Array:
    """Attends `query` to `key`/`value`.

    Args:
      query: `[B, T, D]` (positional embedding already added).
      key: `[B, S, D]` (positional embedding already added).
      value: `[B, S, D]`.
      blocked: optional bool, True where attention is not allowed, broadcastable to
        `[B, heads, T, S]` (e.g. `[B, 1, T, S]` or `[T, S]`).

    Returns:
      `[B, T, D]`.
    """
    d = query.shape[-1]
    head_dim = d // self.num_heads
    dense = lambda name, init: nn.DenseGeneral(
      (self.num_heads, head_dim),
      dtype=self.dtype,
      kernel_init=init,
      bias_init=nn.initializers.zeros,
      name=name,
    )
    q = dense("query", fused_qkv_xavier_uniform)(query)  # [B, T, H, hd]
    k = dense("key", fused_qkv_xavier_uniform)(key)  # [B, S, H, hd]
    v = dense("value", fused_qkv_xavier_uniform)(value)  # [B, S, H, hd]
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    if blocked is not None:
      logits = jnp.where(blocked, jnp.finfo(jnp.float32).min, logits)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhts,bshd->bthd", probs, v)
    return nn.DenseGeneral(
      d,
      axis=(-2, -1),
      dtype=self.dtype,
      kernel_init=_reshaped_xavier(self.num_heads, head_dim),
      bias_init=nn.initializers.zeros,
      name="out",
    )(out)


def _reshaped_xavier(num_heads: int, head_dim: int):
  """xavier_uniform_ of a `[D, D]` out-projection, stored as `[heads, head_dim, D]`."""

  def init(key, shape, dtype=jnp.float32):
    d_in = num_heads * head_dim
    w = xavier_uniform(key, (d_in, shape[-1]), dtype)
    return w.reshape(shape)

  return init
