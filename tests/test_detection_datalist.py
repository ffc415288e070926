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


def test_vindr_csv_converter(tmp_path):
    """A VinDr-CXR-style CSV: boxes per image (duplicate reader boxes once), "No finding" rows as normal images, the
    classes sorted, a seeded split; the tool writes it and the result passes `check` on its box rules."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(np.arange(5000).reshape(50, 100).astype(np.uint8)).save(images / f"{name}.png")
    (tmp_path / "train.csv").write_text(
        "image_id,rad_id,class_name,class_id,x_min,y_min,x_max,y_max\n"
        "a,R1,Nodule/Mass,8,10,12,20,22\n"
        "a,R2,Nodule/Mass,8,10,12,20,22\n"
        "a,R2,Aortic enlargement,0,40.5,5,60,25.5\n"
        "b,R1,No finding,14,,,,\n"
        "c,R3,Nodule/Mass,8,1,2,3,4\n"
    )
    out = tmp_path / "detection.json"
    proc = run_cmd([PYTHON, str(TOOLS / "datalist.py"), "vindr", "--csv", str(tmp_path / "train.csv"), "--images",
                    str(images), "--out", str(out), "--suffix", ".png", "--val-fraction", "0", "--test-fraction", "0"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    datalist = json.loads(out.read_text())
    assert datalist["detection_classes"] == ["Aortic enlargement", "Nodule/Mass"]
    items = {item["image"]: item for item in datalist["training"]}
    assert items["images/a.png"]["boxes"] == [[10.0, 12.0, 20.0, 22.0], [40.5, 5.0, 60.0, 25.5]]
    assert items["images/a.png"]["labels"] == [1, 0]
    assert items["images/b.png"]["boxes"] == [] and items["images/b.png"]["labels"] == []
    assert check_datalist(out, workers=0, verbose=False)["summary"]["bad"] == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,class_name,x_min,y_min,x_max,y_max\na,Nodule,1,x,3,4\n")
    proc = run_cmd([PYTHON, str(TOOLS / "datalist.py"), "vindr", "--csv", str(bad), "--images", str(images),
                    "--out", str(tmp_path / "b.json")])
    assert proc.returncode != 0 and "bad.csv:2: y_min='x' is not a number" in proc.stdout + proc.stderr
