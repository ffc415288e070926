"""Detection metrics (medssl.detection.metrics) on hand-made boxes whose mAP and FROC are computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medssl.detection.metrics import FROC_RATES, as_numpy_boxes, coco_map, detection_summary, froc

CLASSES = ["nodule", "mass"]


def _gt(boxes, labels):
    return as_numpy_boxes({"boxes": boxes, "labels": labels})


def _pred(boxes, labels, scores):
    return as_numpy_boxes({"boxes": boxes, "labels": labels, "scores": scores}, score_key="scores")


@pytest.fixture
def two_images():
    """Image 1: a nodule [0,0,10,10] and a mass [20,20,30,30]; image 2: normal (no box).
    Predictions, by score: 0.9 nodule exactly on the nodule (TP), 0.8 nodule on empty tissue (FP), 0.5 mass on
    image 2 (FP), 0.3 mass exactly on the mass (TP)."""
    targets = [_gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1]), _gt([], [])]
    preds = [
        _pred([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0, 0, 1], [0.9, 0.8, 0.3]),
        _pred([[1, 1, 5, 5]], [1], [0.5]),
    ]
    return preds, targets


def test_map_per_class_by_hand(two_images):
    preds, targets = two_images
    result = coco_map(preds, targets, CLASSES)
    # nodule: its only GT is found first (precision 1 at recall 1) -> AP 1 at every IoU threshold
    assert result["map50/nodule"] == pytest.approx(1.0)
    assert result["map50_95/nodule"] == pytest.approx(1.0)
    # mass: an FP (0.5) ranks before the TP (0.3): precision 1/2 at recall 1 -> AP 0.5
    assert result["map50/mass"] == pytest.approx(0.5)
    assert result["map50_95/mass"] == pytest.approx(0.5)
    assert result["map50"] == pytest.approx(0.75)
    assert result["map50_95"] == pytest.approx(0.75)


def test_map_iou_range_counts_thresholds_by_hand():
    """A prediction [0,0,10,7.2] on GT [0,0,10,10]: IoU 0.72, a hit at 0.50..0.70 (5 of the 10 thresholds) -> mAP@0.5
    1, mAP@[0.5:0.95] 0.5 (an IoU of exactly 0.7 would sit on a threshold that floating point rounds up)."""
    result = coco_map([_pred([[0, 0, 10, 7.2]], [0], [0.9])], [_gt([[0, 0, 10, 10]], [0])], ["nodule"])
    assert result["map50"] == pytest.approx(1.0)
    assert result["map50_95"] == pytest.approx(0.5)


def test_wrong_class_is_a_miss_and_class_without_gt_is_nan():
    result = coco_map([_pred([[0, 0, 10, 10]], [1], [0.9])], [_gt([[0, 0, 10, 10]], [0])], CLASSES)
    assert result["map50/nodule"] == 0.0
    assert math.isnan(result["map50/mass"])


def test_class_without_ground_truth_is_left_out_of_the_mean():
    """Only nodules in the ground truth, found perfectly: mAP 1 (COCOMetric's own overall value would average in the
    -1 of the mass class)."""
    result = coco_map([_pred([[0, 0, 10, 10]], [0], [0.9])], [_gt([[0, 0, 10, 10]], [0])], CLASSES)
    assert math.isnan(result["map50/mass"])
    assert result["map50"] == pytest.approx(1.0) and result["map50_95"] == pytest.approx(1.0)


def test_froc_by_hand(two_images):
    preds, targets = two_images
    result = froc(preds, targets)
    # 2 images, 2 GT boxes. Operating points (FP/image, sensitivity) after each detection by score:
    # 0.9 TP (0, 0.5), 0.8 FP (0.5, 0.5), 0.5 FP (1, 0.5), 0.3 TP (1, 1.0)
    assert result["curve"] == [(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (1.0, 0.5), (1.0, 1.0)]
    expected = {0.125: 0.5, 0.25: 0.5, 0.5: 0.5, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0, 8.0: 1.0}
    for rate, sens in expected.items():
        assert result[f"sensitivity@{rate:g}"] == pytest.approx(sens)
    assert result["froc_mean"] == pytest.approx((3 * 0.5 + 4 * 1.0) / 7)


def test_froc_ties_enter_together_and_iou_threshold():
    """Two detections of the same score, one TP and one FP, on one image: the FP comes with the TP, so at 0 FP/image
    the sensitivity is 0; a loose box (IoU 0.25) counts only with iou_threshold 0.25."""
    targets = [_gt([[0, 0, 10, 10]], [0])]
    tie = [_pred([[0, 0, 10, 10], [40, 40, 50, 50]], [0, 0], [0.7, 0.7])]
    result = froc(tie, targets, rates=(0.5, 1.0))
    assert result["sensitivity@0.5"] == 0.0 and result["sensitivity@1"] == 1.0
    loose = [_pred([[0, 0, 10, 5], [0, 5, 5, 10]], [0, 0], [0.9, 0.1])]  # IoU 0.5 and 0.25
    assert froc(loose, targets, rates=(1.0,))["sensitivity@1"] == 1.0
    assert froc([_pred([[0, 0, 5, 5]], [0], [0.9])], targets, rates=(1.0,), iou_threshold=0.5)["sensitivity@1"] == 0.0
    assert froc([_pred([[0, 0, 5, 5]], [0], [0.9])], targets, rates=(1.0,), iou_threshold=0.25)["sensitivity@1"] == 1.0


def test_summary_counts_and_no_prediction(two_images):
    preds, targets = two_images
    summary = detection_summary(preds, targets, CLASSES)
    assert summary["num_images"] == 2 and summary["num_gt_boxes"] == 2 and summary["num_pred_boxes"] == 4
    assert set(f"sensitivity@{r:g}" for r in FROC_RATES) <= set(summary)
    empty = detection_summary([_pred([], [], []), _pred([], [], [])], targets, CLASSES)
    assert empty["map50"] == 0.0 and empty["froc_mean"] == 0.0


def test_as_numpy_boxes_checks_lengths():
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        as_numpy_boxes({"boxes": np.zeros((2, 4)), "labels": [0]})
