"""Our Flax model vs the Hugging Face PyTorch Mask2Former, side by side in one run.

Same network and weights on both sides (the Hugging Face model is converted with
`hf_mask2former.load`): ResNet-50, 100 queries, 150 classes, 6 deformable encoder layers,
9 decoder layers. Both run float32 on the CPU with the same number of threads.

- forward: inference (`train=False`; PyTorch under `no_grad`).
- forward+backward: gradients of a scalar (mean square of every class and mask logit of all 10
  predictions) w.r.t. every trainable parameter. BatchNorm uses running statistics on both sides
  (our FrozenBatchNorm; PyTorch in eval mode), as in Mask2Former's R50 training.

- train_step (`--train-step`): one whole optimisation step at the reference's objective:
  Hungarian matching (ours: scipy on the host), point-sampled class/mask/dice losses on all
  10 predictions with 12544 points, backward, AdamW with clipping at 0.01. Ours is the
  project's `make_train_step` with its optimiser; PyTorch is the model's own loss
  (`mask_labels` / `class_labels`), `clip_grad_norm_` and `torch.optim.AdamW`. Both keep
  BatchNorm statistics frozen. Ground truth: `--segments` random segments per image, padded
  to `--max-gt` slots on our side (HF takes lists of the real ones).

Both sides run in this one process and share its allocator. By default (`--host-memory keep`)
glibc keeps freed memory in the process, as `main.py` sets it on a CPU (see
`mpformer_jax/host_memory.py`): with glibc's defaults both sides page-fault their large
per-step buffers in anew on every call, which cost either side 20-35% of its time on this
2-core machine. `--host-memory system` measures with glibc's defaults.

Runs alternate in blocks (ours x runs, PyTorch x runs, repeated) so that slow drifts of a shared
machine hit both alike. Each block starts with an untimed run, because the first run after the
other framework's is slow for either side. The JSON reports medians and the ratio
ours / PyTorch (below 1.0: we are faster).

Usage: .venv/bin/python experiments/benchmark.py [--sizes 256 512] [--batch 2] [--runs 2]
  [--blocks 4] [--parts] [--train-step [--segments 10] [--max-gt 16]] [--no-inference]
  [--host-memory keep|system]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpformer_jax import host_memory, models  # noqa: E402
from mpformer_jax.convert import hf_mask2former  # noqa: E402
from mpformer_jax.convert.common import to_numpy_state_dict  # noqa: E402


def hf_model(num_queries: int, num_classes: int):
  import torch
  from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

  backbone = ResNetConfig(
    embedding_size=64,
    hidden_sizes=[256, 512, 1024, 2048],
    depths=[3, 4, 6, 3],
    layer_type="bottleneck",
    out_features=["stage1", "stage2", "stage3", "stage4"],
  )
  config = Mask2FormerConfig(
    backbone_config=backbone,
    num_queries=num_queries,
    id2label={i: str(i) for i in range(num_classes)},
  )
  torch.manual_seed(0)
  return config, Mask2FormerForUniversalSegmentation(config).eval()


def _scalar_loss_jax(out):
  preds = [out] + list(out["aux_outputs"])
  return sum(jnp.mean(p["pred_logits"] ** 2) + jnp.mean(p["pred_masks"] ** 2) for p in preds)


def _scalar_loss_torch(out):
  preds = list(out.auxiliary_logits) + [
    {
      "class_queries_logits": out.class_queries_logits,
      "masks_queries_logits": out.masks_queries_logits,
    }
  ]
  return sum(
    (p["class_queries_logits"] ** 2).mean() + (p["masks_queries_logits"] ** 2).mean() for p in preds
  )


def _time(fn, runs: int, times: list[float]) -> None:
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(1e3 * (time.perf_counter() - start))


def _compare(ours, theirs, runs: int, blocks: int) -> dict[str, float]:
  """Median ms of both sides, measured in alternating blocks after a warm-up."""
  start = time.perf_counter()
  jax.block_until_ready(ours())
  first_call_s = time.perf_counter() - start
  theirs()
  ours_ms, theirs_ms = [], []
  for _ in range(blocks):
    for fn, times in ((ours, ours_ms), (theirs, theirs_ms)):
      time.sleep(1.0)
      # The first run after the other framework ran is slow for either side (its caches and
      # heap are cold: measured up to +50%), so each block starts with an untimed run.
      jax.block_until_ready(fn())
      _time(fn, runs, times)
  return {
    "ours_ms": round(float(np.median(ours_ms)), 1),
    "pytorch_ms": round(float(np.median(theirs_ms)), 1),
    "ratio": round(float(np.median(ours_ms) / np.median(theirs_ms)), 3),
    "ours_first_call_s": round(first_call_s, 1),
  }


def _part_cases(model, variables, torch_model, x_jax, x_torch):
  """Forward+backward of each of the three parts alone, on the same inputs on both sides."""
  import torch

  params, stats = variables["params"], variables["batch_stats"]
  mean_sq = lambda tree: sum(jnp.mean(jnp.square(t)) for t in jax.tree.leaves(tree))

  @jax.jit
  def backbone(p, x):
    apply = lambda p: mean_sq(
      model.backbone.apply({"params": p, "batch_stats": stats["backbone"]}, x)
    )
    return jax.grad(apply)(p)

  feats = jax.jit(
    lambda p, x: model.backbone.apply({"params": p, "batch_stats": stats["backbone"]}, x)
  )(params["backbone"], x_jax)

  @jax.jit
  def pixel_decoder(p, feats):
    return jax.grad(lambda p, f: mean_sq(model.pixel_decoder.apply({"params": p}, f)), (0, 1))(
      p, feats
    )

  mask_features, multi_scale = jax.jit(model.pixel_decoder.apply)(
    {"params": params["pixel_decoder"]}, feats
  )

  @jax.jit
  def transformer_decoder(p, multi_scale, mask_features):
    apply = lambda p: _scalar_loss_jax(
      model.transformer_decoder.apply({"params": p}, multi_scale, mask_features)
    )
    return jax.grad(apply)(p)

  plm = torch_model.model.pixel_level_module
  tmod = torch_model.model.transformer_module
  torch_mean_sq = lambda ts: sum((t**2).mean() for t in ts)
  with torch.no_grad():
    t_feats = [f.detach() for f in plm.encoder(x_torch).feature_maps]
    t_dec = plm.decoder(t_feats)
  t_feats = [f.requires_grad_(True) for f in t_feats]
  t_ms = [m.detach() for m in t_dec.multi_scale_features]
  t_mf = t_dec.mask_features.detach()

  def torch_backbone():
    out = plm.encoder(x_torch).feature_maps
    return torch.autograd.grad(torch_mean_sq(out), list(plm.encoder.parameters()))

  def torch_pixel_decoder():
    out = plm.decoder(t_feats)
    loss = torch_mean_sq([out.mask_features, *out.multi_scale_features])
    return torch.autograd.grad(loss, list(plm.decoder.parameters()) + t_feats)

  def torch_transformer_decoder():
    out = tmod(t_ms, t_mf, output_hidden_states=True)
    logits = [
      torch_model.class_predictor(h.transpose(0, 1)) for h in out.intermediate_hidden_states
    ]
    loss = torch_mean_sq(logits) + torch_mean_sq(out.masks_queries_logits)
    trainable = list(tmod.parameters()) + list(torch_model.class_predictor.parameters())
    return torch.autograd.grad(loss, trainable)

  return [
    ("part_backbone_fwd_bwd", lambda: backbone(params["backbone"], x_jax), torch_backbone),
    (
      "part_pixel_decoder_fwd_bwd",
      lambda: pixel_decoder(params["pixel_decoder"], feats),
      torch_pixel_decoder,
    ),
    (
      "part_transformer_decoder_fwd_bwd",
      lambda: transformer_decoder(params["transformer_decoder"], multi_scale, mask_features),
      torch_transformer_decoder,
    ),
  ]


def random_ground_truth(rng, batch: int, size: int, count: int, max_gt: int, num_classes: int):
  """`count` segments per image (a random partition of 16 x 16 blocks), ours and HF's form.

  Returns:
    `(Targets, mask_labels, class_labels)`: our padded targets and HF's per-image lists of
    float `[n, H, W]` masks and int64 `[n]` labels.
  """
  import torch

  from mpformer_jax.targets import Targets

  cells = size // 16
  seg = np.zeros((batch, size, size), np.int32)
  for b in range(batch):
    owner = np.concatenate([np.arange(count), rng.integers(0, count, cells * cells - count)])
    owner = rng.permutation(owner).reshape(cells, cells) + 1
    seg[b] = np.kron(owner, np.ones((16, 16), np.int32))
  ids = np.zeros((batch, max_gt), np.int32)
  ids[:, :count] = np.arange(1, count + 1)
  labels = np.zeros((batch, max_gt), np.int32)
  labels[:, :count] = rng.integers(0, num_classes, (batch, count))
  targets = Targets(segment_ids=seg, ids=ids, labels=labels, valid=ids > 0)
  mask_labels = [
    torch.from_numpy((seg[b][None] == ids[b, :count, None, None]).astype(np.float32))
    for b in range(batch)
  ]
  class_labels = [torch.from_numpy(labels[b, :count].astype(np.int64)) for b in range(batch)]
  return targets, mask_labels, class_labels


def train_step_cases(model, variables, torch_model, x_np, ground_truth, batch: int):
  """Ours (`make_train_step` + the project's AdamW) and HF's whole training step."""
  import torch

  from mpformer_jax import config_lib
  from mpformer_jax.losses.criterion import LossConfig
  from mpformer_jax.training import optimizer
  from mpformer_jax.training.train_step import create_train_state, make_train_step

  targets, mask_labels, class_labels = ground_truth
  opt_config = config_lib.optimizer_config()  # AdamW 1e-4, wd 0.05, backbone x0.1, clip 0.01
  tx = optimizer.create_optimizer(opt_config, 100_000, variables["params"])
  loss_cfg = LossConfig(group_size=batch)  # 12544 points, weights 2/5/5, scipy matcher
  step = jax.jit(make_train_step(model, loss_cfg, tx))
  state = create_train_state(variables, tx, jax.random.PRNGKey(0))
  x_jax = jax.device_put(x_np)

  def ours():
    # The step is not donated here, so every call starts from the same state.
    return step(state, x_jax, targets)[1]["loss"]

  x_torch = torch.from_numpy(np.ascontiguousarray(np.transpose(x_np, (0, 3, 1, 2))))
  trainable = [p for p in torch_model.parameters() if p.requires_grad]
  torch_opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05)

  def theirs():
    torch_opt.zero_grad(set_to_none=True)
    out = torch_model(x_torch, mask_labels=mask_labels, class_labels=class_labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 0.01)
    torch_opt.step()
    return out.loss

  return [("train_step", ours, theirs)]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--runs", type=int, default=2, help="runs per block")
  parser.add_argument("--blocks", type=int, default=4, help="alternating blocks per side")
  parser.add_argument("--queries", type=int, default=100)
  parser.add_argument("--classes", type=int, default=150)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--parts", action="store_true", help="also time each part alone")
  parser.add_argument("--train-step", action="store_true", help="also time a whole train step")
  parser.add_argument("--no-inference", action="store_true", help="skip forward(+backward)")
  parser.add_argument("--segments", type=int, default=10, help="GT segments per image")
  parser.add_argument("--max-gt", type=int, default=16, help="our padded GT slots per image")
  parser.add_argument(
    "--host-memory",
    choices=("keep", "system"),
    default="keep",
    help="keep: glibc keeps freed memory (main.py's default on a CPU; both sides share it, "
    "being one process); system: glibc's defaults",
  )
  args = parser.parse_args()
  # Before either framework starts its threads (they pick their malloc arena then).
  kept = args.host_memory == "keep" and host_memory.keep_freed_memory()

  import torch

  torch.set_num_threads(args.threads)
  hf_config, torch_model = hf_model(args.queries, args.classes)
  config, variables = hf_mask2former.load(to_numpy_state_dict(torch_model.state_dict()), hf_config)
  model = models.build_model(config)
  variables = jax.device_put(variables)
  params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))

  @jax.jit
  def forward_backward(params, rest, x):
    def loss_fn(p):
      return _scalar_loss_jax(model.apply({"params": p, **rest}, x, train=False))

    return jax.value_and_grad(loss_fn)(params)

  torch_params = [p for p in torch_model.parameters() if p.requires_grad]

  def torch_forward(x):
    with torch.no_grad():
      return torch_model(x, output_auxiliary_logits=True)

  def torch_forward_backward(x):
    torch_model.zero_grad(set_to_none=True)
    loss = _scalar_loss_torch(torch_model(x, output_auxiliary_logits=True))
    return torch.autograd.grad(loss, torch_params)

  results = {
    "machine": {
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "torch": torch.__version__,
      "torch_threads": torch.get_num_threads(),
      "host_memory_kept": kept,
    },
    "config": {
      "backbone": "resnet50",
      "batch": args.batch,
      "queries": args.queries,
      "classes": args.classes,
      "runs_per_block": args.runs,
      "segments": args.segments,
      "max_gt": args.max_gt,
      "blocks": args.blocks,
    },
    "sizes": {},
  }
  rng = np.random.default_rng(0)
  for size in args.sizes:
    x_np = rng.standard_normal((args.batch, size, size, 3)).astype(np.float32)
    x_jax = jax.device_put(x_np)
    x_torch = torch.from_numpy(np.ascontiguousarray(np.transpose(x_np, (0, 3, 1, 2))))
    cases = []
    if not args.no_inference:
      cases += [
        ("forward", partial(forward, variables, x_jax), partial(torch_forward, x_torch)),
        (
          "forward_backward",
          partial(forward_backward, params, rest, x_jax),
          partial(torch_forward_backward, x_torch),
        ),
      ]
    if args.train_step:
      ground_truth = random_ground_truth(
        rng, args.batch, size, args.segments, args.max_gt, args.classes
      )
      cases += train_step_cases(model, variables, torch_model, x_np, ground_truth, args.batch)
    if args.parts:
      cases += _part_cases(model, variables, torch_model, x_jax, x_torch)
    entry = {}
    for name, ours, theirs in cases:
      entry[name] = _compare(ours, theirs, args.runs, args.blocks)
      print(json.dumps({"size": size, name: entry[name]}), file=sys.stderr, flush=True)
    results["sizes"][str(size)] = entry
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
