"""CPU benchmark: our XLA multi-scale deformable attention vs the PyTorch reference.

Shape: the Mask2Former pixel decoder on a 512x512 image (strides 32, 16, 8 -> levels 16x16,
32x32, 64x64), so Q = S = 5376, batch 2, 8 heads of 32 channels, 4 points per level.

Usage:
  .venv/bin/python experiments/bench_msda_cpu.py [--runs 7] [--alternatives]

Prints one JSON object with the median (and min) milliseconds of the forward and of
forward+backward (gradients w.r.t. value, sampling_locations and attention_weights) for
ours and for torch (`ms_deform_attn_core_pytorch`, torch.set_num_threads(2)), and the ratios
ours / torch. `--alternatives` also times rejected XLA formulations (see `_alternative`) to
document the choice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpformer_jax import host_memory  # noqa: E402
from mpformer_jax.ops import msda as msda_lib  # noqa: E402

SPATIAL_SHAPES = ((16, 16), (32, 32), (64, 64))
BATCH, HEADS, CHANNELS, POINTS = 2, 8, 32, 4


def _time_ms(fn, runs: int) -> dict[str, float]:
  fn()
  fn()  # Warm-up: compilation and allocator.
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(1e3 * (time.perf_counter() - start))
  return {"median": round(float(np.median(times)), 1), "min": round(float(np.min(times)), 1)}


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  length = sum(h * w for h, w in SPATIAL_SHAPES)
  levels = len(SPATIAL_SHAPES)
  value = rng.standard_normal((BATCH, length, HEADS, CHANNELS)).astype(np.float32)
  # Mostly inside the maps, some outside (as after training), none exactly on pixel centres.
  loc = rng.uniform(-0.1, 1.1, (BATCH, length, HEADS, levels, POINTS, 2)).astype(np.float32)
  attn = rng.uniform(0, 1, (BATCH, length, HEADS, levels, POINTS)).astype(np.float32)
  attn /= attn.sum(axis=(-1, -2), keepdims=True)
  cotangent = rng.standard_normal((BATCH, length, HEADS * CHANNELS)).astype(np.float32)
  return value, loc, attn, cotangent


def _alternative(value, spatial_shapes, loc, attn, kind: str):
  """Rejected formulations, differentiated by plain autodiff (no custom VJP).

  kind: "packed_sum" / "packed_einsum": one packed gather of all corners `[Q, M, K, C]`, then
  a multiply-sum or an einsum over K; "unrolled_autodiff": our forward (K gathers added in one
  fusion) but with autodiff's backward instead of our custom VJP.
  """

  def one_example(value, loc, attn):
    length, heads, channels = value.shape
    c = msda_lib._corners(tuple(spatial_shapes), length, heads, loc, jnp.float32)
    weights = msda_lib._corner_weights(c) * attn[..., None]
    weights = weights.reshape(loc.shape[0], heads, -1)
    rows = c.rows.reshape(weights.shape)
    table = value.reshape(-1, channels)
    if kind == "unrolled_autodiff":
      out = msda_lib._gather_weighted_sum(table, rows, weights)
    else:
      gathered = table.at[rows].get(mode="promise_in_bounds")  # [Q, M, K, C]
      if kind == "packed_sum":
        out = jnp.sum(gathered * weights[..., None], axis=-2)
      else:
        out = jnp.einsum("qmk,qmkc->qmc", weights, gathered)
    return out.reshape(loc.shape[0], heads * channels)

  return jax.vmap(one_example)(value, loc, attn)


def _bench_jax(fn, arrays, runs: int) -> dict[str, dict[str, float]]:
  value, loc, attn, cotangent = (jnp.asarray(a) for a in arrays)
  op = lambda value, loc, attn: fn(value, SPATIAL_SHAPES, loc, attn)
  forward = jax.jit(op)

  @jax.jit
  def forward_backward(value, loc, attn, cotangent):
    out, vjp = jax.vjp(op, value, loc, attn)
    return out, vjp(cotangent)

  return {
    "forward_ms": _time_ms(lambda: jax.block_until_ready(forward(value, loc, attn)), runs),
    "forward_backward_ms": _time_ms(
      lambda: jax.block_until_ready(forward_backward(value, loc, attn, cotangent)), runs
    ),
  }


def _bench_torch(arrays, runs: int) -> dict[str, dict[str, float]]:
  import torch
  import torch.nn.functional as F

  torch.set_num_threads(2)

  def ms_deform_attn_core_pytorch(value, value_spatial_shapes, sampling_locations, attn_w):
    n, _, m, d = value.shape
    _, lq, m, levels, points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in value_spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for lid, (h, w) in enumerate(value_spatial_shapes):
      value_l = value_list[lid].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
      grid_l = sampling_grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
      sampled.append(
        F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
      )
    attn_w = attn_w.transpose(1, 2).reshape(n * m, 1, lq, levels * points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * attn_w).sum(-1).view(n, m * d, lq)
    return output.transpose(1, 2).contiguous()

  value, loc, attn, cotangent = (torch.from_numpy(a) for a in arrays)

  def forward():
    with torch.no_grad():
      ms_deform_attn_core_pytorch(value, SPATIAL_SHAPES, loc, attn)

  leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]

  def forward_backward():
    out = ms_deform_attn_core_pytorch(leaves[0], SPATIAL_SHAPES, leaves[1], leaves[2])
    torch.autograd.grad(out, leaves, grad_outputs=cotangent)

  return {
    "forward_ms": _time_ms(forward, runs),
    "forward_backward_ms": _time_ms(forward_backward, runs),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=7)
  parser.add_argument("--alternatives", action="store_true")
  args = parser.parse_args()
  # As main.py on a CPU and experiments/benchmark.py: glibc keeps freed memory (both sides).
  host_memory.keep_freed_memory()

  arrays = _inputs()
  length = sum(h * w for h, w in SPATIAL_SHAPES)
  result = {
    "shape": {
      "batch": BATCH,
      "queries": length,
      "spatial_shapes": SPATIAL_SHAPES,
      "heads": HEADS,
      "channels": CHANNELS,
      "points": POINTS,
    },
    "jax_backend": jax.default_backend(),
    "cpu_count": os.cpu_count(),
    "ours_xla": _bench_jax(msda_lib.multi_scale_deformable_attention_xla, arrays, args.runs),
    "torch_reference": _bench_torch(arrays, args.runs),
  }
  if args.alternatives:
    for kind in ("packed_sum", "packed_einsum", "unrolled_autodiff"):
      fn = lambda *args, kind=kind: _alternative(*args, kind=kind)
      result[f"alt_{kind}"] = _bench_jax(fn, arrays, args.runs)
  ours, ref = result["ours_xla"], result["torch_reference"]
  result["ratio_ours_over_torch"] = {
    key: round(ours[key]["median"] / ref[key]["median"], 3)
    for key in ("forward_ms", "forward_backward_ms")
  }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
