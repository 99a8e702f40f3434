"""The training loop end to end on the embedded synthetic dataset.

In-process runs use the 8 fake devices of `conftest.py` and share the trainer's cache of
compiled steps; runs with another device count or with several processes are subprocesses of
`main.py` and compile their own.
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
  "training.profile_first_step": 2,
  "training.profile_steps": 1,
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


def run_main(workdir, data_dir, extra: dict, devices: int = 8, env_extra=None, wait=True, flags=()):
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
    *flags,
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


def _checkpoint_steps(workdir) -> set[int]:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return set()
  return {int(p) for p in os.listdir(directory) if p.isdigit()}


def saved_params(workdir, step=None):
  """The parameters of a checkpoint as host numpy arrays (whatever wrote it: 1 or 8 devices,
  1 or 2 processes), and its step."""
  directory = os.path.join(workdir, "checkpoints")
  step = max(_checkpoint_steps(workdir)) if step is None else step
  path = os.path.join(directory, str(step), "state")
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


def test_results_file_is_standard_json_with_undefined_values_as_null(tmp_path):
  trainer.write_results(str(tmp_path), {"step": 3, "PQ": 56.5, "APl": float("nan")})

  def refuse(constant):
    raise AssertionError(f"non-standard JSON constant {constant}")

  with open(tmp_path / "results.json") as f:
    assert json.load(f, parse_constant=refuse) == {"step": 3, "PQ": 56.5, "APl": None}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def one_device_settings(tmp_path_factory):
  """Settings and environment of the 1-device `main.py` runs: they share one compilation.

  They use the on-device matcher (it gives the same matches as the host one): the host
  matcher's callback makes an executable impossible to cache on disk, and a fresh compile
  of the step costs minutes on 2 CPU cores.
  """
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  env = {
    "JAX_COMPILATION_CACHE_DIR": cache,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }
  return {"loss.matcher": "optax", "evaluation.at_end": False}, env


STEPS = 6


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
  """4 steps on the 8 fake devices, in this process."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  result = trainer.train_and_evaluate(tiny_config(data_dir, STEPS), workdir)
  return workdir, result


def test_train_loss_falls_and_logs_appear(straight_run):
  workdir, result = straight_run
  assert result["step"] == STEPS
  # One compilation of the step, none after the first step (static shapes throughout).
  assert result["train_step_compiles"] == 1 and result["train_step_recompiles"] == 0
  assert result["skipped_steps_this_run"] == 0
  # The TensorBoard profile of step 2 (profile_first_step, profile_steps in TINY).
  assert glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*", "*.xplane.pb"))
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  losses = [r["train_loss"] for r in rows if "train_loss" in r]
  assert len(losses) == STEPS and losses[-1] < losses[0], losses
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["step"] == STEPS and np.isfinite(results["train_loss"])
  assert saved_params(workdir)[1] == STEPS  # a checkpoint at the last step


def test_eval_mode_restores_and_reproduces_the_final_evaluation(tmp_path, data_dir, straight_run):
  straight_dir, straight = straight_run
  for key in ("PQ", "PQ_th", "PQ_st", "mIoU", "AP", "AP50"):
    assert 0.0 <= straight[key] <= 100.0, key
  assert straight["num_images"] == 8  # the whole validation split, once
  overlays = glob.glob(os.path.join(straight_dir, "overlays", f"step_{STEPS}", "*.png"))
  assert len(overlays) == 4
  workdir = tmp_path / "copy"
  shutil.copytree(straight_dir, workdir)
  config = tiny_config(data_dir, STEPS)
  evaluated = trainer.evaluate_checkpoint(config, str(workdir))
  assert evaluated["step"] == STEPS
  for key in ("PQ", "mIoU", "AP", "num_images"):
    assert evaluated[key] == straight[key], key
  with open(workdir / "results.json") as f:
    assert json.load(f)["PQ"] == straight["PQ"]
  config.evaluation.checkpoint_step = 3
  with pytest.raises(FileNotFoundError, match="checkpoint_step=3"):
    trainer.evaluate_checkpoint(config, str(workdir))


def test_predict_mode_writes_every_format_at_the_original_size(tmp_path, data_dir, straight_run):
  from PIL import Image
  from pycocotools import mask as mask_util

  from mpformer_jax.data import panoptic_png, transforms
  from mpformer_jax.data.metadata import dataset_metadata
  from mpformer_jax.data.synthetic_shapes import generate_scene
  from mpformer_jax.evaluation import evaluator, postprocess

  straight_dir, _ = straight_run
  inputs = tmp_path / "images"
  inputs.mkdir()
  canvas_image = generate_scene(7, 0, (64, 64))["image"]  # the canvas size: no resizing
  large_image = generate_scene(7, 1, (96, 80))["image"]  # shrunk to 64 x 53, then back
  Image.fromarray(canvas_image).save(inputs / "a.png")
  Image.fromarray(large_image).save(inputs / "b.png")
  Image.fromarray(canvas_image[:40, :50, 0]).save(inputs / "c.bmp")  # grey, smaller
  (inputs / "notes.txt").write_text("not an image")
  # Thresholds 0 so that the briefly trained model still produces panoptic segments.
  loose = {"evaluation.object_mask_threshold": 0.0, "evaluation.overlap_threshold": 0.0}
  output = tmp_path / "out"
  out = run_main(
    straight_dir,
    data_dir,
    {**loose, "host.keep_freed_memory": "off"},
    devices=1,
    flags=["--mode=predict", f"--input={inputs}", f"--output={output}"],
  )
  assert f"Predicted 3 images with step {STEPS}" in out, out[-3000:]
  assert "=off): glibc's defaults" in out, out[-3000:]
  assert "1 larger than dataset.eval_original_size" in out, out[-3000:]  # b.png

  with open(output / "images.json") as f:
    images = json.load(f)
  sizes = {os.path.basename(i["file_name"]): (i["height"], i["width"]) for i in images}
  assert sizes == {"a.png": (64, 64), "b.png": (96, 80), "c.bmp": (40, 50)}
  with open(output / "panoptic.json") as f:
    panoptic = json.load(f)
  category_ids = {c["id"] for c in panoptic["categories"]}
  maps, semantic_maps = {}, {}
  for image, ann in zip(images, panoptic["annotations"], strict=True):
    assert ann["image_id"] == image["id"]
    ids = panoptic_png.rgb_to_id(np.asarray(Image.open(output / "panoptic" / ann["file_name"])))
    assert ids.shape == (image["height"], image["width"])
    infos = ann["segments_info"]  # may be empty: a model trained for 6 steps says "no object"
    assert set(np.unique(ids)) - {0} == {s["id"] for s in infos}
    for s in infos:
      assert s["category_id"] in category_ids and s["area"] == int(np.sum(ids == s["id"]))
    maps[os.path.basename(image["file_name"])] = ids
    semantic = np.asarray(Image.open(output / "semantic" / ann["file_name"]))
    assert semantic.shape == ids.shape and semantic.max() < 10
    semantic_maps[os.path.basename(image["file_name"])] = semantic
    picture = np.asarray(Image.open(output / "overlays" / ann["file_name"]))
    assert picture.shape == (image["height"], 2 * image["width"] + 4, 3)
  with open(output / "instances.json") as f:
    instances = json.load(f)
  assert {r["image_id"] for r in instances} == {0, 1, 2}
  for r in instances:
    image = images[r["image_id"]]
    assert mask_util.decode(r["segmentation"]).shape == (image["height"], image["width"])
  first_of_b = next(r for r in instances if r["image_id"] == 1)  # b.png's first result

  # The files hold what the evaluation's prediction step computes for the same pixels.
  config = tiny_config(data_dir, STEPS)
  config.evaluation.object_mask_threshold = config.evaluation.overlap_threshold = 0.0
  model, mesh, variables, _, _ = trainer.restore_for_inference(config, straight_dir)
  meta = dataset_metadata(config.dataset)
  predict = jax.jit(
    evaluator.make_predict_fn(
      model,
      meta,
      evaluator.EvalSettings.from_config(config.evaluation),
      output_size=(64, 64),
      with_confusion=False,
    )
  )
  batch = np.zeros((8, 64, 64, 3), np.float32)
  sizes = np.zeros((8, 2), np.int32)
  for n, image in enumerate((canvas_image, large_image)):
    batch[n], sizes[n] = transforms.inference_transform(image, (64, 64))
  assert tuple(sizes[1]) == (64, 53)
  with jax.set_mesh(mesh):
    # b.png (96 x 80) does not fit the output canvas (eval_size): predicted at 64 x 53.
    outputs = predict(variables, batch, sizes, sizes, np.zeros((8, 64, 64)))
    outputs = jax.tree.map(np.asarray, outputs)
  p = outputs["panoptic"]
  for n, name, size in ((0, "a.png", (64, 64)), (1, "b.png", (96, 80))):
    h, w = sizes[n]
    want, _ = postprocess.panoptic_segments_info(
      p["segment_map"][n],
      p["segment_labels"][n],
      p["segment_scores"][n],
      meta.label_isthing,
      image_size=(h, w),
    )
    np.testing.assert_array_equal(maps[name], transforms.resize_ids(want, size))
    want_semantic = transforms.resize_ids(outputs["semantic"][n, :h, :w], size)
    np.testing.assert_array_equal(semantic_maps[name], want_semantic)
  inst = outputs["instance"]
  best = int(np.flatnonzero(inst["valid"][1])[0])
  want_mask = transforms.resize_ids(inst["masks"][1, best, :64, :53], (96, 80))
  np.testing.assert_array_equal(mask_util.decode(first_of_b["segmentation"]), want_mask)
  assert first_of_b["score"] == pytest.approx(float(inst["scores"][1, best]), rel=1e-6)


def test_resume_is_exact(tmp_path, data_dir, straight_run):
  """4 steps straight == 2 steps, a fresh trainer that restores, 2 more (data included)."""
  _, straight = straight_run
  config = tiny_config(data_dir, STEPS)
  first = trainer.train_and_evaluate(config, str(tmp_path), stop_after=STEPS // 2)
  assert first["step"] == STEPS // 2
  assert first["train_step_compiles"] == 0  # the straight run's compiled step is reused
  resumed = trainer.train_and_evaluate(config, str(tmp_path))
  assert resumed["step"] == STEPS
  assert_params_close(resumed["state"].params, straight["state"].params, rtol=1e-6, atol=1e-6)
  steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train_loss" in r]
  assert steps == list(range(1, STEPS + 1))


@pytest.mark.slow  # two compiles of the step on 8 devices: 3 minutes
def test_gt_slot_buckets_train_like_full_slots_and_compile_once_per_size(
  tmp_path, data_dir, straight_run
):
  """`training.gt_slot_buckets`: the straight run's parameters, one compile per size met.

  The straight run's batches hold at most 6, 7, 8, 7, 8, 8 segments per image (8 slots), so a
  bucket of 7 slots serves three of them and 8 slots the others.
  """
  _, straight = straight_run
  config = tiny_config(data_dir, STEPS)
  config.training.gt_slot_buckets = (7,)
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result["gt_slot_sizes_met"] == [7, 8]
  assert result["train_step_compiles"] == 2 and result["train_step_recompiles"] == 0
  # Cutting removes empty slots only: the same training up to float rounding.
  assert_params_close(result["state"].params, straight["state"].params, rtol=1e-4, atol=1e-6)


def _run_until_new_checkpoint(workdir, data_dir, extra, env, after: set[int]):
  """Starts `main.py` on 1 device; returns it once it has written a checkpoint not in `after`."""
  proc = run_main(workdir, data_dir, extra, devices=1, env_extra=env, wait=False)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if _checkpoint_steps(workdir) - after:
      break
    time.sleep(0.02)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  return proc


def test_preemption_and_kill_9_on_one_device_lose_nothing_and_match_8_devices(
  tmp_path, data_dir, straight_run, one_device_settings
):
  """`main.py` on 1 device, saving every step: SIGTERM, restart, SIGKILL, restart.

  SIGTERM (a preemption) saves and exits cleanly; SIGKILL loses at most the save in flight. The
  last run resumes from the newest complete checkpoint, and its final parameters equal those of
  the uninterrupted 8-device run (same global batches).
  """
  straight_dir, _ = straight_run
  settings, env = one_device_settings
  extra = {**settings, "training.total_steps": STEPS, "training.checkpoint_every": 1}

  proc = _run_until_new_checkpoint(tmp_path, data_dir, extra, env, after=set())
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "Preemption signal at step" in out, out[-3000:]
  preempted = _checkpoint_steps(tmp_path)
  assert preempted and max(preempted) < STEPS, preempted

  proc = _run_until_new_checkpoint(tmp_path, data_dir, extra, env, after=preempted)
  proc.send_signal(signal.SIGKILL)
  out = proc.communicate()[0]
  assert f"Restored checkpoint at step {max(preempted)}" in out, out[-3000:]

  out = run_main(tmp_path, data_dir, extra, devices=1, env_extra=env)
  assert "Restored checkpoint at step" in out, out[-3000:]
  params, step = saved_params(tmp_path)
  assert step == STEPS
  # 1 and 8 devices sum the gradients in different orders. AdamW normalises each update, so
  # an element whose gradient is almost zero can move by part of a step more on one side: one
  # backbone element (lr 3e-5) of 9216 in its kernel differed by 1.3e-5 after 6 steps. A lost
  # or repeated step would move most other parameters (lr 3e-4) by far more than 5e-5.
  assert_params_close(params, saved_params(straight_dir)[0], rtol=1e-5, atol=5e-5)


def test_checkpoint_from_8_devices_continues_on_1(
  tmp_path, data_dir, straight_run, one_device_settings
):
  straight_dir, _ = straight_run
  settings, env = one_device_settings
  workdir = tmp_path / "copy"
  shutil.copytree(straight_dir, workdir)
  extra = {**settings, "training.total_steps": STEPS + 1}
  out = run_main(workdir, data_dir, extra, devices=1, env_extra=env)
  assert f"Restored checkpoint at step {STEPS}" in out, out[-3000:]
  # host.keep_freed_memory="auto" on the CPU platform (see test_host_memory.py).
  assert "=auto): freed memory is kept in the process" in out, out[-3000:]
  assert saved_params(workdir)[1] == STEPS + 1


def test_two_processes_with_fsdp_train_together_like_one(tmp_path, data_dir, straight_run):
  """Two `main.py` processes with 4 CPU devices each (`jax.distributed` on localhost).

  The mesh is (data 4, fsdp 2): large parameters and their optimiser state are sharded over
  pairs of devices, and checkpoints are written by both processes together.
  """
  straight_dir, _ = straight_run
  port = portpicker.pick_unused_port()
  procs = [
    run_main(
      tmp_path,
      data_dir,
      {
        "training.total_steps": STEPS,
        "mesh.fsdp": 2,
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
  assert "Process 1/2" in outs[1]
  params, step = saved_params(tmp_path)
  assert step == STEPS
  assert_params_close(params, saved_params(straight_dir)[0], rtol=1e-5, atol=1e-5)
  # Evaluation on two processes: each predicts its own images, the metrics are gathered once.
  with open(tmp_path / "results.json") as f:
    two = json.load(f)
  one = straight_run[1]
  assert two["num_images"] == one["num_images"] == 8
  for key in ("PQ", "mIoU", "AP"):
    assert abs(two[key] - one[key]) < 1.0, (key, two[key], one[key])
