"""Step time, compile time and peak host memory of `configs/synthetic.py` on this machine.

Trains the embedded default for `--steps` steps in this process (the same code path as
`main.py`), evaluates the final checkpoint again, then prints JSON: compile seconds of the train
step, the median steps/s reported by the trainer after the first `log_every` steps, evaluation
images/s of the second evaluation (compiled already), and the process's peak
resident memory (on a CPU backend the device memory is host memory, so this bounds both).
`host.keep_freed_memory` is applied as `main.py` applies it (`--set host.keep_freed_memory=...`).

Usage: .venv/bin/python experiments/bench_synthetic.py [--steps 60] [--variant mp_former]
  [--workdir /tmp/bench_synthetic] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import synthetic  # noqa: E402
from mpformer_jax import host_memory  # noqa: E402
from mpformer_jax.training import trainer  # noqa: E402
from mpformer_jax.training.monitors import CompileCounter  # noqa: E402


def _set(config, assignment: str) -> None:
  key, value = assignment.split("=", 1)
  *parents, name = key.split(".")
  node = config
  for parent in parents:
    node = getattr(node, parent)
  current = getattr(node, name)
  setattr(node, name, type(current)(json.loads(value)) if current is not None else value)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--variant", default="mp_former")
  parser.add_argument("--workdir", default="/tmp/bench_synthetic")
  parser.add_argument("--set", nargs="*", default=[], help="config overrides key=json_value")
  args = parser.parse_args()

  config = synthetic.get_config(args.variant)
  config.training.total_steps = args.steps
  config.training.log_every = 10
  config.training.checkpoint_every = 10**9  # one checkpoint, at the last step
  for assignment in args.set:
    _set(config, assignment)
  shutil.rmtree(args.workdir, ignore_errors=True)
  # As main.py does, before JAX starts its backend.
  kept = host_memory.configure(config.host.keep_freed_memory)

  start = time.perf_counter()
  with CompileCounter() as compiles:
    result = trainer.train_and_evaluate(config, args.workdir)
  wall = time.perf_counter() - start
  # A second evaluation of the final checkpoint reuses the compiled prediction step, so its
  # rate is the steady one (the first includes compiling).
  evaluated = trainer.evaluate_checkpoint(config, args.workdir)

  rates = []
  with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "steps_per_sec" in row and row["step"] > config.training.log_every:
        rates.append(row["steps_per_sec"])
  out = {
    "machine": {
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "host_memory_kept": kept,
    },
    "config": {
      "variant": args.variant,
      "steps": args.steps,
      "global_batch_size": config.training.global_batch_size,
      "crop_size": list(config.dataset.crop_size),
      "overrides": args.set,
    },
    "train_step_compile_s": round(compiles.seconds["train_step"], 1),
    "predict_compile_s": round(compiles.seconds["predict"], 1),
    "steps_per_sec": round(float(np.median(rates)), 3) if rates else None,
    "step_ms": round(1e3 / float(np.median(rates)), 1) if rates else None,
    "eval_images_per_sec": round(evaluated["images_per_sec"], 2),
    "eval_images": int(evaluated["num_images"]),
    "first_eval_seconds_with_compile": round(result.get("eval_seconds", float("nan")), 1),
    "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    "wall_s": round(wall, 1),
    "final_train_loss": result.get("train_loss"),
    "PQ": result.get("PQ"),
  }
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
