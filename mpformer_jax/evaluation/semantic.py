"""Semantic segmentation metrics: a fixed-shape confusion matrix on device, scores on host.

The scores follow detectron2's `SemSegEvaluator` (re-derived from its definitions):

- `confusion[g, p]` counts pixels of ground-truth class `g` predicted as `p` (rows gt, columns
  prediction); `tp = diag`, `gt_count = row sums`, `pred_count = column sums`;
- a class is *present* when `gt_count > 0`; only present classes get an accuracy
  `tp / gt_count` and an IoU `tp / (gt_count + pred_count - tp)`, the others are NaN;
- `mACC` averages the accuracies of present classes;
- `mIoU` sums the IoUs of present classes but divides by the number of classes that occur in
  the ground truth *or* the predictions: a class that is only predicted (a pure false positive)
  counts as an IoU of 0, a class absent from both is left out;
- `fwIoU` weights each present class's IoU by its share of ground-truth pixels;
- `pACC = sum(tp) / sum(gt_count)`.

All scores are percentages (0..100), as detectron2 reports them.

Counting precision: one `confusion_matrix` call counts in int32, so a batch may hold at most
2^31 - 1 evaluated pixels (about 2,000 images of 1024 x 1024). Across batches, the CLU metric
`ConfusionMatrix` keeps each count as two int32 words (low 30 bits and the rest), so merging on
device stays exact up to 2^61 pixels per cell; `ConfusionMatrix.confusion()` returns int64 on
host. Host-side accumulation of `confusion_matrix` results should likewise sum in int64.

`confusion_matrix` and `semantic_metrics` need only jax and numpy; `ConfusionMatrix` imports
`clu` when it is first accessed, so this module imports without clu installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# `ConfusionMatrix` splits every count into `high * 2^_LOW_BITS + low` with `0 <= low < 2^30`,
# so that the sum of two low words (< 2^31) never overflows int32 before the carry is taken.
_LOW_BITS = 30
_LOW_MASK = (1 << _LOW_BITS) - 1


def confusion_matrix(
  pred: jax.Array,
  gt: jax.Array,
  num_classes: int,
  ignore_label: int = 255,
  valid: jax.Array | None = None,
) -> jax.Array:
  """Pixel confusion matrix of a batch, with fixed shapes (jit-able).

  One bincount of `gt * K + pred` over all pixels; pixels that must not count are routed to an
  extra dump bin `K * K` that is dropped afterwards, so no shape depends on the data.

  A pixel is ignored when its gt is `ignore_label` or outside `[0, K)`, when its image (or the
  pixel itself) is not `valid`, or when its prediction is outside `[0, K)` (an argmax over `K`
  classes never is; detectron2 likewise only scores the `K x K` block).

  Args:
    pred: int `[B, H, W]` predicted class of each pixel.
    gt: int `[B, H, W]` ground-truth class of each pixel.
    num_classes: `K`, the number of classes.
    ignore_label: gt value of unlabeled pixels.
    valid: optional bool `[B]` (whole images, e.g. batch padding) or `[B, H, W]` (pixels, e.g.
      image padding); `None` counts every image.

  Returns:
    int32 `[K, K]`, rows gt class, columns predicted class. Counts are exact while the batch
    has fewer than 2^31 pixels.
  """
  k = num_classes
  pred = jnp.asarray(pred).astype(jnp.int32)
  gt = jnp.asarray(gt).astype(jnp.int32)
  if pred.shape != gt.shape:
    raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ in shape")
  keep = (gt >= 0) & (gt < k) & (gt != ignore_label) & (pred >= 0) & (pred < k)
  if valid is not None:
    valid = jnp.asarray(valid).astype(bool)
    # A per-image [B] mask broadcasts over the trailing pixel dimensions.
    keep &= valid.reshape(valid.shape + (1,) * (gt.ndim - valid.ndim))
  index = jnp.where(keep, gt * k + pred, k * k)
  counts = jnp.bincount(index.reshape(-1), length=k * k + 1)
  return counts[: k * k].reshape(k, k).astype(jnp.int32)


def semantic_metrics(
  confusion: np.ndarray | jax.Array, class_names: Sequence[str] | None = None
) -> dict[str, float]:
  """detectron2's semantic segmentation scores of a confusion matrix, in percent.

  Args:
    confusion: `[K, K]` pixel counts, rows gt class, columns predicted class (any int or float
      dtype; counted in float64).
    class_names: `K` names for the per-class keys; default `"0" .. "K-1"`.

  Returns:
    `mIoU`, `fwIoU`, `mACC`, `pACC` and, for every class, `IoU-<name>` and `ACC-<name>` (NaN for
    classes absent from the ground truth). The means are NaN when no pixel was evaluated.
  """
  conf = np.asarray(confusion, dtype=np.float64)
  k = conf.shape[0]
  if conf.shape != (k, k):
    raise ValueError(f"confusion must be square, got {conf.shape}")
  if class_names is None:
    class_names = [str(i) for i in range(k)]
  if len(class_names) != k:
    raise ValueError(f"{len(class_names)} class names for {k} classes")

  tp = np.diag(conf)
  gt_count = conf.sum(axis=1)
  pred_count = conf.sum(axis=0)
  present = gt_count > 0
  occurs = (gt_count + pred_count) > 0
  acc = np.full(k, np.nan)
  iou = np.full(k, np.nan)
  acc[present] = tp[present] / gt_count[present]
  iou[present] = tp[present] / (gt_count + pred_count - tp)[present]
  total = gt_count.sum()

  with np.errstate(invalid="ignore", divide="ignore"):  # empty matrix: NaN means
    results = {
      "mIoU": 100 * iou[present].sum() / occurs.sum(),
      "fwIoU": 100 * np.sum(iou[present] * gt_count[present] / total),
      "mACC": 100 * acc[present].sum() / present.sum(),
      "pACC": 100 * tp.sum() / total,
    }
  if total == 0:
    results["fwIoU"] = float("nan")  # an empty sum would read as 0
  for i, name in enumerate(class_names):
    results[f"IoU-{name}"] = 100 * iou[i]
  for i, name in enumerate(class_names):
    results[f"ACC-{name}"] = 100 * acc[i]
  return {key: float(value) for key, value in results.items()}


def _split(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Non-negative int32 counts -> (low 30 bits, high bits)."""
  return counts & _LOW_MASK, counts >> _LOW_BITS


def _confusion_matrix_metric() -> type:
  """Builds the CLU metric class; clu is imported here so the module works without it."""
  import flax
  from clu import metrics as clu_metrics

  configured = {}  # (base, num_classes, ignore_label, class_names) -> configured subclass

  @flax.struct.dataclass
  class ConfusionMatrix(clu_metrics.Metric):
    """CLU metric accumulating the semantic confusion matrix; `compute()` gives the scores.

    The number of classes is static, so the class is configured before use:

      Sem = ConfusionMatrix.configure(num_classes=K, class_names=names)
      Metrics = clu.metrics.Collection.create(sem_seg=Sem)
      update = Metrics.single_from_model_output(sem_seg_pred=p, sem_seg_gt=g, mask=valid)

    Every field is an array, so the metric is jit-able, mergeable across steps and reducible
    across devices (`Collection.gather_from_model_output`).

    Attributes:
      low: int32 `[K, K]` low 30 bits of each count (rows gt, columns prediction).
      high: int32 `[K, K]` the count's remaining bits (`count = high * 2^30 + low`).
    """

    low: jax.Array
    high: jax.Array

    # Static configuration, set by `configure` on a subclass (class variables, not fields).
    num_classes = None
    ignore_label = 255
    class_names = None

    @classmethod
    def configure(
      cls,
      num_classes: int,
      ignore_label: int = 255,
      class_names: Sequence[str] | None = None,
    ) -> type:
      """A subclass with the static settings of one dataset.

      The same settings give the same class, so metrics configured in different places still
      merge and share one pytree structure (no retracing).
      """
      if class_names is not None:
        if len(class_names) != num_classes:
          raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        class_names = tuple(class_names)
      key = (cls, int(num_classes), int(ignore_label), class_names)
      if key not in configured:
        attrs = {"num_classes": key[1], "ignore_label": key[2], "class_names": class_names}
        configured[key] = flax.struct.dataclass(type(cls.__name__, (cls,), attrs))
      return configured[key]

    @classmethod
    def _check_configured(cls) -> int:
      if cls.num_classes is None:
        raise ValueError("call ConfusionMatrix.configure(num_classes=...) first")
      return cls.num_classes

    @classmethod
    def empty(cls):
      k = cls._check_configured()
      zeros = jnp.zeros((k, k), jnp.int32)
      return cls(low=zeros, high=zeros)

    @classmethod
    def from_model_output(
      cls,
      sem_seg_pred: jax.Array,
      sem_seg_gt: jax.Array,
      mask: jax.Array | None = None,
      **_: Any,
    ):
      """Counts one batch.

      Args:
        sem_seg_pred: int `[B, H, W]` predicted classes.
        sem_seg_gt: int `[B, H, W]` ground-truth classes (`ignore_label` = unlabeled).
        mask: optional bool `[B]` or `[B, H, W]` (CLU's name for valid examples).
      """
      k = cls._check_configured()
      counts = confusion_matrix(sem_seg_pred, sem_seg_gt, k, cls.ignore_label, mask)
      low, high = _split(counts)
      return cls(low=low, high=high)

    def merge(self, other):
      low, carry = _split(self.low + other.low)  # both < 2^30: the sum fits int32
      return type(self)(low=low, high=self.high + other.high + carry)

    def confusion(self) -> np.ndarray:
      """int64 `[K, K]` counts, on host."""
      low = np.asarray(self.low, dtype=np.int64)
      high = np.asarray(self.high, dtype=np.int64)
      return (high << _LOW_BITS) + low

    def compute(self) -> dict[str, float]:
      """`semantic_metrics` of the accumulated counts (host only, not jit-able)."""
      return semantic_metrics(self.confusion(), self.class_names)

    def compute_value(self):
      # A dict is no `clu.values.Scalar`; the headline score stands for the metric.
      from clu import values

      return values.Scalar(self.compute()["mIoU"])

  return ConfusionMatrix


def __getattr__(name: str):
  # Module-level lazy attribute (PEP 562): `ConfusionMatrix` is built, and clu imported, on
  # first access only.
  if name == "ConfusionMatrix":
    cls = _confusion_matrix_metric()
    globals()[name] = cls
    return cls
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
