"""Multi-scale deformable attention: every implementation side by side, at pixel-decoder shapes.

Shapes (Mask2Former's pixel decoder: levels at strides 8, 16, 32, 8 heads of 32 channels, 4
points per level, queries = positions; batch 2 per device, as 16 images on 8 devices):

- `ade512`: a 512 x 512 crop (ADE20K semantic): levels 64x64, 32x32, 16x16, 5376 queries;
- `coco1024`: a 1024 x 1024 crop (COCO LSJ): levels 128x128, 64x64, 32x32, 21504 queries;
- `tiny`: levels 8x8, 4x4, 2x2 (84 queries), for interpret mode on CPU (Pallas kernels
  interpreted on a CPU show that they run, not how fast they are).

Usage:
  python experiments/bench_msda.py                      # all shapes, every implementation
                                                        # that runs on this backend
  python experiments/bench_msda.py --shapes tiny --interpret --implementations xla \
      pallas_gpu pallas_tpu                             # CPU: kernels in interpret mode

Prints one JSON object: per shape and implementation, the median (and min) milliseconds of the
forward and of forward+backward (gradients w.r.t. value, sampling locations and attention
weights), the compiled executables' memory (`memory_analysis`: arguments, outputs and
temporaries, in MiB; on a GPU also the device's peak bytes), the largest deviation of each
implementation's output and gradients from "xla", and the ratios xla / implementation (> 1:
faster than XLA). Ratios come from one process, timed alternately, because these machines are
noisy.
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

from mpformer_jax.ops import msda as msda_lib  # noqa: E402

SHAPES = {
  "tiny": ((8, 8), (4, 4), (2, 2)),
  "ade512": ((64, 64), (32, 32), (16, 16)),
  "coco1024": ((128, 128), (64, 64), (32, 32)),
}
BATCH, HEADS, CHANNELS, POINTS = 2, 8, 32, 4


def _inputs(spatial_shapes, dtype, seed: int = 0):
  rng = np.random.default_rng(seed)
  length = sum(h * w for h, w in spatial_shapes)
  levels = len(spatial_shapes)
  value = rng.standard_normal((BATCH, length, HEADS, CHANNELS))
  # Mostly inside the maps, some outside (as after training).
  loc = rng.uniform(-0.1, 1.1, (BATCH, length, HEADS, levels, POINTS, 2))
  attn = rng.uniform(0, 1, (BATCH, length, HEADS, levels, POINTS))
  attn /= attn.sum(axis=(-1, -2), keepdims=True)
  cotangent = rng.standard_normal((BATCH, length, HEADS * CHANNELS))
  return tuple(jnp.asarray(a, dtype) for a in (value, loc, attn, cotangent))


def _functions(name: str, spatial_shapes, interpret: bool):
  def op(value, loc, attn):
    return msda_lib.multi_scale_deformable_attention(
      value, spatial_shapes, loc, attn, implementation=name, interpret=interpret
    )

  def forward_backward(value, loc, attn, cotangent):
    out, vjp = jax.vjp(op, value, loc, attn)
    return out, vjp(cotangent)

  return jax.jit(op), jax.jit(forward_backward)


def _memory_mib(compiled) -> dict[str, float] | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
  return {f.removesuffix("_size_in_bytes"): round(getattr(analysis, f) / 2**20, 2) for f in fields}


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def _max_error(a, b) -> float:
  errors = jax.tree.map(
    lambda x, y: float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))), a, b
  )
  return max(jax.tree.leaves(errors))


def bench_shape(shape: str, names, runs: int, interpret: bool, dtype) -> dict:
  spatial_shapes = SHAPES[shape]
  value, loc, attn, cotangent = _inputs(spatial_shapes, dtype)
  result: dict = {
    "spatial_shapes": spatial_shapes,
    "batch": BATCH,
    "queries": sum(h * w for h, w in spatial_shapes),
    "heads": HEADS,
    "channels": CHANNELS,
    "points": POINTS,
    "dtype": jnp.dtype(dtype).name,
  }
  compiled, outputs = {}, {}
  for name in names:
    forward, forward_backward = _functions(name, spatial_shapes, interpret)
    try:
      start = time.perf_counter()
      fwd = forward.lower(value, loc, attn).compile()
      fwd_bwd = forward_backward.lower(value, loc, attn, cotangent).compile()
      compile_s = time.perf_counter() - start
      outputs[name] = jax.block_until_ready(fwd_bwd(value, loc, attn, cotangent))
      jax.block_until_ready(fwd(value, loc, attn))
    except Exception as e:  # noqa: BLE001 -- reported, the other implementations still run
      result[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
      continue
    compiled[name] = (fwd, fwd_bwd)
    result[name] = {
      "compile_s": round(compile_s, 2),
      "memory_mib": {"forward": _memory_mib(fwd), "forward_backward": _memory_mib(fwd_bwd)},
      "forward_ms": [],
      "forward_backward_ms": [],
    }
  # Alternate the implementations run by run, so that drifts of the machine hit all alike.
  for _ in range(runs):
    for name, (fwd, fwd_bwd) in compiled.items():
      for key, fn, args in (
        ("forward_ms", fwd, (value, loc, attn)),
        ("forward_backward_ms", fwd_bwd, (value, loc, attn, cotangent)),
      ):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        result[name][key].append(1e3 * (time.perf_counter() - start))
  for name in compiled:
    for key in ("forward_ms", "forward_backward_ms"):
      times = result[name][key]
      result[name][key] = {
        "median": round(float(np.median(times)), 3),
        "min": round(float(np.min(times)), 3),
      }
    if "xla" in outputs and name != "xla":
      result[name]["max_abs_error_vs_xla"] = _max_error(outputs[name], outputs["xla"])
      result[name]["speedup_over_xla"] = {
        key: round(result["xla"][key]["median"] / result[name][key]["median"], 3)
        for key in ("forward_ms", "forward_backward_ms")
      }
  result["device_peak_bytes"] = _peak_bytes()
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="+", default=["ade512", "coco1024"], choices=SHAPES)
  parser.add_argument(
    "--implementations",
    nargs="+",
    default=None,
    help="default: xla and every kernel that runs on this backend",
  )
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--interpret", action="store_true", help="Pallas kernels in interpret mode")
  args = parser.parse_args()

  names = args.implementations
  if names is None:
    names = ["xla"] + [
      n
      for n in msda_lib.available_implementations()
      if n != "xla" and jax.default_backend() in (msda_lib.IMPLEMENTATIONS[n].platforms or ())
    ]
  result = {
    "backend": jax.default_backend(),
    "device": str(jax.devices()[0].device_kind),
    "jax": jax.__version__,
    "interpret": args.interpret,
    "shapes": {
      s: bench_shape(s, names, args.runs, args.interpret, jnp.dtype(args.dtype))
      for s in args.shapes
    },
  }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
