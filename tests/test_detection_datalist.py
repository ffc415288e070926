"""`tools/datalist.py check` on detection items: each box fault (outside the image, not a positive size, an unknown
label, boxes and labels of different lengths) is named on its own line with the file; normal images pass."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from medssl.data.datalist import box_problems, check_datalist

from conftest import PYTHON, TOOLS, run_cmd


def test_box_problems_one_message_per_fault():
    assert box_problems([[0, 0, 10, 10]], [1], (100, 50), num_classes=2) == []
    assert box_problems(None, None, (100, 50)) == []  # a normal image
    assert box_problems([[90, 0, 101, 10]], [0], (100, 50)) == [
        "box 0 [90, 0, 101, 10]: outside the image (width 100, height 50)"
    ]
    assert box_problems([[0, 0, 10, 51]], [0], (100, 50))[0].endswith("outside the image (width 100, height 50)")
    assert box_problems([[5, 0, 5, 10]], [0], (100, 50)) == [
        "box 0 [5, 0, 5, 10]: not a positive size (width 0, height 10)"
    ]
    assert box_problems([[0, 0, 10, 10]], [2], (100, 50), num_classes=2) == ["label 0 = 2: not a known class (0..1)"]
    assert box_problems([[0, 0, 10, 10]], [-1], (100, 50)) == ["label 0 = -1: not a known class (an integer >= 0)"]
    assert box_problems([[0, 0, 10, 10]], [], (100, 50)) == ["1 boxes but 0 labels"]
    assert box_problems([[0, 0, 10]], [0], (100, 50)) == [
        "box 0 [0, 0, 10]: not [x1, y1, x2, y2] (four finite numbers)"
    ]


def test_check_names_each_box_fault_with_the_file(tmp_path):
    # a 100 x 50 (width x height) PNG: x runs to 100, y to 50
    Image.fromarray(np.arange(5000).reshape(50, 100).astype(np.uint8)).save(tmp_path / "a.png")
    item = {"image": "a.png", "modality": "XR", "dim": 2}
    datalist = {
        "detection_classes": ["nodule", "mass"],
        "training": [
            {**item, "boxes": [[10, 10, 20, 20], [60, 10, 120, 20], [30, 30, 30, 40]], "labels": [0, 1, 5]},
            {**item, "boxes": [], "labels": []},
            dict(item),
            {**item, "boxes": [[80, 40, 100, 50]], "labels": [1]},  # touching the far corner is inside
        ],
    }
    path = tmp_path / "detection.json"
    path.write_text(json.dumps(datalist))
    lines: list[str] = []
    result = check_datalist(path, workers=0, print_fn=lines.append)
    assert result["summary"]["bad"] == 1 and result["summary"]["ok"] == 3
    faults = [line for line in lines if line.startswith("training item 0:")]
    assert faults == [
        f"training item 0: {tmp_path / 'a.png'}: box 1 [60, 10, 120, 20]: outside the image (width 100, height 50)",
        f"training item 0: {tmp_path / 'a.png'}: box 2 [30, 30, 30, 40]: not a positive size (width 0, height 10)",
        f"training item 0: {tmp_path / 'a.png'}: label 2 = 5: not a known class (0..1)",
    ]
    proc = run_cmd([PYTHON, str(TOOLS / "datalist.py"), "check", str(path), "--workers", "0"])
    assert proc.returncode == 1 and "box 1 [60, 10, 120, 20]: outside the image" in proc.stdout
