"""Tests for `mpformer_jax.evaluation.postprocess`.

References: torch `F.interpolate` for the resizes, the Hugging Face PIL image processor's
post-processing on inputs where its rules agree with detectron2's, hand-made examples where they
do not, and a straight numpy transcription of the reference's `panoptic_inference` loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpformer_jax.evaluation import postprocess as pp

HF_SIZE = 384  # HF always resizes the mask logits to 384x384 first: feed that size.


@functools.cache
def _hf_processor():
  from transformers.models.mask2former.image_processing_pil_mask2former import (
    Mask2FormerImageProcessorPil,
  )

  return Mask2FormerImageProcessorPil()


def _hf_outputs(pred_logits, mask_logits):
  from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerForUniversalSegmentationOutput,
  )

  return Mask2FormerForUniversalSegmentationOutput(
    class_queries_logits=torch.from_numpy(np.asarray(pred_logits, np.float32)),
    masks_queries_logits=torch.from_numpy(np.asarray(mask_logits, np.float32)),
  )


def _torch_resize(x: np.ndarray, size) -> np.ndarray:
  t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
  return F.interpolate(t, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# Resizing.


@pytest.mark.parametrize("size", [(28, 36), (5, 4), (13, 17), (7, 9)])
def test_upsample_masks_matches_torch(size):
  x = np.random.default_rng(0).normal(size=(2, 3, 7, 9)).astype(np.float32)
  ours = jax.jit(pp.upsample_masks, static_argnums=1)(jnp.asarray(x), size)
  np.testing.assert_allclose(np.asarray(ours), _torch_resize(x, size).numpy(), atol=1e-5)


def test_resize_to_original_matches_torch_per_example():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(5, 3, 20, 24)).astype(np.float32)
  # (crop h, crop w), (original h, original w): up, down, mixed, identity, full-size crop.
  resized = np.array([[20, 24], [13, 9], [7, 18], [11, 11], [1, 2]], np.int32)
  original = np.array([[40, 30], [5, 4], [9, 7], [11, 11], [3, 1]], np.int32)
  out_size = (41, 33)
  masks, valid = jax.jit(pp.resize_to_original, static_argnums=3)(
    jnp.asarray(x), resized, original, out_size
  )
  masks, valid = np.asarray(masks), np.asarray(valid)
  assert masks.shape == (5, 3, *out_size) and valid.shape == (5, *out_size)
  for b in range(5):
    (rh, rw), (oh, ow) = resized[b], original[b]
    want = _torch_resize(x[b : b + 1, :, :rh, :rw], (oh, ow))[0].numpy()
    np.testing.assert_allclose(masks[b, :, :oh, :ow], want, atol=1e-5)
    canvas = np.zeros(out_size, bool)
    canvas[:oh, :ow] = True
    np.testing.assert_array_equal(valid[b], canvas)
    assert not masks[b][:, ~canvas].any()


def test_resize_to_original_skips_the_identity_resize_exactly():
  """Canvas = input size and every image at its size: the crop alone, equal to the resize."""
  x = np.random.default_rng(2).normal(size=(3, 2, 12, 10)).astype(np.float32)
  same = np.array([[12, 10], [7, 9], [0, 0]], np.int32)  # the last: a padding example
  fn = jax.jit(pp.resize_to_original, static_argnums=3)
  masks, valid = (np.asarray(a) for a in fn(x, same, same, (12, 10)))
  general = np.asarray(pp._resize_to_original(jnp.asarray(x), same, same, (12, 10)))
  np.testing.assert_array_equal(masks, general)
  np.testing.assert_array_equal(masks[0], x[0])
  np.testing.assert_array_equal(masks[1][:, :7, :9], x[1][:, :7, :9])
  assert not masks[1][:, 7:].any() and not masks[2].any() and not valid[2].any()
  # One image that needs a resize takes the whole batch through the general path.
  mixed = same.copy()
  mixed[1] = [9, 10]
  masks, _ = fn(x, mixed, same, (12, 10))
  want = _torch_resize(x[1:2, :, :9, :10], (7, 9))[0].numpy()
  np.testing.assert_allclose(np.asarray(masks)[1, :, :7, :9], want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Structured logits: rectangles in a 12x12 grid of 32-pixel cells (384 = HF's working size).

THING, STUFF = [0, 1, 2], [3, 4, 5]
NUM_CLASSES = 6
ISTHING = np.array([c in THING for c in range(NUM_CLASSES)])


def _layout_logits(layout, rng, size=HF_SIZE, cells=12):
  """`layout`: per query `(class or None = no object, class logit, mask logit, cell rect)`."""
  cell = size // cells
  num_queries = len(layout)
  cls = rng.normal(scale=0.3, size=(num_queries, NUM_CLASSES + 1)).astype(np.float32)
  masks = rng.uniform(-5.0, -3.0, size=(num_queries, size, size)).astype(np.float32)
  for q, (label, cls_logit, mask_logit, (r0, r1, c0, c1)) in enumerate(layout):
    cls[q, NUM_CLASSES if label is None else label] += cls_logit
    noise = rng.uniform(-0.2, 0.2, size=((r1 - r0) * cell, (c1 - c0) * cell))
    masks[q, r0 * cell : r1 * cell, c0 * cell : c1 * cell] = mask_logit + noise
  return cls, masks


def _structured_batch():
  """Two layouts with kept, merged, overlapped and dropped queries, plus one with none kept.

  Fused stuff duplicates come last in query order (HF's id-reuse bug cannot show then), every
  pixel lies in a kept query's positive region and positive logits are large (so the reference's
  `& sigmoid >= 0.5` and HF's score-weighted original area cannot show), and every query has a
  non-empty positive region (HF drops empty instance masks).
  """
  rng = np.random.default_rng(2)
  layout_a = [
    (3, 8.0, 6.0, (0, 6, 0, 6)),  # q0 stuff 3, top-left; loses 4 cells to q2 (ratio .89).
    (4, 6.5, 3.0, (0, 6, 6, 12)),  # q1 stuff 4, top-right; loses 4 cells to q4.
    (0, 9.0, 9.0, (2, 4, 2, 4)),  # q2 thing 0 inside q0.
    (5, 8.0, 4.0, (6, 12, 0, 6)),  # q3 stuff 5, bottom-left; loses 4 cells to q9.
    (1, 7.0, 4.5, (0, 2, 4, 8)),  # q4 thing 1: wins over q1, loses to q0: ratio .5, dropped.
    (2, 8.0, 4.0, (6, 12, 6, 12)),  # q5 thing 2, bottom-right.
    (None, 8.0, 4.0, (3, 9, 3, 9)),  # q6 no object.
    (1, 0.5, 4.0, (8, 10, 8, 10)),  # q7 low score: not kept.
    (3, 8.0, 4.0, (5, 6, 0, 6)),  # q8 stuff 3 again, inside q0: wins nothing, dropped.
    (5, 9.0, 5.0, (10, 12, 0, 2)),  # q9 stuff 5 again, inside q3: fused into q3.
  ]
  layout_b = [
    (4, 8.0, 3.0, (0, 12, 0, 12)),  # q0 stuff 4 everywhere, loses 25 / 144 cells.
    (0, 9.0, 6.0, (1, 3, 1, 3)),  # q1 thing 0.
    (0, 9.0, 6.0, (8, 12, 8, 10)),  # q2 thing 0 (a second instance of the same class).
    (1, 8.5, 4.0, (5, 8, 5, 8)),  # q3 thing 1, loses 4 of 9 cells to q4: dropped.
    (2, 9.0, 5.0, (5, 7, 5, 7)),  # q4 thing 2.
    (None, 8.0, 5.0, (0, 4, 0, 4)),
    (None, 8.0, 5.0, (4, 8, 4, 8)),
    (3, 0.0, 5.0, (0, 2, 10, 12)),
    (5, 1.0, 5.0, (10, 12, 0, 2)),
    (4, 9.0, 5.0, (0, 2, 10, 12)),  # q9 stuff 4 again: fused into q0.
  ]
  layout_none = [(None, 8.0, 4.0, (q, q + 2, 0, 12)) for q in range(10)]
  batch = [_layout_logits(layout, rng) for layout in (layout_a, layout_b, layout_none)]
  return np.stack([c for c, _ in batch]), np.stack([m for _, m in batch])


@functools.cache
def _structured():
  return _structured_batch()


def _same_partition(ours_map, ours_labels, hf_map, hf_labels):
  """Equal up to relabelling: a bijection of ids (void <-> void) preserving the class."""
  pairs = np.unique(np.stack([ours_map.ravel(), hf_map.ravel()]), axis=1)
  assert len(np.unique(pairs[0])) == pairs.shape[1], "one of our segments maps to several"
  assert len(np.unique(pairs[1])) == pairs.shape[1], "one HF segment maps to several of ours"
  for ours_id, hf_id in pairs.T:
    assert (ours_id == 0) == (hf_id == 0)
    if ours_id:
      assert ours_labels[ours_id] == hf_labels[hf_id]


def _hf_panoptic(cls, masks, **kwargs):
  defaults = dict(threshold=0.8, overlap_mask_area_threshold=0.8, label_ids_to_fuse=set(STUFF))
  kwargs = defaults | kwargs
  kwargs["target_sizes"] = [masks.shape[-2:]] * cls.shape[0]
  return _hf_processor().post_process_panoptic_segmentation(_hf_outputs(cls, masks), **kwargs)


def _ours_panoptic(cls, masks, **kwargs):
  fn = jax.jit(pp.panoptic_inference)
  return jax.tree.map(np.asarray, fn(jnp.asarray(cls), jnp.asarray(masks), ISTHING, **kwargs))


def test_panoptic_matches_hugging_face():
  cls, masks = _structured()
  ours = _ours_panoptic(cls, masks)
  hf = _hf_panoptic(cls, masks)
  for b in range(cls.shape[0]):
    hf_map = hf[b]["segmentation"].numpy().astype(np.int64)
    hf_map[hf_map < 0] = 0  # HF marks an image without kept query -1, the reference 0.
    hf_labels = {s["id"]: s["label_id"] for s in hf[b]["segments_info"]}
    ours_labels = {q + 1: int(lab) for q, lab in enumerate(ours.segment_labels[b]) if lab >= 0}
    _same_partition(ours.segment_map[b], ours_labels, hf_map, hf_labels)
  # The layouts do exercise merging, dropping and the empty case.
  np.testing.assert_array_equal(ours.segment_labels[0], [3, 4, 0, 5, -1, 2, -1, -1, -1, -1])
  np.testing.assert_array_equal(ours.segment_labels[1], [4, 0, 0, -1, 2, -1, -1, -1, -1, -1])
  assert set(np.unique(ours.segment_map[0])) == {0, 1, 2, 3, 4, 6}
  assert (ours.segment_map[0] == 4).sum() == 36 * 32 * 32  # q3 plus fused q9.
  assert (ours.segment_labels[2] == -1).all() and (ours.segment_map[2] == 0).all()
  np.testing.assert_array_equal(
    ours.segment_isthing[0], ISTHING[ours.segment_labels[0]] & (ours.segment_labels[0] >= 0)
  )


def test_semantic_matches_hugging_face():
  cls, masks = _structured()
  hf = _hf_processor().post_process_semantic_segmentation(
    _hf_outputs(cls, masks), target_sizes=[masks.shape[-2:]] * 3, return_segmentation_scores=True
  )
  scores = np.asarray(jax.jit(pp.semantic_inference)(cls, masks))
  labels = np.asarray(jax.jit(pp.semantic_segmentation)(cls, masks))
  for b in range(3):
    hf_scores = hf[b]["segmentation_scores"].numpy()
    np.testing.assert_allclose(scores[b], hf_scores, atol=1e-6, rtol=1e-5)
    # Labels must agree wherever the top two classes are not within rounding of each other.
    top2 = np.sort(hf_scores, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-5 * top2[1]
    assert clear.mean() > 0.999
    np.testing.assert_array_equal(labels[b][clear], hf[b]["segmentation"].numpy()[clear])
  assert labels.dtype == np.int32


def test_instance_matches_hugging_face():
  cls, masks = _structured()
  num_queries = cls.shape[1]
  # threshold 0 keeps every HF result with a non-empty mask, and every mask is non-empty here.
  hf = _hf_processor().post_process_instance_segmentation(
    _hf_outputs(cls, masks),
    threshold=0.0,
    target_sizes=[masks.shape[-2:]] * 3,
    return_binary_maps=True,
  )
  fn = jax.jit(pp.instance_inference, static_argnums=(2, 3))
  ours = jax.tree.map(np.asarray, fn(cls, masks, NUM_CLASSES, num_queries))
  assert ours.valid.all()
  for b in range(3):
    infos = hf[b]["segments_info"]
    assert len(infos) == num_queries
    hf_scores = np.array([s["score"] for s in infos])
    hf_labels = np.array([s["label_id"] for s in infos])
    hf_masks = hf[b]["segmentation"].numpy().astype(bool)

    # HF's topk(sorted=False) order is unspecified and its scores are rounded: pair the results
    # by (label, mask), unique here since every query has its own rectangle.
    def order(labels, masks):
      flat = masks.reshape(len(masks), -1)
      return np.lexsort((flat.argmax(-1), flat.sum(-1), labels))

    hf_order, ours_order = order(hf_labels, hf_masks), order(ours.labels[b], ours.masks[b])
    np.testing.assert_array_equal(ours.labels[b][ours_order], hf_labels[hf_order])
    np.testing.assert_array_equal(ours.masks[b][ours_order], hf_masks[hf_order])
    np.testing.assert_allclose(ours.scores[b][ours_order], hf_scores[hf_order], atol=2e-6)


# ---------------------------------------------------------------------------------------------
# Reference rules where Hugging Face differs: hand-made 4x4 examples, blown up to 384 for HF.


def _logits_for(labels_scores, num_classes=NUM_CLASSES):
  """Class logits whose softmax max is `score` at `label` (None = no object)."""
  rows = []
  for label, score in labels_scores:
    # softmax: score at one entry, the rest shared evenly by the other K entries.
    rest = (1.0 - score) / num_classes
    row = np.full(num_classes + 1, np.log(rest))
    row[num_classes if label is None else label] = np.log(score)
    rows.append(row)
  return np.asarray(rows, np.float32)[None]


def _blow_up(masks, factor=HF_SIZE // 4):
  return np.repeat(np.repeat(masks, factor, axis=-2), factor, axis=-1)


def _panoptic_both(cls, masks, overlap=0.8):
  ours = _ours_panoptic(cls, masks, overlap_threshold=overlap)
  hf = _hf_panoptic(cls, _blow_up(masks), overlap_mask_area_threshold=overlap)[0]
  hf_map = hf["segmentation"].numpy()[:: HF_SIZE // 4, :: HF_SIZE // 4].astype(np.int64)
  return ours, hf_map, hf["segments_info"]


def test_panoptic_segment_excludes_low_sigmoid_pixels():
  # One kept query: argmax everywhere, but one pixel has sigmoid < 0.5: void in the reference.
  cls = _logits_for([(0, 0.95)])
  masks = np.full((1, 1, 4, 4), 4.0, np.float32)
  masks[0, 0, 0, 0] = -4.0
  ours, hf_map, _ = _panoptic_both(cls, masks)
  want = np.ones((4, 4), np.int32)
  want[0, 0] = 0
  np.testing.assert_array_equal(ours.segment_map[0], want)
  assert hf_map[0, 0] == 1  # HF assigns it.
  # Query 0 wins 7 pixels, all with sigmoid < .5, and loses its only foreground pixel: the
  # ratio 7 / 1 passes but the intersection is empty, so the reference skips it; HF paints it.
  cls = _logits_for([(0, 0.95), (1, 0.9)])
  masks = np.full((1, 2, 4, 4), -4.0, np.float32)
  masks[0, 0, 0, 0] = 0.5
  masks[0, 0, 1] = -1.0
  masks[0, 1, 0, 0] = 8.0
  masks[0, 1, 2:] = 4.0
  ours, hf_map, hf_info = _panoptic_both(cls, masks)
  np.testing.assert_array_equal(ours.segment_labels[0], [-1, 1])
  want = np.zeros((4, 4), np.int32)
  want[0, 0] = want[2:] = 2
  np.testing.assert_array_equal(ours.segment_map[0], want)
  assert [s["label_id"] for s in hf_info] == [0, 1] and (hf_map[:2] > 0).sum() == 8


@pytest.mark.parametrize("overlap", [0.75, 0.8])
def test_panoptic_overlap_ratio_at_threshold_is_kept(overlap):
  # Query 0 owns n foreground pixels, query 1 takes one: ratio (n - 1) / n == threshold, which
  # the reference keeps (it skips on `<`). HF skips on `<=` of a float32 ratio: it drops 3/4 at
  # .75, but float32(4/5) > 0.8 so it keeps 4/5 at .8.
  n = round(1 / (1 - overlap))
  cls = _logits_for([(0, 0.9), (1, 0.95)])
  masks = np.full((1, 2, 4, 4), -4.0, np.float32)
  masks[0, 0].flat[:n] = 4.0
  masks[0, 1].flat[n - 1] = 6.0
  masks[0, 1, 2:, :] = 4.0
  ours, hf_map, hf_info = _panoptic_both(cls, masks, overlap)
  owned = ours.segment_map[0] == 1
  assert owned.sum() == n - 1
  np.testing.assert_array_equal(ours.segment_labels[0], [0, 1])
  hf_labels = {s["id"]: s["label_id"] for s in hf_info}
  if overlap == 0.8:
    assert {hf_labels[i] for i in hf_map[owned]} == {0}
  else:
    assert (hf_map[owned] == 0).all() and 0 not in hf_labels.values()


def test_panoptic_original_area_uses_unweighted_sigmoid():
  # Query 0 (score .85) wins 8 pixels with sigmoid .525: score * sigmoid < .5 there, so HF's
  # score-weighted original area is 0 and it drops the query; the reference keeps it.
  cls = _logits_for([(0, 0.85), (1, 0.99)])
  masks = np.full((1, 2, 4, 4), -4.0, np.float32)
  masks[0, 0, :2] = 0.1
  masks[0, 1, 2:] = 4.0
  ours, hf_map, _ = _panoptic_both(cls, masks)
  np.testing.assert_array_equal(ours.segment_map[0], np.repeat([1, 1, 2, 2], 4).reshape(4, 4))
  assert (hf_map[:2] == 0).all()


def test_panoptic_fused_stuff_keeps_ids_distinct():
  # stuff 3, thing 0, stuff 3 (fused into the first), thing 1: four distinct regions, three
  # segments. HF resets its running id when fusing and gives the last thing the id of the first.
  cls = _logits_for([(3, 0.95), (0, 0.95), (3, 0.95), (1, 0.95)])
  masks = np.full((1, 4, 4, 4), -4.0, np.float32)
  for q in range(4):
    masks[0, q, q] = 4.0
  ours, hf_map, _ = _panoptic_both(cls, masks)
  np.testing.assert_array_equal(ours.segment_map[0][:, 0], [1, 2, 1, 4])
  np.testing.assert_array_equal(ours.segment_labels[0], [3, 0, -1, 1])
  renumbered, infos = pp.panoptic_segments_info(
    ours.segment_map[0],
    ours.segment_labels[0],
    ours.segment_scores[0],
    ISTHING,
    label_to_category_id=[10, 11, 12, 13, 14, 15],
  )
  np.testing.assert_array_equal(renumbered[:, 0], [1, 2, 1, 3])
  assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in infos] == [
    (1, 13, False, 8),
    (2, 10, True, 4),
    (3, 11, True, 4),
  ]
  assert hf_map[1, 0] == hf_map[3, 0]  # HF merges the two things: its bug, not ours.


def test_panoptic_no_kept_query_and_padding_are_void():
  cls = _logits_for([(None, 0.95), (0, 0.5)])
  masks = np.full((1, 2, 4, 4), 4.0, np.float32)
  ours, hf_map, _ = _panoptic_both(cls, masks)
  assert (ours.segment_map == 0).all() and (ours.segment_labels == -1).all()
  assert (hf_map == -1).all()
  # Padding: zero logits (sigmoid exactly .5) outside the image must neither count nor paint.
  cls = _logits_for([(0, 0.95)])
  masks = np.zeros((1, 1, 4, 4), np.float32)
  masks[0, 0, :2, :2] = 4.0
  masks[0, 0, 0, 0] = -4.0
  masks[0, 0, 1, 0] = 0.0  # sigmoid exactly .5: foreground (`>= 0.5`).
  valid = np.zeros((1, 4, 4), bool)
  valid[0, :2, :2] = True
  ours = _ours_panoptic(cls, masks, valid_pixels=valid)
  np.testing.assert_array_equal(ours.segment_map[0], [[0, 1, 0, 0], [1, 1, 0, 0], [0] * 4, [0] * 4])


def test_instance_keeps_empty_masks_and_filters_things():
  # HF drops empty masks and scores below its threshold; the reference keeps all top-k.
  cls = np.array([[[3.0, 1.0, 0.5, 0.0, 0.0], [0.2, 0.1, 0.0, 2.5, 1.0]]], np.float32)
  probs = _softmax(cls[0])[:, :-1]  # top 3: (q0, 0) .76, (q1, 3) .67, (q0, 1) .10.
  masks = np.full((1, 2, 2, 2), -3.0, np.float32)
  masks[0, 0, 0] = [1.0, 2.0]  # query 1's mask is empty.
  fn = jax.jit(pp.instance_inference, static_argnums=(2, 3))
  out = jax.tree.map(np.asarray, fn(cls, masks, 4, 3))
  np.testing.assert_array_equal(out.labels[0], [0, 3, 1])
  np.testing.assert_array_equal(out.query[0], [0, 1, 0])
  sig = 1 / (1 + np.exp(-np.array([1.0, 2.0])))
  mask_score = sig.sum() / (2 + 1e-6)
  want = [probs[0, 0] * mask_score, 0.0, probs[0, 1] * mask_score]
  np.testing.assert_allclose(out.scores[0], want, rtol=1e-5)
  assert out.valid.all() and not out.masks[0, 1].any()
  np.testing.assert_array_equal(out.masks[0, 0], [[True, True], [False, False]])
  # Thing-only (panoptic on): non-thing results removed after the top-k.
  things = np.array([True, True, False, False])
  out = jax.tree.map(np.asarray, fn(cls, masks, 4, 3, things))
  np.testing.assert_array_equal(out.valid[0], [True, False, True])
  assert out.scores[0, 1] == -np.inf and np.isfinite(out.scores[0, [0, 2]]).all()


# ---------------------------------------------------------------------------------------------
# A numpy transcription of the reference's per-image loop (spec section 5).


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _reference_panoptic(mask_cls, mask_logits, isthing, object_threshold=0.8, overlap=0.8):
  """detectron2 Mask2Former `panoptic_inference` for one image, in numpy float32."""
  num_classes = mask_cls.shape[-1] - 1
  probs = _softmax(mask_cls)
  scores, labels = probs.max(-1), probs.argmax(-1)
  mask_pred = (1.0 / (1.0 + np.exp(-mask_logits))).astype(np.float32)
  keep = (labels != num_classes) & (scores > np.float32(object_threshold))
  cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep]
  cur_prob_masks = cur_scores[:, None, None] * cur_masks
  panoptic_seg = np.zeros(mask_logits.shape[-2:], np.int32)
  segments_info = []
  current_segment_id = 0
  stats = {"merged": 0, "ratio_skip": 0, "segments": 0}
  if cur_masks.shape[0] == 0:
    return panoptic_seg, segments_info, stats
  cur_mask_ids = cur_prob_masks.argmax(0)
  stuff_memory_list = {}
  for k in range(cur_classes.shape[0]):
    pred_class = int(cur_classes[k])
    is_thing = bool(isthing[pred_class])
    mask_area = int((cur_mask_ids == k).sum())
    original_area = int((cur_masks[k] >= 0.5).sum())
    mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)
    if mask_area > 0 and original_area > 0 and mask.sum() > 0:
      if mask_area / original_area < overlap:
        stats["ratio_skip"] += 1
        continue
      if not is_thing:
        if pred_class in stuff_memory_list:
          panoptic_seg[mask] = stuff_memory_list[pred_class]
          stats["merged"] += 1
          continue
        stuff_memory_list[pred_class] = current_segment_id + 1
      current_segment_id += 1
      panoptic_seg[mask] = current_segment_id
      segments_info.append(
        {"id": current_segment_id, "isthing": is_thing, "category_id": pred_class}
      )
  stats["segments"] = current_segment_id
  return panoptic_seg, segments_info, stats


def _random_panoptic_inputs(rng, batch, num_queries, size, num_classes):
  """Blobby masks (upsampled 6x6 noise) and confident classes, to get kept/merged/skipped."""
  # Mostly negative, so that queries have a few blobs and some pass the overlap test.
  coarse = rng.normal(loc=-5.0, scale=4.0, size=(batch, num_queries, 6, 6))
  masks = np.repeat(np.repeat(coarse, size // 6, axis=-2), size // 6, axis=-1)
  masks = (masks + rng.normal(scale=0.5, size=masks.shape)).astype(np.float32)
  cls = rng.normal(size=(batch, num_queries, num_classes + 1))
  chosen = rng.integers(0, num_classes + 1, size=(batch, num_queries))
  boost = rng.uniform(0.0, 9.0, size=(batch, num_queries))
  np.put_along_axis(cls, chosen[..., None], (cls.max(-1) + boost)[..., None], axis=-1)
  # Few classes: several queries of one stuff class in an image.
  return cls.astype(np.float32), masks


def test_panoptic_matches_numpy_reference_loop():
  rng = np.random.default_rng(3)
  num_classes, batch, num_queries, size = 4, 8, 12, 24
  isthing = np.array([True, True, False, False])
  cls, masks = _random_panoptic_inputs(rng, batch, num_queries, size, num_classes)
  # Half the images lie in a padded canvas: crop sizes differ per example.
  image_hw = [(size, size) if b % 2 == 0 else (size - 3 * b, size - 2 * b) for b in range(batch)]
  valid = np.zeros((batch, size, size), bool)
  for b, (h, w) in enumerate(image_hw):
    valid[b, :h, :w] = True
    masks[b, :, h:, :] = 0.0  # What `resize_to_original` writes outside the image.
    masks[b, :, :, w:] = 0.0
  fn = jax.jit(pp.panoptic_inference, static_argnums=(3, 4))
  ours = jax.tree.map(np.asarray, fn(cls, masks, isthing, 0.8, 0.8, valid))
  totals = {"merged": 0, "ratio_skip": 0, "segments": 0}
  for b, (h, w) in enumerate(image_hw):
    want_map, want_info, stats = _reference_panoptic(cls[b], masks[b, :, :h, :w], isthing)
    for key in totals:
      totals[key] += stats[key]
    got_map, got_info = pp.panoptic_segments_info(
      ours.segment_map[b],
      ours.segment_labels[b],
      ours.segment_scores[b],
      isthing,
      image_size=(h, w),
    )
    np.testing.assert_array_equal(got_map, want_map)
    assert not ours.segment_map[b][~valid[b]].any()
    assert [{k: s[k] for k in ("id", "isthing", "category_id")} for s in got_info] == want_info
  # The random inputs exercise every branch.
  assert totals["merged"] >= 2 and totals["ratio_skip"] >= 2 and totals["segments"] >= 10, totals


def test_jit_matches_eager():
  rng = np.random.default_rng(4)
  cls, masks = _random_panoptic_inputs(rng, 2, 6, 12, 3)
  isthing = np.array([True, False, False])
  cls, masks = jnp.asarray(cls), jnp.asarray(masks)
  sizes = np.array([[12, 10], [7, 12]], np.int32), np.array([[20, 5], [3, 18]], np.int32)
  calls = [
    (pp.semantic_inference, (cls, masks)),
    (pp.semantic_segmentation, (cls, masks)),
    (pp.panoptic_inference, (cls, masks, isthing)),
    (functools.partial(pp.instance_inference, num_classes=3, top_k=5), (cls, masks)),
    (functools.partial(pp.upsample_masks, size=(20, 16)), (masks,)),
    (functools.partial(pp.resize_to_original, out_size=(21, 19)), (masks, *sizes)),
  ]
  for fn, args in calls:
    eager, jitted = fn(*args), jax.jit(fn)(*args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), eager, jitted)
