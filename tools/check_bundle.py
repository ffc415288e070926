"""Check bundles against medssl's bundle contract (MONAI bundle specification + model-zoo checks).

    python tools/check_bundle.py                      # every bundle under bundles/
    python tools/check_bundle.py bundles/my_bundle    # one bundle
    python tools/check_bundle.py bundles/X --no-workflows   # skip the ConfigWorkflow property checks (faster)

Prints one block per bundle (errors and warnings) and exits non-zero when any bundle has an error.
"""

from __future__ import annotations

import sys
from pathlib import Path

from medssl.bundle import find_bundles, verify_bundle
from medssl.cli import run

REPO = Path(__file__).resolve().parents[1]


def main(*bundles: str, workflows: bool = True) -> None:
    """Verify the given bundle folders (default: all of bundles/); exit 1 if any violates the contract."""
    paths = [Path(b) for b in bundles] or find_bundles(REPO / "bundles")
    if not paths:
        print("no bundles found")
        return
    failed = 0
    for path in paths:
        report = verify_bundle(path, check_workflows=workflows)
        print(report)
        failed += not report.ok
    print(f"{len(paths) - failed} bundle(s) OK, {failed} with problems")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run(main)
