"""Helpers shared by the PyTorch -> Flax converters.

PyTorch stores `Linear` weights as `[out, in]` and `Conv2d` weights as `[out, in, kh, kw]`;
Flax uses `[in, out]` and `[kh, kw, in, out]`. A `StateDictReader` converts layouts and records
which keys were read, so that a converter can finish with one error that lists every missing,
unused and mis-shaped tensor instead of failing on the first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


class ConversionError(ValueError):
  """A checkpoint does not fit the model: lists every problem found."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(_flatten(value, path))
    else:
      flat[path] = value
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


class StateDictReader:
  """Reads tensors from a PyTorch-style state dict and records which keys were used.

  Args:
    state_dict: mapping from parameter name to an array-like (numpy array, or anything
      `np.asarray` accepts). torch tensors must be converted by the caller; no torch is needed.
    ignored: names (exact) or suffixes starting with "." that are expected extras and never
      reported as unused (e.g. ".num_batches_tracked").
  """

  def __init__(self, state_dict: Mapping[str, Any], ignored: Iterable[str] = ()):
    self._sd = dict(state_dict)
    self._used: set[str] = set()
    self._missing: list[str] = []
    self._ignored = tuple(ignored)

  def has(self, key: str) -> bool:
    return key in self._sd

  def get(self, key: str) -> np.ndarray:
    """Returns one tensor as float32 numpy (or records it as missing and returns None)."""
    if key not in self._sd:
      self._missing.append(key)
      return None
    self._used.add(key)
    value = np.asarray(self._sd[key])
    if np.issubdtype(value.dtype, np.floating):
      value = value.astype(np.float32)
    return value

  def linear(self, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
    """`nn.Linear` -> flax `Dense` params."""
    out = {"kernel": _t(self.get(f"{prefix}.weight"))}
    if bias:
      out["bias"] = self.get(f"{prefix}.bias")
    return out

  def conv(self, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
    """`nn.Conv2d` -> flax `Conv` params (`[out, in, kh, kw]` -> `[kh, kw, in, out]`)."""
    w = self.get(f"{prefix}.weight")
    out = {"kernel": None if w is None else np.transpose(w, (2, 3, 1, 0))}
    if bias:
      out["bias"] = self.get(f"{prefix}.bias")
    return out

  def norm(self, prefix: str) -> dict[str, np.ndarray]:
    """Affine of `nn.LayerNorm` / `nn.GroupNorm` / BatchNorm -> flax `scale`, `bias`."""
    return {"scale": self.get(f"{prefix}.weight"), "bias": self.get(f"{prefix}.bias")}

  def embedding(self, key: str) -> dict[str, np.ndarray]:
    """`nn.Embedding.weight` -> flax `Embed` params."""
    return {"embedding": self.get(key)}

  def unused_keys(self) -> list[str]:
    unused = []
    for key in self._sd:
      if key in self._used:
        continue
      if any(key == s or (s.startswith(".") and key.endswith(s)) for s in self._ignored):
        continue
      unused.append(key)
    return sorted(unused)

  def missing_keys(self) -> list[str]:
    return list(self._missing)

  def finish(self, variables: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, Any]:
    """Checks the converted variables against the model's and raises one error listing problems.

    Args:
      variables: the converted variable tree (`{"params": ..., "batch_stats": ...}`).
      expected: the model's variable tree (arrays or `jax.ShapeDtypeStruct`s), e.g. from
        `jax.eval_shape(model.init, ...)`.

    Returns:
      `variables` with every leaf as a float32 (or original integer) numpy array.

    Raises:
      ConversionError: with the missing state-dict keys, unused state-dict keys, model variables
        the converter did not produce, converted variables the model does not have, and shape
        mismatches, each listed in full.
    """
    got = _flatten(variables)
    want = _flatten(expected)
    problems = []
    if self._missing:
      problems.append("missing in the state dict:\n  " + "\n  ".join(self._missing))
    unused = self.unused_keys()
    if unused:
      problems.append("unused state-dict keys:\n  " + "\n  ".join(unused))
    not_made = sorted(set(want) - set(got))
    if not_made:
      problems.append("model variables not produced by the converter:\n  " + "\n  ".join(not_made))
    extra = sorted(set(got) - set(want))
    if extra:
      problems.append("converted variables the model does not have:\n  " + "\n  ".join(extra))
    shapes = [
      f"{k}: checkpoint {tuple(np.shape(got[k]))} vs model {tuple(want[k].shape)}"
      for k in sorted(set(got) & set(want))
      if got[k] is not None and tuple(np.shape(got[k])) != tuple(want[k].shape)
    ]
    if shapes:
      problems.append("shape mismatches:\n  " + "\n  ".join(shapes))
    if problems:
      raise ConversionError("checkpoint does not fit the model:\n" + "\n".join(problems))
    return _unflatten({k: np.asarray(v) for k, v in got.items()})


def _t(w: np.ndarray | None) -> np.ndarray | None:
  return None if w is None else np.ascontiguousarray(w.T)


def to_numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Converts torch tensors (or anything with `.numpy()`) to numpy without importing torch."""
  out = {}
  for key, value in state_dict.items():
    if hasattr(value, "detach"):
      value = value.detach().cpu().numpy()
    out[key] = np.asarray(value)
  return out
