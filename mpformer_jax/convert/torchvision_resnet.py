"""Converts torchvision-format and Hugging Face ResNet state dicts to `ResNet` variables.

Both return a variable tree rooted at the `ResNet` module,
`{"params": {"stem_conv": ..., "stage1_block0": ...}, "batch_stats": {...}}`; a caller that holds
the backbone under a submodule (e.g. `backbone`) nests it there.

Norm tensors go where the model keeps them:

* `norm="frozen_bn"`: `weight, bias, running_mean, running_var` -> `batch_stats/{scale, bias,
  mean, var}` (nothing trainable).
* `norm="bn"`: `weight, bias` -> `params/{scale, bias}`; `running_mean, running_var` ->
  `batch_stats/{mean, var}`.

`num_batches_tracked` is read (so never reported unused) and dropped. No torch import: the state
dicts hold numpy arrays (see `common.to_numpy_state_dict`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mpformer_jax.convert.common import ConversionError, StateDictReader
from mpformer_jax.models.norms import NORM_KINDS
from mpformer_jax.models.resnet import ResNet

NUM_STAGES = 4

# (0-based stage i, block j) -> the torch module prefix of that block, e.g. "layer2.0".
_BlockPrefix = Callable[[int, int], str]


def _read_norm(
  reader: StateDictReader, prefix: str, norm: str
) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray]]:
  """Reads one torch BatchNorm2d as `(params or None, batch_stats)` for our norm kind."""
  # Mark the step counter as read so callers need not list it as ignored; the model has no use
  # for it.
  if reader.has(f"{prefix}.num_batches_tracked"):
    reader.get(f"{prefix}.num_batches_tracked")
  mean = reader.get(f"{prefix}.running_mean")
  var = reader.get(f"{prefix}.running_var")
  affine = reader.norm(prefix)
  if norm == "frozen_bn":
    return None, {**affine, "mean": mean, "var": var}
  if norm == "bn":
    return affine, {"mean": mean, "var": var}
  raise ValueError(f"unknown norm kind {norm!r}; expected one of {NORM_KINDS}")


def _convert(
  reader: StateDictReader,
  *,
  stem_conv: str,
  stem_norm: str,
  block: _BlockPrefix,
  conv: Callable[[int], str],
  norm_name: Callable[[int], str],
  shortcut_conv: str,
  shortcut_norm: str,
  depths: Sequence[int],
  norm: str,
) -> dict[str, Any]:
  """Layout-independent core: walks our module tree and reads each tensor by its torch name.

  Args:
    reader: the state-dict reader (records used / missing keys).
    stem_conv, stem_norm: full torch prefixes of the stem conv and its norm.
    block: maps (0-based stage, block) to the block's torch prefix.
    conv, norm_name: map the 1-based conv index within a bottleneck (1, 2, 3) to the suffix of
      the conv / norm module under the block prefix.
    shortcut_conv, shortcut_norm: suffixes of the projection shortcut under the block prefix.
    depths: blocks per stage.
    norm: our norm kind.

  Returns:
    `{"params": ..., "batch_stats": ...}` rooted at the `ResNet` module (missing tensors are
    `None`; `reader.finish` reports them).
  """
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}

  def put_norm(path: tuple[str, ...], prefix: str):
    p, s = _read_norm(reader, prefix, norm)
    for tree, value in ((params, p), (stats, s)):
      if value is None:
        continue
      node = tree
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = value

  params["stem_conv"] = reader.conv(stem_conv, bias=False)
  put_norm(("stem_norm",), stem_norm)
  for i, depth in enumerate(depths):
    for j in range(depth):
      name = f"stage{i + 1}_block{j}"
      prefix = block(i, j)
      block_params = params.setdefault(name, {})
      for k in (1, 2, 3):
        block_params[f"conv{k}"] = reader.conv(f"{prefix}.{conv(k)}", bias=False)
        put_norm((name, f"norm{k}"), f"{prefix}.{norm_name(k)}")
      # Our model projects the shortcut exactly when stride or channels change: always for the
      # first block of stages 2-4 (stride 2); for stage 1 only when stem width != 4 * width,
      # which the checkpoint tells us by having the tensor. A projection in a later block is
      # not representable and stays in the unused-key report.
      if j == 0 and (i > 0 or reader.has(f"{prefix}.{shortcut_conv}.weight")):
        block_params["shortcut_conv"] = reader.conv(f"{prefix}.{shortcut_conv}", bias=False)
        put_norm((name, "shortcut_norm"), f"{prefix}.{shortcut_norm}")
  return {"params": params, "batch_stats": stats}


def _count_blocks(reader: StateDictReader, key: Callable[[int, int], str]) -> tuple[int, ...]:
  """Infers depths: the number of consecutive blocks j whose `key(i, j)` exists, per stage."""
  depths = []
  for i in range(NUM_STAGES):
    j = 0
    while reader.has(key(i, j)):
      j += 1
    depths.append(j)
  return tuple(depths)


def resnet_variable_shapes(
  depths: Sequence[int], stem_width: int, width: int, norm: str
) -> dict[str, Any]:
  """The `ResNet` variable tree as `jax.ShapeDtypeStruct`s (no computation, no memory)."""
  model = ResNet(depths=tuple(depths), stem_width=stem_width, width=width, norm=norm)
  # Variable shapes do not depend on the image size; 64x64 keeps tracing cheap.
  dummy = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), dummy)


def convert_torchvision_resnet(
  state_dict: Mapping[str, Any],
  depths: Sequence[int] | None = None,
  norm: str = "frozen_bn",
) -> dict[str, Any]:
  """Converts a torchvision `ResNet` (bottleneck) state dict to `ResNet` variables.

  Keys: `conv1.weight`, `bn1.*`, `layer{1-4}.{j}.conv{1,2,3}.weight`, `layer{i}.{j}.bn{1,2,3}.*`,
  `layer{i}.{j}.downsample.{0,1}.*`. `fc.*` is accepted and ignored. detectron2's R-50.pkl
  (torchvision weights converted by detectron2's `convert-torchvision-to-d2.py`) uses other names;
  convert it to torchvision names first.

  Args:
    state_dict: parameter name -> numpy array (torch `[out, in, kh, kw]` conv layout).
    depths: blocks per stage; inferred from the keys when `None`.
    norm: the target model's norm kind, `"frozen_bn"` or `"bn"`.

  Returns:
    `{"params": ..., "batch_stats": ...}` for `ResNet(depths, stem_width, width, norm)`, with
    `stem_width` and `width` read from the `conv1` and `layer1.0.conv1` weights; float32 numpy.

  Raises:
    ConversionError: listing every missing, unused and mis-shaped tensor at once.
  """
  if norm not in NORM_KINDS:
    raise ValueError(f"unknown norm kind {norm!r}; expected one of {NORM_KINDS}")
  reader = StateDictReader(state_dict, ignored=("fc.weight", "fc.bias"))

  def block(i: int, j: int) -> str:
    return f"layer{i + 1}.{j}"

  if depths is None:
    depths = _count_blocks(reader, lambda i, j: f"{block(i, j)}.conv1.weight")
    if 0 in depths:
      raise ConversionError(
        f"cannot infer the depths from the state dict (blocks found per stage: {depths}); "
        "pass depths="
      )
  # Widths come from the checkpoint; if a tensor is absent fall back to ResNet-50's so that
  # `finish` can still report everything that is wrong in one error.
  stem_width = np.shape(state_dict["conv1.weight"])[0] if "conv1.weight" in state_dict else 64
  key = "layer1.0.conv1.weight"
  width = np.shape(state_dict[key])[0] if key in state_dict else 64

  variables = _convert(
    reader,
    stem_conv="conv1",
    stem_norm="bn1",
    block=block,
    conv=lambda k: f"conv{k}",
    norm_name=lambda k: f"bn{k}",
    shortcut_conv="downsample.0",
    shortcut_norm="downsample.1",
    depths=depths,
    norm=norm,
  )
  expected = resnet_variable_shapes(depths, stem_width, width, norm)
  return reader.finish(variables, expected)


def convert_hf_resnet(
  reader: StateDictReader,
  prefix: str,
  depths: Sequence[int] | None,
  norm: str,
) -> dict[str, Any]:
  """Reads a Hugging Face transformers `ResNetBackbone` / `ResNetModel` (bottleneck) from a reader.

  Keys under `prefix` (e.g. `"model.pixel_level_module.encoder."`, or `""` for a bare backbone):
  `embedder.embedder.{convolution,normalization}.*`,
  `encoder.stages.{i}.layers.{j}.layer.{0,1,2}.{convolution,normalization}.*` and
  `encoder.stages.{i}.layers.{j}.shortcut.{convolution,normalization}.*`. The HF config must use
  `layer_type="bottleneck"`, `downsample_in_bottleneck=False` (stride in the 3x3, as here) and
  `downsample_in_first_stage=False`.

  This does not call `reader.finish`: the reader is shared with the rest of a model's conversion,
  and the caller finishes once against the full model's variables.

  Args:
    reader: a `StateDictReader` over the whole checkpoint.
    prefix: prepended to every key, including its trailing ".".
    depths: blocks per stage; inferred from the keys when `None`.
    norm: the target model's norm kind, `"frozen_bn"` or `"bn"`.

  Returns:
    `{"params": ..., "batch_stats": ...}` rooted at the `ResNet` module (missing tensors are
    `None` and recorded in the reader).
  """
  if norm not in NORM_KINDS:
    raise ValueError(f"unknown norm kind {norm!r}; expected one of {NORM_KINDS}")

  def block(i: int, j: int) -> str:
    return f"{prefix}encoder.stages.{i}.layers.{j}"

  if depths is None:
    depths = _count_blocks(reader, lambda i, j: f"{block(i, j)}.layer.0.convolution.weight")
    if 0 in depths:
      raise ConversionError(
        f"cannot infer the depths under {prefix!r} (blocks found per stage: {depths}); pass depths"
      )
  return _convert(
    reader,
    stem_conv=f"{prefix}embedder.embedder.convolution",
    stem_norm=f"{prefix}embedder.embedder.normalization",
    block=block,
    conv=lambda k: f"layer.{k - 1}.convolution",
    norm_name=lambda k: f"layer.{k - 1}.normalization",
    shortcut_conv="shortcut.convolution",
    shortcut_norm="shortcut.normalization",
    depths=depths,
    norm=norm,
  )


__all__ = [
  "ConversionError",
  "convert_hf_resnet",
  "convert_torchvision_resnet",
  "resnet_variable_shapes",
]
