"""Where the compile time of the training step goes, part by part.

Compiles (lower + XLA compile, nothing executed) the forward pass, the forward pass with the
objective, their gradients, and the whole optimiser step at `configs/synthetic.py`, one device,
and prints JSON with the seconds of each and the optimised HLO instruction counts.

With `--runs N` it also times N executions of each part (median milliseconds). With
`COMPILE_BREAKDOWN_DUMP=DIR` in the environment it writes each part's optimised HLO there.
Every part compiles from scratch (caches cleared), so a part never reuses another's work.

Usage: .venv/bin/python experiments/compile_breakdown.py [--variant mp_former] [--parts a,b]
  [--runs N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import synthetic  # noqa: E402
from mpformer_jax import models  # noqa: E402
from mpformer_jax.losses.criterion import LossConfig, set_criterion  # noqa: E402
from mpformer_jax.training import optimizer  # noqa: E402
from mpformer_jax.training.objective import make_loss_fn, split_rngs  # noqa: E402
from mpformer_jax.training.train_step import create_train_state, make_train_step  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import random_ground_truth  # noqa: E402


def _compile(fn, *args, runs: int = 0) -> dict[str, float]:
  jax.clear_caches()  # e.g. `forward` already ran once to give the criterion its inputs
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  text = compiled.as_text() or ""
  if os.environ.get("COMPILE_BREAKDOWN_DUMP"):
    with open(os.path.join(os.environ["COMPILE_BREAKDOWN_DUMP"], f"{fn.__name__}.hlo"), "w") as f:
      f.write(text)
  result = {
    "lower_s": round(lowered_at - start, 1),
    "compile_s": round(done - lowered_at, 1),
    "hlo_lines": text.count("\n"),
  }
  if runs:
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(runs):
      t = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t)
    result["run_ms"] = round(1e3 * float(np.median(times)), 1)
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="mp_former")
  parser.add_argument(
    "--parts",
    default="forward,forward_grad,loss,loss_grad,train_step",
    help="comma-separated, of: forward, forward_grad, criterion, criterion_grad, loss, "
    "loss_grad, loss_grad_traced_rng, update_only, train_step",
  )
  parser.add_argument("--matcher", default=None, help="scipy | optax (default: the config's)")
  parser.add_argument("--runs", type=int, default=0, help="also time this many executions")
  args = parser.parse_args()

  config = synthetic.get_config(args.variant)
  model = models.build_model(config.model)
  size = config.dataset.crop_size[0]
  batch = config.training.global_batch_size
  images = jnp.zeros((batch, size, size, 3), jnp.float32)
  targets, _, _ = random_ground_truth(
    np.random.default_rng(0), batch, size, 6, config.dataset.max_gt, config.model.num_classes
  )
  targets = jax.tree.map(jnp.asarray, targets)
  variables = jax.jit(lambda r: model.init(r, images[:1], train=False))(jax.random.PRNGKey(0))
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  loss_cfg = LossConfig.from_config(config.loss)
  if args.matcher:
    loss_cfg = dataclasses.replace(loss_cfg, matcher=args.matcher)
  rng = jax.random.PRNGKey(1)
  loss_fn = make_loss_fn(model, loss_cfg)

  def forward(p):
    rngs = split_rngs(rng)
    rngs.pop("loss")
    out, _ = model.apply(
      {"params": p, **state}, images, train=True, targets=targets, rngs=rngs, mutable=list(state)
    )
    return out

  def forward_sum(p):
    out = forward(p)
    return sum(jnp.sum(x) for x in jax.tree.leaves(out) if jnp.issubdtype(x.dtype, jnp.floating))

  def loss(p):
    return loss_fn(p, state, images, targets, rng)[0]

  def loss_traced_rng(p, key):
    return loss_fn(p, state, images, targets, key)[0]

  outputs = jax.jit(forward)(params)

  def criterion_only(out):
    return set_criterion(out, targets, rng, loss_cfg)[0]

  tx = optimizer.create_optimizer(config.optimizer, 1000, params)
  train_state = create_train_state(variables, tx, rng)
  step = make_train_step(model, loss_cfg, tx)

  def update_only(st, grads):
    updates, opt_state = tx.update(grads, st.opt_state, st.params)
    return optax.apply_updates(st.params, updates), opt_state

  cases = {
    "update_only": (update_only, train_state, params),
    "forward": (forward, params),
    "forward_grad": (jax.grad(forward_sum), params),
    "criterion": (criterion_only, outputs),
    "criterion_grad": (jax.grad(criterion_only), outputs),
    "loss": (loss, params),
    "loss_grad": (jax.grad(loss), params),
    "loss_grad_traced_rng": (jax.grad(loss_traced_rng), params, rng),
    "train_step": (step, train_state, images, targets),
  }
  results = {"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}
  for name in args.parts.split(","):
    fn, *fargs = cases[name]
    results[name] = _compile(fn, *fargs, runs=args.runs)
    print(name, results[name], file=sys.stderr, flush=True)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
