"""medssl.detection: 2D lesion detection from a pretrained encoder (bundle ``xray_lesion_detection``).

* :mod:`.network` — MONAI's RetinaNet on medssl's ResNet backbone (or UniMiSS's MiT) + MONAI's feature pyramid, and
  MONAI's ``RetinaNetDetector`` set up without torchvision (ATSS matcher, hard-negative sampler);
* :mod:`.task` — :class:`DetectionTask` (trained by ``medssl.downstream.SupervisedTrainer``), collate and
  ``prepare_batch``;
* :mod:`.metrics` — mAP@0.5 / mAP@[0.5:0.95] per class (MONAI's ``COCOMetric``) and FROC;
* :mod:`.evaluation` — the validation key metric and the evaluation report (per-image CSV, summary JSON, figure);
* :mod:`.transforms` — boxes as tensors, resizing an image with its boxes (MONAI's box transforms do the rest).

Boxes are ``[x1, y1, x2, y2]`` in image pixels along the array's spatial axes in order: medssl's 2D arrays are
``(C, X, Y) = (C, W, H)`` (column index first), so x is the column and y the row of the image.
"""

from .evaluation import DetectionMetric, DetectionReport, plot_detections
from .metrics import FROC_RATES, coco_map, detection_summary, froc
from .network import (
    DEFAULT_LEVELS,
    ENCODER_PREFIX,
    MIT_LEVELS,
    MedsslRetinaNetDetector,
    MiTFPN,
    MiTRetinaNet,
    PyramidRetinaNet,
    ResNetFPN,
    ResNetRetinaNet,
    build_detector,
)
from .task import DetectionTask, collate_detection, detection_targets, prepare_detection_batch
from .transforms import BoxesToTensord, ResizeBoxd

__all__ = [
    "FROC_RATES", "coco_map", "detection_summary", "froc",
    "DEFAULT_LEVELS", "ENCODER_PREFIX", "MedsslRetinaNetDetector", "ResNetFPN", "ResNetRetinaNet", "build_detector",
    "MIT_LEVELS", "MiTFPN", "MiTRetinaNet", "PyramidRetinaNet",
    "DetectionTask", "collate_detection", "detection_targets", "prepare_detection_batch",
    "DetectionMetric", "DetectionReport", "plot_detections", "BoxesToTensord", "ResizeBoxd",
]
