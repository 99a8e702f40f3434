"""The training loop end to end on the embedded synthetic dataset.

In-process runs use the 8 fake devices of `conftest.py`; runs with another device count or
with several processes are subprocesses of `main.py`. All runs share a persistent compilation
cache, so a configuration compiles once per test session.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest

from configs import synthetic
from mpformer_jax.training import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# configs/synthetic.py shrunk: 64 x 64 images, 3 decoder layers, one encoder layer. The same
# settings serve in-process runs (`tiny_config`) and `main.py` subprocesses (`overrides`).
TINY = {
  "dataset.synthetic.image_size": (64, 64),
  "dataset.synthetic.num_train": 24,
  "dataset.synthetic.num_validation": 8,
  "dataset.crop_size": (64, 64),
  "dataset.eval_size": (64, 64),
  "dataset.max_gt": 8,
  "model.decoder.num_layers": 3,
  "model.pixel_decoder.num_layers": 1,
  "loss.num_points": 256,
  "training.log_every": 1,
  "training.checkpoint_every": 2,
}


def tiny_config(data_dir: str, total_steps: int, variant: str = "mp_former"):
  config = synthetic.get_config(variant)
  settings = {**TINY, "dataset.data_dir": data_dir, "training.total_steps": total_steps}
  for key, value in settings.items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = getattr(node, parent)
    setattr(node, name, value)
  return config


def overrides(settings: dict) -> list[str]:
  """Command-line form of `settings`, for `main.py` subprocesses."""
  return [f"--config.{k}={str(v).replace(' ', '')}" for k, v in settings.items()]


def run_main(workdir, data_dir, extra: dict, devices: int = 8, env_extra=None, wait=True):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env.update(env_extra or {})
  cmd = [
    sys.executable,
    os.path.join(ROOT, "main.py"),
    "--config",
    os.path.join(ROOT, "configs/synthetic.py"),
    "--workdir",
    str(workdir),
    "--alsologtostderr",
    f"--config.dataset.data_dir={data_dir}",
    *overrides({**TINY, **extra}),
  ]
  proc = subprocess.Popen(
    cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-4000:]
  return out


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _latest_step(directory):
  return max(int(p) for p in os.listdir(directory) if p.isdigit())


def saved_params(workdir, step=None):
  """The parameters of a checkpoint as host numpy arrays (whatever wrote it: 1 or 8 devices,
  1 or 2 processes), and its step."""
  directory = os.path.join(workdir, "checkpoints")
  path = os.path.join(directory, str(_latest_step(directory) if step is None else step), "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  step = int(os.path.basename(os.path.dirname(path)))
  return jax.tree.map(np.asarray, restored["params"]), step


def assert_params_close(a, b, rtol, atol):
  jax.tree_util.tree_map_with_path(
    lambda p, x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(p)
    ),
    a,
    b,
  )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


STEPS = 4


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
  """4 steps on the 8 fake devices, in this process."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  result = trainer.train_and_evaluate(tiny_config(data_dir, STEPS), workdir)
  return workdir, result


def test_train_loss_falls_and_logs_appear(straight_run):
  workdir, result = straight_run
  assert result["step"] == STEPS
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  losses = [r["train_loss"] for r in rows if "train_loss" in r]
  assert len(losses) == STEPS and losses[-1] < losses[0], losses
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["step"] == STEPS and np.isfinite(results["train_loss"])
  assert saved_params(workdir)[1] == STEPS  # a checkpoint at the last step


def test_resume_is_exact(tmp_path, data_dir, straight_run):
  """4 steps straight == 2 steps, a fresh trainer that restores, 2 more (data included)."""
  _, straight = straight_run
  config = tiny_config(data_dir, STEPS)
  first = trainer.train_and_evaluate(config, str(tmp_path), stop_after=STEPS // 2)
  assert first["step"] == STEPS // 2
  resumed = trainer.train_and_evaluate(config, str(tmp_path))
  assert resumed["step"] == STEPS
  assert_params_close(resumed["state"].params, straight["state"].params, rtol=1e-6, atol=1e-6)
  steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train_loss" in r]
  assert steps == list(range(1, STEPS + 1))


def test_kill_9_on_one_device_loses_only_that_save_and_matches_8_devices(
  tmp_path, data_dir, straight_run
):
  """`main.py` on 1 device, killed with SIGKILL while saving every step, then restarted.

  The restarted run resumes from the newest complete checkpoint, and its final parameters
  equal those of the uninterrupted 8-device run (same global batches).
  """
  straight_dir, _ = straight_run
  extra = {"training.total_steps": STEPS, "training.checkpoint_every": 1}
  proc = run_main(tmp_path, data_dir, extra, devices=1, wait=False)
  checkpoints = tmp_path / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    done = [p for p in glob.glob(str(checkpoints / "*")) if os.path.basename(p).isdigit()]
    if len(done) >= 2:
      break
    time.sleep(0.02)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  out = run_main(tmp_path, data_dir, extra, devices=1)
  assert "Restored checkpoint at step" in out, out[-3000:]
  params, step = saved_params(tmp_path)
  assert step == STEPS
  assert_params_close(params, saved_params(straight_dir)[0], rtol=1e-5, atol=1e-5)


def test_checkpoint_from_8_devices_continues_on_1(tmp_path, data_dir, straight_run):
  straight_dir, _ = straight_run
  workdir = tmp_path / "copy"
  shutil.copytree(straight_dir, workdir)
  out = run_main(workdir, data_dir, {"training.total_steps": STEPS + 1}, devices=1)
  assert f"Restored checkpoint at step {STEPS}" in out, out[-3000:]
  assert saved_params(workdir)[1] == STEPS + 1


def test_two_processes_train_together_like_one(tmp_path, data_dir, straight_run):
  """Two `main.py` processes with 4 CPU devices each (`jax.distributed` on localhost)."""
  straight_dir, _ = straight_run
  port = portpicker.pick_unused_port()
  procs = [
    run_main(
      tmp_path,
      data_dir,
      {
        "training.total_steps": STEPS,
        "distributed.enabled": True,
        "distributed.coordinator_address": f"localhost:{port}",
        "distributed.num_processes": 2,
        "distributed.process_id": i,
      },
      devices=4,
      wait=False,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-4000:]
  assert "Process 1/2" in outs[1] or "Process 1" in outs[1]
  params, step = saved_params(tmp_path)
  assert step == STEPS
  assert_params_close(params, saved_params(straight_dir)[0], rtol=1e-5, atol=1e-5)
