"""Model configuration defaults (ml_collections).

The model code in `mpformer_jax.models` reads these fields by attribute and never imports
ml_collections, so any object with the same attributes (e.g. `types.SimpleNamespace`) works too.
"""

from __future__ import annotations

import ml_collections

# Presets for the backbones the paper uses. ResNet `depths` are bottleneck blocks per stage.
RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
SWIN_PRESETS = {
  # name: (embed_dim, depths, num_heads, window_size, pretrain_img_size)
  "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
  "small": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224),
  "base": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
  "large": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384),
}


def resnet_config(depth: int = 50, norm: str = "frozen_bn") -> ml_collections.ConfigDict:
  """ResNet-50/101 in the torchvision / detectron2 "v1.5" layout (stride in the 3x3 conv)."""
  return ml_collections.ConfigDict(
    {
      "name": "resnet",
      "resnet": {
        "depths": RESNET_DEPTHS[depth],
        "stem_width": 64,  # channels of the 7x7 stem conv
        "width": 64,  # bottleneck width of the first stage; stage i uses width * 2**i
        "norm": norm,  # "frozen_bn" (detectron2 default) or "bn" (SyncBN under sharded jit)
      },
    }
  )


def swin_config(variant: str = "tiny", drop_path_rate: float = 0.3) -> ml_collections.ConfigDict:
  """Swin-T/S/B/L as used by Mask2Former (outputs at strides 4, 8, 16, 32)."""
  embed_dim, depths, num_heads, window_size, _ = SWIN_PRESETS[variant]
  return ml_collections.ConfigDict(
    {
      "name": "swin",
      "swin": {
        "patch_size": 4,
        "embed_dim": embed_dim,
        "depths": depths,
        "num_heads": num_heads,
        "window_size": window_size,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "drop_path_rate": drop_path_rate,
        "patch_norm": True,
      },
    }
  )


def mp_former_config(
  num_classes: int = 133, backbone: str = "resnet50"
) -> ml_collections.ConfigDict:
  """MP-Former: Mask2Former without the query positional embedding, plus the mask pilot."""
  config = model_config(num_classes, backbone)
  config.decoder.query_pos_embed = False
  config.mask_pilot.enabled = True
  return config


def model_config(num_classes: int = 133, backbone: str = "resnet50") -> ml_collections.ConfigDict:
  """The Mask2Former / MP-Former network with the reference's defaults (spec section 2)."""
  if backbone.startswith("resnet"):
    backbone_cfg = resnet_config(int(backbone[len("resnet") :]))
  elif backbone.startswith("swin_"):
    backbone_cfg = swin_config(backbone[len("swin_") :])
  else:
    raise ValueError(f"model.backbone: unknown backbone {backbone!r}")
  return ml_collections.ConfigDict(
    {
      "num_classes": num_classes,  # K; the class head predicts K + 1 ("no object" last)
      "dtype": "float32",  # compute dtype of backbone and transformer decoder; params stay fp32
      "pixel_decoder_dtype": "float32",  # the reference runs the pixel decoder in fp32
      "backbone": backbone_cfg,
      "pixel_decoder": {
        "conv_dim": 256,
        "mask_dim": 256,
        "num_layers": 6,  # MSDeformAttn encoder layers
        "num_heads": 8,
        "num_points": 4,
        "ffn_dim": 1024,
        "num_levels": 3,  # res3..res5 go through the deformable encoder
        "common_stride": 4,
        # MSDA op: None (best available), "xla", "pallas_gpu" or "pallas_tpu".
        "msda_implementation": ml_collections.FieldReference(None, field_type=str),
        # Run a Pallas kernel in interpret mode (slow; for checking a kernel on a CPU).
        "msda_interpret": False,
      },
      "decoder": {
        "hidden_dim": 256,
        "num_queries": 100,
        "num_heads": 8,
        "ffn_dim": 2048,
        "num_layers": 9,  # 3 rounds over the 1/32, 1/16, 1/8 levels; 10 predictions
        "pre_norm": False,
        "enforce_input_proj": False,
        # Learnable query positional embedding: on for Mask2Former, off for MP-Former, which
        # removes `query_embed` (spec sections 2.4 and 7).
        "query_pos_embed": True,
      },
      # MP-Former's mask-piloted training (spec section 1); off gives plain Mask2Former.
      "mask_pilot": {
        "enabled": False,
        "groups": 1,  # NUM_DN (released script: 1)
        "label_noise_ratio": 0.2,  # LB_NOISE_RATIO (released: 0.2)
        "noise_scale": 0.0,  # NOISE_SCALE of the point noise (released: 0.0)
        "all_layers": True,  # ALL_LY_DN (released: True); False = layers 0..3 only
        # Images per reference GPU: the reference sizes the MP block by the largest GT count of
        # its per-GPU batch (4 images in every released config).
        "group_size": 4,
      },
    }
  )


def loss_config() -> ml_collections.ConfigDict:
  """The set-prediction objective (spec section 3); fields of `losses.criterion.LossConfig`."""
  return ml_collections.ConfigDict(
    {
      "class_weight": 2.0,
      "mask_weight": 5.0,
      "dice_weight": 5.0,
      "no_object_weight": 0.1,
      "num_points": 12544,
      "oversample_ratio": 3.0,
      "importance_sample_ratio": 0.75,
      "matcher": "scipy",  # host Hungarian (scipy) or "optax" (on device)
      # The reference's matcher uses the loss weights; Hugging Face's uses class 1.0.
      "matcher_class_weight": 2.0,
      "matcher_mask_weight": 5.0,
      "matcher_dice_weight": 5.0,
      "group_size": 4,  # images per reference GPU (sizes the MP block's `max_num`)
      "mask_pilot_class_loss": True,
      # Mask losses: each image's valid pairs in chunks of this many; padding is skipped.
      "pair_chunk": 8,
    }
  )


def optimizer_config() -> ml_collections.ConfigDict:
  """AdamW with the reference's parameter groups (spec section 3, "Optimizer and AMP")."""
  return ml_collections.ConfigDict(
    {
      "learning_rate": 1e-4,
      "weight_decay": 0.05,
      "b1": 0.9,
      "b2": 0.999,
      "eps": 1e-8,
      "backbone_multiplier": 0.1,
      "clip_norm": 0.01,  # full-model L2 clipping; 0 disables
      "schedule": "poly",  # "poly" (WarmupPolyLR), "step" (WarmupMultiStepLR) or "constant"
      "poly_power": 0.9,
      "decay_steps": (),  # "step": steps at which the rate is multiplied by decay_factor
      "decay_factor": 0.1,
      "warmup_steps": 0,
      "warmup_factor": 1.0,
    }
  )


def training_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      "total_steps": 368750,
      "global_batch_size": 16,
      "accumulation_steps": 1,
      "remat": False,
      # Cut each batch's ground-truth slots to the smallest of these sizes (or
      # dataset.max_gt) that holds its largest segment count: the train step compiles once
      # per size met, and matching, losses and the mask pilot's block shrink with the slots
      # (training.slot_buckets). (): always dataset.max_gt slots.
      "gt_slot_buckets": (),
      "log_every": 50,
      "checkpoint_every": 5000,
      "keep_checkpoints": 3,
      "max_nonfinite_steps": 10,  # consecutive skipped updates before training stops
      # A TensorBoard profile (WORKDIR/tensorboard) of `profile_steps` steps from
      # `profile_first_step`; 0 steps: no profile.
      "profile_first_step": 10,
      "profile_steps": 0,
      "init_from": "",  # a converted checkpoint directory (python -m mpformer_jax.convert)
    }
  )


def evaluation_config() -> ml_collections.ConfigDict:
  """Evaluation during and after training (post-processing per spec section 5)."""
  return ml_collections.ConfigDict(
    {
      "every_steps": 0,  # evaluate every N training steps (0: only after the last step)
      "at_end": True,  # evaluate after the last step (results.json gets the metrics)
      "batch_size": 8,  # global eval batch (a multiple of the device count)
      "num_overlays": 4,  # [image | ground truth | prediction] pictures per evaluation
      "object_mask_threshold": 0.8,
      "overlap_threshold": 0.8,
      "top_k": 100,  # instance results per image (TEST.DETECTIONS_PER_IMAGE)
      "checkpoint_step": -1,  # --mode eval: the checkpoint to evaluate (-1: the latest)
    }
  )


def base_config(model: ml_collections.ConfigDict, dataset: ml_collections.ConfigDict):
  """A whole run: model, data, objective, optimiser, loop, mesh and multi-host settings."""
  config = ml_collections.ConfigDict(
    {
      "seed": 0,
      "model": model,
      "dataset": dataset,
      "loss": loss_config(),
      "optimizer": optimizer_config(),
      "training": training_config(),
      "evaluation": evaluation_config(),
      "mesh": {"fsdp": 1},  # devices per parameter-sharding group (1: pure data parallel)
      # jax.distributed.initialize(); on TPU pods and SLURM/Cloud the arguments are found
      # automatically, so `enabled` is all that is needed there.
      "distributed": {
        "enabled": False,
        "coordinator_address": "",
        "num_processes": 0,
        "process_id": -1,
      },
      # Keep freed host memory in the process (glibc malloc), so XLA:CPU's per-step buffers
      # are not page-faulted in again every step: "auto" (on when JAX runs on the CPU), "on",
      # "off". See mpformer_jax/host_memory.py.
      "host": {"keep_freed_memory": "auto"},
    }
  )
  # One number, two readers: the objective's normalisers and the mask pilot's block size both
  # follow the reference's images per GPU; setting either field sets both.
  config.loss.group_size = config.model.mask_pilot.get_ref("group_size")
  return config
