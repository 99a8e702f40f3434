"""Writes and reads converted weights: an Orbax checkpoint plus the matching model config."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"


def save_converted(
  output_dir: str | os.PathLike,
  config: ml_collections.ConfigDict | None,
  variables: dict[str, Any],
  metadata: dict[str, Any] | None = None,
) -> str:
  """Saves `variables` as an Orbax checkpoint under `output_dir/variables`.

  Args:
    output_dir: directory to create (must not already hold a checkpoint).
    config: the model config to store beside the weights (None for a bare backbone).
    variables: the converted variable tree (numpy or jax arrays).
    metadata: extra JSON-serialisable facts (source file, class names, ...).

  Returns:
    The absolute output directory.
  """
  import orbax.checkpoint as ocp

  output_dir = os.path.abspath(os.fspath(output_dir))
  os.makedirs(output_dir, exist_ok=True)
  target = os.path.join(output_dir, VARIABLES_DIR)
  if os.path.exists(target):
    raise FileExistsError(f"{target} already exists; choose a new --output directory")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(target, variables)
    checkpointer.wait_until_finished()
  doc = {"model": None if config is None else json.loads(config.to_json())}
  doc["metadata"] = metadata or {}
  with open(os.path.join(output_dir, CONFIG_FILE), "w") as f:
    json.dump(doc, f, indent=2, sort_keys=True)
  return output_dir


def load_converted(
  output_dir: str | os.PathLike,
) -> tuple[ml_collections.ConfigDict | None, dict[str, Any], dict[str, Any]]:
  """Reads what `save_converted` wrote: `(model_config, variables, metadata)`."""
  import orbax.checkpoint as ocp

  output_dir = os.path.abspath(os.fspath(output_dir))
  config_path = os.path.join(output_dir, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: not a converted checkpoint directory")
  with open(config_path) as f:
    doc = json.load(f)
  config = None if doc["model"] is None else ml_collections.ConfigDict(_tuples(doc["model"]))
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(os.path.join(output_dir, VARIABLES_DIR))
  return config, variables, doc.get("metadata", {})


def _tuples(tree: Any) -> Any:
  """JSON turns tuples into lists; the model config uses tuples for static shapes."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(v) for v in tree)
  return tree
