"""Trains, evaluates and applies MP-Former / Mask2Former.

  python main.py --config configs/synthetic.py --workdir /tmp/run [--config.key=value ...]
  python main.py --config ... --workdir /tmp/run --mode eval
  python main.py --config ... --workdir /tmp/run --mode predict --input DIR_OR_GLOB --output DIR

Checkpoints go to WORKDIR/checkpoints (a restart resumes from the newest one), metrics to
WORKDIR/tensorboard and WORKDIR/metrics.jsonl, the final figures to WORKDIR/results.json.
`--mode predict` writes COCO panoptic PNGs + JSON, semantic PNGs, COCO instance results and
overlay pictures for every image of `--input` (see `mpformer_jax/evaluation/export.py`).
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Configuration file.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval", "predict"],
  "train: train (resuming from WORKDIR's newest checkpoint) and evaluate; eval: evaluate the "
  "checkpoint `--config.evaluation.checkpoint_step` (default: the newest) of WORKDIR; predict: "
  "apply that checkpoint to the images of --input and write the results to --output.",
)
flags.DEFINE_string("input", None, "--mode predict: a directory of images or a glob pattern.")
flags.DEFINE_string("output", None, "--mode predict: where the predictions go.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.mode == "predict" and not (FLAGS.input and FLAGS.output):
    raise app.UsageError("--mode predict needs --input (images) and --output (a directory)")
  config = FLAGS.config
  from mpformer_jax import host_memory

  # Before JAX starts a backend: threads choose their malloc arena at their first allocation.
  kept = host_memory.configure(config.host.keep_freed_memory)
  import jax

  if config.distributed.enabled:
    d = config.distributed
    kwargs = {}
    if d.coordinator_address:
      kwargs = dict(
        coordinator_address=d.coordinator_address,
        num_processes=d.num_processes,
        process_id=d.process_id,
      )
    jax.distributed.initialize(**kwargs)
  logging.info(
    "Process %d/%d, %d local / %d global devices (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.default_backend(),
  )
  logging.info(
    "Host memory (host.keep_freed_memory=%s): %s",
    config.host.keep_freed_memory,
    "freed memory is kept in the process" if kept else "glibc's defaults",
  )
  logging.info("Config:\n%s", config)

  from mpformer_jax.training import trainer

  if FLAGS.mode == "predict":
    from mpformer_jax.training import prediction

    written = prediction.predict_files(config, FLAGS.workdir, FLAGS.input, FLAGS.output)
    print(f"Predicted {written['num_images']} images with step {written['step']}:")
    if written["num_enlarged"]:
      print(
        f"  {written['num_enlarged']} larger than dataset.eval_original_size: predicted "
        "smaller, maps enlarged by nearest neighbour"
      )
    for key, path in written.items():
      if key not in ("num_images", "step", "num_enlarged"):
        print(f"  {key}: {path}")
    return
  if FLAGS.mode == "train":
    results = trainer.train_and_evaluate(config, FLAGS.workdir)
    results.pop("state")
  else:
    results = trainer.evaluate_checkpoint(config, FLAGS.workdir)
  if jax.process_index() == 0:
    _print_summary(results, FLAGS.workdir)


def _print_summary(results: dict, workdir: str) -> None:
  """The headline numbers and where everything is, for people at a terminal."""
  import os

  keys = ("PQ", "PQ_th", "PQ_st", "mIoU", "AP", "AP50", "train_loss", "images_per_sec")
  shown = ", ".join(f"{k} {results[k]:.2f}" for k in keys if k in results)
  print(f"Step {results['step']}: {shown}")
  print(f"Results: {os.path.join(workdir, 'results.json')}")
  if "overlays_dir" in results:
    print(f"Pictures ([image | ground truth | prediction]): {results['overlays_dir']}")
  print(f"TensorBoard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")


if __name__ == "__main__":
  app.run(main)
