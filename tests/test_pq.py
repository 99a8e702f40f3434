"""Panoptic quality: hand-computed cases, a slow boolean-mask re-derivation, merge."""

from __future__ import annotations

import numpy as np
import pytest

from mpformer_jax.evaluation.panoptic import PanopticQuality, PQStat, pq_compute

# Things 1, 2; stuff 3, 4.
CATS = [
  {"id": 1, "name": "person", "isthing": 1},
  {"id": 2, "name": "car", "isthing": 1},
  {"id": 3, "name": "sky", "isthing": 0},
  {"id": 4, "name": "grass", "isthing": 0},
]


def seg(sid, cat, crowd=0):
  return {"id": sid, "category_id": cat, "iscrowd": crowd}


def row(*runs):
  """A `[1, W]` map from `(id, length)` runs."""
  return np.concatenate([np.full(n, i, np.int64) for i, n in runs])[None]


def one(gt_map, gt_segs, pred_map, pred_segs, cats=CATS):
  return pq_compute([(gt_map, gt_segs)], [(pred_map, pred_segs)], cats)


def test_perfect_prediction():
  gt = np.array([[1, 1, 5, 5], [0, 0, 5, 5]])
  pred = np.array([[7, 7, 9, 9], [0, 0, 9, 9]])
  r = one(gt, [seg(1, 1), seg(5, 3)], pred, [seg(7, 1), seg(9, 3)])
  for group, n in [("All", 2), ("Things", 1), ("Stuff", 1)]:
    assert r[group] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": n}
  assert r["per_class"][1]["tp"] == 1 and r["per_class"][3]["tp"] == 1


def test_tp_fp_fn_and_things_stuff_split():
  # Row 0: GT 1 (cat 1) cols 0-7, GT 2 (cat 1) cols 8-9; pred 5 (cat 1) cols 2-9.
  #   (1, 5): inter 6, union 8 + 8 - 6 = 10 -> IoU 0.6 > 0.5: TP.
  #   (2, 5): inter 2, union 8 + 2 - 2 = 8 -> 0.25: GT 2 is a FN.
  # Row 1: GT 3 (cat 3, stuff) everywhere, pred 7 (cat 1): no match, FP of cat 1, FN of cat 3.
  gt = np.concatenate([row((1, 8), (2, 2)), row((3, 10))])
  pred = np.concatenate([row((0, 2), (5, 8)), row((7, 10))])
  r = one(gt, [seg(1, 1), seg(2, 1), seg(3, 3)], pred, [seg(5, 1), seg(7, 1)])
  c1 = r["per_class"][1]
  assert (c1["tp"], c1["fp"], c1["fn"]) == (1, 1, 1)
  # PQ = 0.6 / (1 + 0.5 + 0.5) = 0.3, SQ = 0.6 / 1, RQ = 1 / 2.
  assert c1["pq"] == pytest.approx(0.3) and c1["sq"] == pytest.approx(0.6) and c1["rq"] == 0.5
  c3 = r["per_class"][3]
  assert (c3["tp"], c3["fp"], c3["fn"], c3["pq"], c3["sq"], c3["rq"]) == (0, 0, 1, 0, 0, 0)
  # Categories 2 and 4 never appear: excluded from the means.
  assert r["per_class"][2] == {
    "pq": 0.0,
    "sq": 0.0,
    "rq": 0.0,
    "tp": 0,
    "fp": 0,
    "fn": 0,
    "iou": 0.0,
    "isthing": True,
  }
  # All: mean over categories 1 and 3: PQ (0.3 + 0) / 2, SQ (0.6 + 0) / 2, RQ (0.5 + 0) / 2.
  assert r["All"] == pytest.approx({"pq": 0.15, "sq": 0.3, "rq": 0.25, "n": 2})
  assert r["Things"] == pytest.approx({"pq": 0.3, "sq": 0.6, "rq": 0.5, "n": 1})
  assert r["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}


def test_group_without_categories_reports_zero():
  gt, pred = row((1, 4)), row((2, 4))
  r = one(gt, [seg(1, 1)], pred, [seg(2, 1)])
  assert r["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
  assert r["Things"]["n"] == 1 and r["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}


@pytest.mark.parametrize("pred_cat", [1, 2])
def test_crowd(pred_cat):
  # GT 1 (cat 1, crowd) cols 0-5, GT 2 (cat 2) cols 6-9.
  # Pred 5 (cat `pred_cat`) cols 2-6: 4 px on the crowd, 1 px on GT 2.
  # Pred 6 (cat 2) cols 7-9: with GT 2 inter 3, union 3 + 4 - 3 = 4 -> IoU 0.75: TP.
  gt = row((1, 6), (2, 4))
  pred = row((0, 2), (5, 5), (6, 3))
  r = one(gt, [seg(1, 1, crowd=1), seg(2, 2)], pred, [seg(5, pred_cat), seg(6, 2)])
  c1, c2 = r["per_class"][1], r["per_class"][2]
  assert c2["tp"] == 1 and c2["sq"] == pytest.approx(0.75) and c2["fn"] == 0
  # The crowd segment is never a FN.
  assert c1["fn"] == 0 and c1["tp"] == 0
  if pred_cat == 1:
    # 4 / 5 of pred 5 on a crowd region of its own category: ignored, not a FP.
    assert c1["fp"] == 0 and c2["fp"] == 0
    assert r["All"] == pytest.approx({"pq": 0.75, "sq": 0.75, "rq": 1.0, "n": 1})
  else:
    # The crowd is of another category: pred 5 (with GT 2 IoU 1 / (5 + 4 - 1) = 0.125) is a FP.
    # Category 2: PQ = 0.75 / (1 + 0.5), RQ = 1 / 1.5.
    assert c2["fp"] == 1
    assert c2["pq"] == pytest.approx(0.5) and c2["rq"] == pytest.approx(2 / 3)
    assert r["All"]["n"] == 1


def test_multiple_crowd_segments_of_a_category_are_united():
  # Crowd GT 1 cols 0-2 and crowd GT 2 cols 3-5 (both cat 1), GT 3 (cat 2) cols 6-9.
  # Pred 5 (cat 1) cols 1-7: 2 px on GT 1, 3 px on GT 2, 2 px on GT 3. United crowd 5 / 7 > 0.5:
  # ignored (each crowd alone, 2 / 7 and 3 / 7, would make it a FP).
  gt = row((1, 3), (2, 3), (3, 4))
  pred = row((0, 1), (5, 7), (0, 2))
  segs = [seg(1, 1, crowd=1), seg(2, 1, crowd=1), seg(3, 2)]
  r = one(gt, segs, pred, [seg(5, 1)])
  assert r["per_class"][1]["fp"] == 0 and r["per_class"][2]["fn"] == 1 and r["All"]["n"] == 1
  # With the second crowd region of category 2, only 2 / 7 of pred 5 is ignored: a FP.
  segs[1] = seg(2, 2, crowd=1)
  r = one(gt, segs, pred, [seg(5, 1)])
  assert r["per_class"][1]["fp"] == 1


def test_void_removed_from_union():
  # GT void cols 0-5, GT 1 (cat 1) cols 6-9; pred 5 (cat 1) everywhere.
  # Inter 4, union 10 + 4 - 4 - 6 (pred on void) = 4 -> IoU 1 (4 / 10 = 0.4 if void counted).
  r = one(row((0, 6), (1, 4)), [seg(1, 1)], row((5, 10)), [seg(5, 1)])
  assert r["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}


def test_prediction_mostly_in_void_is_not_fp():
  # GT void cols 0-5, GT 1 (cat 1) cols 6-9. Pred 5 (cat 1) cols 0-6, pred 6 (cat 1) cols 7-9.
  #   (1, 6): inter 3, union 3 + 4 - 3 = 4 -> 0.75: TP.
  #   (1, 5): inter 1, union 7 + 4 - 1 - 6 = 4 -> 0.25; pred 5 has 6 / 7 on void: ignored.
  r = one(row((0, 6), (1, 4)), [seg(1, 1)], row((5, 7), (6, 3)), [seg(5, 1), seg(6, 1)])
  c1 = r["per_class"][1]
  assert (c1["tp"], c1["fp"], c1["fn"]) == (1, 0, 0) and c1["pq"] == pytest.approx(0.75)


def test_prediction_exactly_half_in_void_is_fp():
  # GT void cols 0-1, GT 1 (cat 1) cols 2-9. Pred 5 (cat 2) cols 0-3: 2 / 4 on void, not more
  # than half: a FP. Pred 6 (cat 1) cols 4-9: inter 6, union 6 + 8 - 6 = 8 -> 0.75: TP.
  r = one(row((0, 2), (1, 8)), [seg(1, 1)], row((5, 4), (6, 6)), [seg(5, 2), seg(6, 1)])
  assert r["per_class"][2]["fp"] == 1 and r["per_class"][1]["tp"] == 1
  # Means over categories 1 (PQ 0.75) and 2 (PQ 0).
  assert r["All"]["pq"] == pytest.approx(0.375) and r["All"]["n"] == 2


@pytest.mark.parametrize(("covered", "tp"), [(2, 0), (3, 1)])
def test_iou_exactly_half_is_not_a_match(covered, tp):
  # GT 1 (cat 1) 4 px; pred 5 (cat 1) its first `covered` px: IoU covered / 4.
  # 2 / 4 = 0.5 is not > 0.5: FP + FN, PQ 0. 3 / 4: TP, PQ 0.75.
  r = one(row((1, 4)), [seg(1, 1)], row((5, covered), (0, 4 - covered)), [seg(5, 1)])
  c1 = r["per_class"][1]
  assert (c1["tp"], c1["fp"], c1["fn"]) == (tp, 1 - tp, 1 - tp)
  assert c1["pq"] == pytest.approx(0.75 * tp)


def test_stuff_merge():
  # GT 2 (cat 3, stuff) is two regions, cols 0-2 and 7-9, listed as one segment; GT 1 (cat 1)
  # cols 3-6. One predicted stuff segment covering both regions: IoU 6 / 6.
  gt = row((2, 3), (1, 4), (2, 3))
  gt_segs = [seg(1, 1), seg(2, 3)]
  r = one(gt, gt_segs, row((9, 3), (4, 4), (9, 3)), [seg(9, 3), seg(4, 1)])
  assert r["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
  # Predicted as two segments: each has IoU 3 / (3 + 6 - 3) = 0.5, no match: 2 FP, 1 FN.
  r = one(gt, gt_segs, row((9, 3), (4, 4), (10, 3)), [seg(9, 3), seg(4, 1), seg(10, 3)])
  c3 = r["per_class"][3]
  assert (c3["tp"], c3["fp"], c3["fn"], c3["pq"]) == (0, 2, 1, 0.0)
  assert r["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}


def test_listed_gt_segment_absent_from_map_is_fn():
  gt, pred = np.ones((2, 2), np.int32), np.full((2, 2), 5, np.uint8)
  r = one(gt, [seg(1, 1), seg(2, 2)], pred, [{"id": 5, "category_id": 1}])
  assert r["per_class"][2]["fn"] == 1 and r["per_class"][1]["pq"] == 1.0
  assert r["All"] == {"pq": 0.5, "sq": 0.5, "rq": 0.5, "n": 2}


def test_errors():
  gt_ok = (row((1, 4)), [seg(1, 1)])
  pred_ok = (row((5, 4)), [seg(5, 1)])
  # A listed predicted segment absent from the map; the error names the image and the id.
  with pytest.raises(ValueError, match=r"image 1: .*segments 7 .*absent"):
    pq_compute([gt_ok, gt_ok], [pred_ok, (row((5, 4)), [seg(5, 1), seg(7, 1)])], CATS)
  with pytest.raises(ValueError, match=r"image 0: predicted map holds ids 6 not listed"):
    pq_compute([gt_ok], [(row((5, 2), (6, 2)), [seg(5, 1)])], CATS)
  with pytest.raises(ValueError, match=r"image 0: ground-truth map holds ids 3 not listed"):
    pq_compute([(row((1, 2), (3, 2)), [seg(1, 1)])], [pred_ok], CATS)
  with pytest.raises(ValueError, match=r"image 0: unknown category ids 8, 9"):
    pq_compute([(row((1, 4)), [seg(1, 9)])], [(row((5, 4)), [seg(5, 8)])], CATS)
  with pytest.raises(ValueError, match="differ in shape"):
    pq_compute([gt_ok], [(row((5, 5)), [seg(5, 1)])], CATS)
  with pytest.raises(ValueError, match="differ in length"):
    pq_compute([gt_ok, gt_ok], [pred_ok], CATS)
  with pytest.raises(ValueError, match="listed twice"):
    pq_compute([gt_ok], [(row((5, 4)), [seg(5, 1), seg(5, 2)])], CATS)
  with pytest.raises(ValueError, match="not positive"):
    pq_compute([gt_ok], [(row((5, 4)), [seg(5, 1), seg(0, 2)])], CATS)
  with pytest.raises(ValueError, match="integer"):
    pq_compute([gt_ok], [(row((5, 4)).astype(float), [seg(5, 1)])], CATS)
  # Without categories up front, a crowd-only unknown category is caught by `compute`.
  metric = PanopticQuality()
  metric.update(row((1, 4)), [seg(1, 42, crowd=1)], row((0, 4)), [])
  with pytest.raises(ValueError, match="unknown category ids 42"):
    metric.compute(CATS)
  # A failed update adds nothing.
  metric = PQStat(CATS)
  with pytest.raises(ValueError):
    metric.update(row((1, 4)), [seg(1, 1)], row((5, 4)), [])
  assert metric.num_images == 0 and metric.counts == {}


# ---------------------------------------------------------------------------------------------
# Independent re-derivation on random maps.

RCATS = [
  {"id": 1, "name": "a", "isthing": 1},
  {"id": 2, "name": "b", "isthing": 1},
  {"id": 3, "name": "c", "isthing": 1},
  {"id": 10, "name": "d", "isthing": 0},
  {"id": 11, "name": "e", "isthing": 0},
  {"id": 12, "name": "never", "isthing": 0},
]


def slow_pq(images, categories):
  """Straight from the rules: boolean masks, loops over all segment pairs."""
  stats = {c["id"]: {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0} for c in categories}
  ignored_total = 0
  for gt_map, gt_segs, pred_map, pred_segs in images:
    void = gt_map == 0
    crowd = {}  # category -> union of its crowd masks
    for g in gt_segs:
      if g.get("iscrowd", 0):
        crowd[g["category_id"]] = crowd.get(g["category_id"], False) | (gt_map == g["id"])
    gt_done, pred_done = set(), set()
    for g in gt_segs:
      if g.get("iscrowd", 0):
        continue
      gm = gt_map == g["id"]
      for p in pred_segs:
        if p["category_id"] != g["category_id"]:
          continue
        pm = pred_map == p["id"]
        inter = np.sum(gm & pm)
        # G and void are disjoint: union minus the prediction's void pixels.
        union = np.sum(gm | (pm & ~void))
        if inter and inter / union > 0.5:
          assert g["id"] not in gt_done and p["id"] not in pred_done
          stats[g["category_id"]]["tp"] += 1
          stats[g["category_id"]]["iou"] += inter / union
          gt_done.add(g["id"])
          pred_done.add(p["id"])
    for g in gt_segs:
      if not g.get("iscrowd", 0) and g["id"] not in gt_done:
        stats[g["category_id"]]["fn"] += 1
    for p in pred_segs:
      if p["id"] in pred_done:
        continue
      pm = pred_map == p["id"]
      ignore = void | crowd.get(p["category_id"], np.zeros_like(void))
      if np.sum(pm & ignore) / np.sum(pm) > 0.5:
        ignored_total += 1
      else:
        stats[p["category_id"]]["fp"] += 1

  per_class = {}
  for cid, s in stats.items():
    tp, fp, fn, iou = s["tp"], s["fp"], s["fn"], s["iou"]
    per_class[cid] = {
      "pq": iou / (tp + fp / 2 + fn / 2) if tp + fp + fn else 0.0,
      "sq": iou / tp if tp else 0.0,
      "rq": tp / (tp + fp / 2 + fn / 2) if tp + fp + fn else 0.0,
      **s,
    }
  out = {"per_class": per_class}
  for name, want in [("All", (0, 1)), ("Things", (1,)), ("Stuff", (0,))]:
    ids = [c["id"] for c in categories if c["isthing"] in want]
    ids = [i for i in ids if stats[i]["tp"] + stats[i]["fp"] + stats[i]["fn"] > 0]
    out[name] = {
      k: np.mean([per_class[i][k] for i in ids]) if ids else 0.0 for k in ("pq", "sq", "rq")
    }
    out[name]["n"] = len(ids)
  return out, ignored_total


def random_image(rng, h=24, w=32, id_high=256**3):
  """A random GT (rectangles, void, crowd) and a perturbed prediction of it."""
  cat_ids = [c["id"] for c in RCATS[:-1]]
  gt = np.zeros((h, w), np.int64)
  ids = rng.choice(np.arange(1, id_high), size=12, replace=False)
  for i in ids:
    y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
    gt[y : y + rng.integers(3, 14), x : x + rng.integers(3, 18)] = i
  for _ in range(2):  # void holes
    y, x = rng.integers(0, h), rng.integers(0, w)
    gt[y : y + rng.integers(2, 8), x : x + rng.integers(2, 8)] = 0
  gt_ids = [int(i) for i in np.unique(gt) if i]
  gt_segs = [
    {"id": i, "category_id": int(rng.choice(cat_ids)), "iscrowd": int(rng.uniform() < 0.2)}
    for i in gt_ids
  ]
  if rng.uniform() < 0.3:  # a listed segment absent from the map
    absent = int(max(ids)) + 1
    gt_segs.append({"id": absent, "category_id": int(rng.choice(cat_ids)), "iscrowd": 0})

  # Prediction: relabel GT segments (some merged, void partly labelled), shift, add clutter.
  values, inverse = np.unique(gt, return_inverse=True)
  pred_ids = rng.choice(np.arange(1, id_high), size=len(values), replace=False)
  merge = rng.uniform(size=len(values)) < 0.15
  pred_ids[merge] = pred_ids[rng.integers(0, len(values), size=merge.sum())]
  pred_ids[(values == 0) & (rng.uniform(size=len(values)) < 0.5)] = 0
  pred = pred_ids[inverse].reshape(h, w)
  pred = np.roll(pred, (rng.integers(-2, 3), rng.integers(-2, 3)), axis=(0, 1))
  for _ in range(3):
    y, x = rng.integers(0, h), rng.integers(0, w)
    pred[y : y + rng.integers(2, 10), x : x + rng.integers(2, 10)] = rng.integers(1, id_high)
  pred[rng.uniform(size=(h, w)) < 0.05] = 0
  gt_cat = {g["id"]: g["category_id"] for g in gt_segs}
  pred_cat = {int(p): gt_cat.get(int(v), 0) for v, p in zip(values, pred_ids, strict=True)}
  pred_segs = []
  for p in np.unique(pred):
    if p:
      cat = pred_cat.get(int(p), 0)
      if not cat or rng.uniform() < 0.2:
        cat = int(rng.choice(cat_ids))
      pred_segs.append({"id": int(p), "category_id": cat})  # no "iscrowd": read as 0
  rng.shuffle(pred_segs)
  return gt, gt_segs, pred, pred_segs


def random_images(seed=0, n=20, **kwargs):
  rng = np.random.default_rng(seed)
  return [random_image(rng, **kwargs) for _ in range(n)]


def assert_results_close(got, want, tol=1e-9):
  for group in ("All", "Things", "Stuff"):
    assert got[group]["n"] == want[group]["n"], group
    for k in ("pq", "sq", "rq"):
      assert got[group][k] == pytest.approx(want[group][k], abs=tol), (group, k)
  assert got["per_class"].keys() == want["per_class"].keys()
  for cid, w in want["per_class"].items():
    g = got["per_class"][cid]
    assert (g["tp"], g["fp"], g["fn"]) == (w["tp"], w["fp"], w["fn"]), cid
    for k in ("pq", "sq", "rq", "iou"):
      assert g[k] == pytest.approx(w[k], abs=tol), (cid, k)


def test_matches_slow_rederivation_on_random_maps():
  images = random_images()
  got = pq_compute([(g, gs) for g, gs, _, _ in images], [(p, ps) for _, _, p, ps in images], RCATS)
  want, ignored = slow_pq(images, RCATS)
  assert_results_close(got, want)
  # The random cases exercise every branch.
  counts = [want["per_class"][c["id"]] for c in RCATS]
  assert sum(c["tp"] for c in counts) > 10 and sum(c["fp"] for c in counts) > 10
  assert sum(c["fn"] for c in counts) > 10 and ignored > 0
  assert 0 < got["All"]["pq"] < 1 and got["Things"]["n"] == 3 and got["Stuff"]["n"] == 2
  assert any(0.5 < c["iou"] / max(c["tp"], 1) < 1 for c in counts)


def test_huge_ids_give_the_same_result():
  # Ids beyond 2^31 overflow the int64 pair code gt * K + pred: the ids are compacted first.
  images = random_images(seed=1, n=5)
  shift = 2**40

  def shifted(m):
    return np.where(m > 0, m + shift, 0).astype(np.uint64)

  def shifted_segs(segs):
    return [{**s, "id": s["id"] + shift} for s in segs]

  small = pq_compute(
    [(g, gs) for g, gs, _, _ in images], [(p, ps) for _, _, p, ps in images], RCATS
  )
  huge = pq_compute(
    [(shifted(g), shifted_segs(gs)) for g, gs, _, _ in images],
    [(shifted(p), shifted_segs(ps)) for _, _, p, ps in images],
    RCATS,
  )
  assert_results_close(huge, small, tol=0)


def test_merge_of_halves_equals_whole():
  images = random_images(seed=2)
  whole, first, second = PanopticQuality(), PanopticQuality(RCATS), PQStat()
  for i, image in enumerate(images):
    whole.update(*image)
    (first if i < 10 else second).update(*image)
  merged = first.merge(second)
  assert merged is first and merged.num_images == whole.num_images == 20
  assert_results_close(merged.compute(), whole.compute(RCATS), tol=1e-12)
