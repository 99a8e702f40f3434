"""Hugging Face `SwinBackbone` weights -> `mpformer_jax.models.swin.SwinTransformer` params.

Two state-dict layouts are accepted, detected from the keys under `prefix`:

* the checkpoint layout of the Hub files (`facebook/mask2former-swin-*`, `microsoft/swin-*`,
  and what transformers' `save_pretrained` writes):
    embeddings.patch_embeddings.projection.{weight,bias}, embeddings.norm.*
    encoder.layers.{i}.blocks.{j}.layernorm_before.*, .layernorm_after.*
    encoder.layers.{i}.blocks.{j}.attention.self.{query,key,value}.*
    encoder.layers.{i}.blocks.{j}.attention.self.relative_position_bias_table
    encoder.layers.{i}.blocks.{j}.attention.output.dense.*
    encoder.layers.{i}.blocks.{j}.intermediate.dense.*, .output.dense.*
    encoder.layers.{i}.downsample.{reduction.weight,norm.*}
    hidden_states_norms.stage{i+1}.*
* the in-memory layout of transformers >= 5 (`SwinBackbone(...).state_dict()`): the same under
  `swin.`, with `attention.{q,k,v,o}_proj`,
  `attention.relative_position_bias.relative_position_bias_table` and `mlp.{fc1,fc2}`
  (`hidden_states_norms.*` stays at the top).

Expected extras are consumed silently: the `relative_position_index` buffers (older checkpoints
store them; they are recomputed from the window size) and the final `layernorm.*` /
`swin.layernorm.*` of HF's `SwinModel`, which the backbone never applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mpformer_jax.convert.common import StateDictReader


def _names(reader: StateDictReader, prefix: str) -> dict[str, str]:
  """Key fragments of the layout found under `prefix`."""
  if reader.has(f"{prefix}swin.embeddings.patch_embeddings.projection.weight"):
    return {
      "root": f"{prefix}swin.",
      "q": "attention.q_proj",
      "k": "attention.k_proj",
      "v": "attention.v_proj",
      "o": "attention.o_proj",
      "table": "attention.relative_position_bias.relative_position_bias_table",
      "index": "attention.relative_position_bias.relative_position_index",
      "fc1": "mlp.fc1",
      "fc2": "mlp.fc2",
    }
  return {
    "root": prefix,
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "table": "attention.self.relative_position_bias_table",
    "index": "attention.self.relative_position_index",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
  }


def _fuse(parts: list[np.ndarray | None], axis: int) -> np.ndarray | None:
  """Concatenates q/k/v pieces into the fused qkv layout (q | k | v along `axis`).

  Returns None when a piece is missing (the reader has already recorded it). Pieces of unequal
  shape cannot be fused; a `(0,)` placeholder is returned so that `StateDictReader.finish`
  reports the fused variable as mis-shaped instead of this function raising on its own.
  """
  if any(p is None for p in parts):
    return None
  if len({p.shape for p in parts}) != 1:
    return np.zeros((0,), np.float32)
  return np.concatenate(parts, axis=axis)


def _consume_if_present(reader: StateDictReader, key: str) -> None:
  if reader.has(key):
    reader.get(key)


def convert_hf_swin(reader: StateDictReader, prefix: str, depths: Sequence[int]) -> dict[str, Any]:
  """Reads a Hugging Face Swin backbone into the `SwinTransformer` variable tree.

  Only reads: the caller checks the result (and every other key of its checkpoint) with
  `reader.finish(variables, expected)`, nesting the returned params under its own module name.

  Args:
    reader: a reader over the (numpy) state dict.
    prefix: key prefix of the backbone, e.g. `"model.pixel_level_module.encoder."` in a
      Mask2Former checkpoint or `""` for a bare `SwinBackbone`.
    depths: blocks per stage of the model (the checkpoint does not store them).

  Returns:
    `{"params": ...}` rooted at the `SwinTransformer` module. Missing keys yield None leaves,
    which `finish` reports.
  """
  n = _names(reader, prefix)
  root = n["root"]
  params: dict[str, Any] = {
    "patch_embed": {
      "proj": reader.conv(f"{root}embeddings.patch_embeddings.projection"),
      "norm": reader.norm(f"{root}embeddings.norm"),
    }
  }
  for i, depth in enumerate(depths):
    stage: dict[str, Any] = {}
    for j in range(depth):
      b = f"{root}encoder.layers.{i}.blocks.{j}."
      # SwinConfig(qkv_bias=False) stores no q/k/v biases; then none are produced, and `finish`
      # reports it if the model does have them.
      qkv_bias = any(reader.has(f"{b}{n[x]}.bias") for x in ("q", "k", "v"))
      q, k, v = (reader.linear(b + n[x], bias=qkv_bias) for x in ("q", "k", "v"))
      # Flax kernels are [in, out]: the fused output axis is the last one.
      qkv = {"kernel": _fuse([q["kernel"], k["kernel"], v["kernel"]], axis=1)}
      if qkv_bias:
        qkv["bias"] = _fuse([q["bias"], k["bias"], v["bias"]], axis=0)
      stage[f"blocks_{j}"] = {
        "norm1": reader.norm(b + "layernorm_before"),
        "attn": {
          "qkv": qkv,
          "relative_position_bias_table": reader.get(b + n["table"]),
          "proj": reader.linear(b + n["o"]),
        },
        "norm2": reader.norm(b + "layernorm_after"),
        "mlp": {"fc1": reader.linear(b + n["fc1"]), "fc2": reader.linear(b + n["fc2"])},
      }
      _consume_if_present(reader, b + n["index"])
    if i < len(depths) - 1:
      d = f"{root}encoder.layers.{i}.downsample"
      stage["downsample"] = {
        "norm": reader.norm(f"{d}.norm"),
        "reduction": reader.linear(f"{d}.reduction", bias=False),
      }
    params[f"layers_{i}"] = stage
    params[f"norm{i}"] = reader.norm(f"{prefix}hidden_states_norms.stage{i + 1}")
  # transformers' save_pretrained writes the unused final norm as `swin.layernorm.*` even in the
  # checkpoint layout; other exports may have it without the `swin.`.
  for key in ("layernorm", "swin.layernorm"):
    for suffix in ("weight", "bias"):
      _consume_if_present(reader, f"{prefix}{key}.{suffix}")
  return {"params": params}
