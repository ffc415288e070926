"""Build the embedded demo dataset (offline, deterministic) and, optionally, check its learnability set.

    python tools/demo_data.py --out DIR [--seed 0] [--force] [--no-learn] [--workers 1] [--check]

Writes DIR/datalist.json (sections training / validation / test), the task datalists and DIR/README.md in a few
seconds, then the learnability set (DIR/learn/, DIR/datalist_learn*.json; about 40 s of CPU, leave it out with
--no-learn); see medssl/data/DEMO_DATA.md. An up-to-date build in DIR is reused unless --force. --check prints the
kNN accuracy of raw pixels and of randomly initialised encoders on the learnability set (a few minutes).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from medssl.cli import run
from medssl.data.demo import build_demo_dataset


def _summary(path: Path) -> dict:
    datalist = json.loads(path.read_text())
    print(f"datalist: {path}")
    for section in ("training", "validation", "test"):
        counts = Counter(f"{item['modality']}/{item['dim']}D" for item in datalist[section])
        labelled = sum("label" in item for item in datalist[section])
        summary = ", ".join(f"{key} {n}" for key, n in sorted(counts.items()))
        print(f"{section}: {len(datalist[section])} items ({labelled} labelled): {summary}")
    return datalist


def main(
    out: str, seed: int = 0, force: bool = False, no_learn: bool = False, workers: int = 1, check: bool = False
) -> None:
    """Build the demo dataset in ``out`` and print what it holds.

    Args:
        out: dataset directory (created if needed).
        seed: seed of the synthetic images.
        force: rebuild even when an up-to-date build exists.
        no_learn: leave out the learnability set (3,060 images and 480 volumes, about 40 s of CPU and 150 MB).
        workers: processes writing the learnability set (the files are the same for any number).
        check: then print the random-init and raw-pixel kNN accuracy on the learnability set.
    """
    if check and no_learn:
        raise ValueError("--check needs the learnability set: drop --no-learn")
    started = time.perf_counter()
    path = build_demo_dataset(out, seed=seed, force=force, learn=not no_learn, workers=workers)
    seconds = time.perf_counter() - started
    datalist = _summary(path)
    print(f"classes: {datalist['classes']}")
    print(f"real files used: {len(datalist['sources'])}, skipped: {len(datalist['skipped_sources'])}")
    for skipped in datalist["skipped_sources"]:
        print(f"  skipped {skipped}")
    learn = path.parent / "datalist_learn.json"
    if not no_learn:
        learn_list = _summary(learn)
        print(f"learnability classes per modality: {learn_list['modality_classes']}")
        print(f"labels: one range per modality, offsets {learn_list['label_offsets']} (see README.md)")
    print(f"built or reused in {seconds:.1f} s")
    if check:
        from medssl.evaluation.random_init import _main as check_learnability  # torch + networks: --check only

        check_learnability([str(path.parent)])


if __name__ == "__main__":
    run(main)
