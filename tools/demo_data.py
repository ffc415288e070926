"""Build the embedded demo dataset (offline, deterministic, a few seconds).

    python tools/demo_data.py --out DIR [--seed 0] [--force]

Writes DIR/datalist.json (sections training / validation / test), the task datalists and DIR/README.md;
see medssl/data/DEMO_DATA.md. An up-to-date build in DIR is reused unless --force.
"""

from __future__ import annotations

import json
from collections import Counter

from medssl.cli import run
from medssl.data.demo import build_demo_dataset


def main(out: str, seed: int = 0, force: bool = False) -> None:
    """Build the demo dataset in ``out`` and print what it holds.

    Args:
        out: dataset directory (created if needed).
        seed: seed of the synthetic images.
        force: rebuild even when an up-to-date build exists.
    """
    path = build_demo_dataset(out, seed=seed, force=force)
    datalist = json.loads(path.read_text())
    print(f"datalist: {path}")
    for section in ("training", "validation", "test"):
        counts = Counter(f"{item['modality']}/{item['dim']}D" for item in datalist[section])
        labelled = sum("label" in item for item in datalist[section])
        summary = ", ".join(f"{key} {n}" for key, n in sorted(counts.items()))
        print(f"{section}: {len(datalist[section])} items ({labelled} labelled): {summary}")
    print(f"classes: {datalist['classes']}")
    print(f"real files used: {len(datalist['sources'])}, skipped: {len(datalist['skipped_sources'])}")
    for skipped in datalist["skipped_sources"]:
        print(f"  skipped {skipped}")


if __name__ == "__main__":
    run(main)
