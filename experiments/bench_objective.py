"""Cost of the set-prediction objective: host Hungarian matching and the mask-pilot block.

Three measurements, side by side in one run, printed as one JSON object:

- `matching`: the scipy solver on a `[L=10, B, Q, max_gt]` cost (what the host callback does per
  step), for images with a few segments and with `max_gt` of them; and the on-device
  `optax.assignment.hungarian_algorithm` path on the same costs (jitted, after a warm-up).
- `train_step`: one jitted training step (loss, gradients, AdamW update) of Mask2Former R50 on
  the CPU, and the share of it that the host matching takes.
- `mask_pilot`: the same step with the mask pilot on vs off, at `max_gt` slots per image and for
  two segment counts (few / `max_gt`). Ratios > 1 are the MP overhead.

Steps alternate between the variants in blocks (each block starts with an untimed step) so that
slow drifts of a shared machine hit both alike.

Usage: .venv/bin/python experiments/bench_objective.py [--match-batch 16] [--batch 4]
  [--size 256] [--runs 1] [--blocks 2]   (`--small` is a quick smoke run)

The matching part uses the issue's setting (B=16, Q=100, max_gt=100, 10 predictions); the CPU
train step uses a smaller batch (a 2-core, 24 GiB machine) and the host matching time scaled
to it (the solver's time is linear in the images).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpformer_jax import config_lib, models  # noqa: E402
from mpformer_jax.losses import matcher as matcher_lib  # noqa: E402
from mpformer_jax.losses.criterion import LossConfig  # noqa: E402
from mpformer_jax.models.random_variables import random_variables  # noqa: E402
from mpformer_jax.targets import Targets  # noqa: E402
from mpformer_jax.training import slot_buckets  # noqa: E402
from mpformer_jax.training.objective import make_loss_fn  # noqa: E402


def synthetic_targets(rng, batch, size, max_gt, count, num_classes):
  """`count` segments per image: a random partition of 8x8 blocks, every segment present."""
  h, w = size
  blocks = (h // 8) * (w // 8)
  seg = np.zeros((batch, h, w), np.int32)
  for b in range(batch):
    owner = np.concatenate([np.arange(count), rng.integers(0, count, blocks - count)])
    owner = rng.permutation(owner).reshape(h // 8, w // 8) + 1
    seg[b] = np.kron(owner, np.ones((8, 8), np.int32))
  ids = np.zeros((batch, max_gt), np.int32)
  ids[:, :count] = np.arange(1, count + 1)
  valid = ids > 0
  labels = np.where(valid, rng.integers(0, num_classes, (batch, max_gt)), 0).astype(np.int32)
  return Targets(segment_ids=seg, ids=ids, labels=labels, valid=valid)


def median_ms(fn, runs):
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(1e3 * (time.perf_counter() - start))
  return float(np.median(times))


def bench_matching(args, rng):
  out = {}
  cost_shape = (10, args.match_batch, args.queries, args.max_gt)
  optax_fn = jax.jit(lambda c, v: matcher_lib.match(c, v, method="optax"))
  for count in (args.few, args.max_gt):
    cost = rng.random(cost_shape).astype(np.float32)
    valid = np.zeros((args.match_batch, args.max_gt), bool)
    valid[:, :count] = True
    # As `pairwise_costs` does: padded columns cost more than any real pair.
    cost = np.where(valid[None, :, None, :], cost, matcher_lib.COST_UPPER_BOUND)
    cost = cost.astype(np.float32)
    scipy_ms = median_ms(lambda c=cost, v=valid: matcher_lib._scipy_assign(c, v), 5)
    jax.block_until_ready(optax_fn(cost, valid))
    optax_ms = median_ms(lambda c=cost, v=valid: jax.block_until_ready(optax_fn(c, v)), 3)
    same = np.array_equal(matcher_lib._scipy_assign(cost, valid), np.asarray(optax_fn(cost, valid)))
    out[f"segments_{count}"] = {
      "scipy_host_ms": round(scipy_ms, 2),
      "optax_device_ms": round(optax_ms, 2),
      "same_assignment": bool(same),
    }
  return out


def make_step(model, loss_cfg, tx):
  loss_fn = make_loss_fn(model, loss_cfg)

  @jax.jit
  def step(params, opt_state, state, images, targets, rng):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, state, images, targets, rng
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def bench_train_steps(args, rng):
  size = (args.size, args.size)
  images = rng.standard_normal((args.batch, *size, 3)).astype(np.float32)
  loss_cfg = LossConfig(num_points=args.points)
  tx = optax.adamw(1e-4, weight_decay=0.05)
  variants = {}
  for mp in (False, True):
    config = (
      config_lib.mp_former_config(args.classes) if mp else config_lib.model_config(args.classes)
    )
    config.decoder.num_queries = args.queries
    if args.small:
      config.backbone.resnet.depths = (1, 1, 1, 1)
      config.pixel_decoder.num_layers = 1
    model = models.build_model(config)
    variables = random_variables(model, size, scale=0.02)
    params = variables["params"]
    state = {"batch_stats": variables["batch_stats"]}
    variants["mask_pilot" if mp else "baseline"] = (
      make_step(model, loss_cfg, tx),
      params,
      tx.init(params),
      state,
    )
  results = {}
  cases = [(f"segments_{args.few}", args.few, None)]
  if args.bucket:
    # The same few-segment batch cut to `bucket` slots, as `training.gt_slot_buckets` does.
    cases.append((f"segments_{args.few}_cut_to_{args.bucket}", args.few, args.bucket))
  if not args.no_full:
    cases.append((f"segments_{args.max_gt}", args.max_gt, None))
  for case, count, bucket in cases:
    targets = synthetic_targets(rng, args.batch, size, args.max_gt, count, args.classes)
    if bucket:
      targets = Targets(
        segment_ids=targets.segment_ids,
        **slot_buckets.cut_slots(
          {k: np.asarray(getattr(targets, k)) for k in slot_buckets.SLOT_KEYS}, bucket
        ),
      )
    times = {name: [] for name in variants}
    for name, (step, params, opt_state, state) in variants.items():  # compile
      start = time.perf_counter()
      jax.block_until_ready(step(params, opt_state, state, images, targets, jax.random.key(0)))
      print(
        f"{name} segments={count}: first step {time.perf_counter() - start:.1f} s", file=sys.stderr
      )
    for block in range(args.blocks):
      for name, (step, params, opt_state, state) in variants.items():
        jax.block_until_ready(step(params, opt_state, state, images, targets, jax.random.key(1)))
        for r in range(args.runs):
          key = jax.random.key(100 * block + r)
          start = time.perf_counter()
          jax.block_until_ready(step(params, opt_state, state, images, targets, key))
          times[name].append(1e3 * (time.perf_counter() - start))
    medians = {name: float(np.median(t)) for name, t in times.items()}
    results[case] = {
      "baseline_ms": round(medians["baseline"], 1),
      "mask_pilot_ms": round(medians["mask_pilot"], 1),
      "mask_pilot_over_baseline": round(medians["mask_pilot"] / medians["baseline"], 3),
    }
    print(json.dumps({case: results[case]}), file=sys.stderr, flush=True)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--match-batch", type=int, default=16, help="images, matching part")
  parser.add_argument("--batch", type=int, default=4, help="images, train step part")
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--queries", type=int, default=100)
  parser.add_argument("--max-gt", type=int, default=100)
  parser.add_argument("--few", type=int, default=8, help="segments per image, 'few' case")
  parser.add_argument("--classes", type=int, default=133)
  parser.add_argument("--points", type=int, default=12544)
  parser.add_argument("--runs", type=int, default=1)
  parser.add_argument("--blocks", type=int, default=2)
  parser.add_argument("--small", action="store_true", help="1-block ResNet, 1 encoder layer")
  parser.add_argument(
    "--bucket", type=int, default=0, help="also time the few-segment batch cut to N slots"
  )
  parser.add_argument("--no-full", action="store_true", help="skip the max_gt-segment case")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  matching = bench_matching(args, rng)
  steps = bench_train_steps(args, rng)
  # The host matching time scales with the images per step: scale it to the step's batch.
  for key, m in matching.items():
    if key not in steps:
      continue
    host_ms = m["scipy_host_ms"] * args.batch / args.match_batch
    steps[key]["host_matching_ms_at_step_batch"] = round(host_ms, 2)
    steps[key]["host_matching_share_of_baseline_step"] = round(
      host_ms / steps[key]["baseline_ms"], 4
    )
  report = {
    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "setting": {k: v for k, v in vars(args).items()},
    "matching": matching,
    "train_step": steps,
  }
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
