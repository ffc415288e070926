#!/usr/bin/env bash
# Build the separate environment MONAI Label 0.8.5 needs next to medssl (issue #14): a virtual environment that
# sees this interpreter's packages (torch, MONAI and medssl, installed there) and adds monailabel with the pins its
# server needs: pydicom 2.4.4 (pydicom 3 lacks pydicom._storage_sopclass_uids), dicomweb-client 0.59.1, pynetdicom<3.
# Usage: tools/monailabel_env.sh [ENV_DIR]   (default: ~/.cache/medssl/monailabel-env, outside the repository;
# tests/test_monailabel_server.py looks there, or in MEDSSL_MONAILABEL_ENV)
set -euo pipefail
ENV_DIR="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/medssl/monailabel-env}"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv --system-site-packages "$ENV_DIR"
"$ENV_DIR/bin/pip" install --quiet "monailabel==0.8.5" "pydicom==2.4.4" "dicomweb-client==0.59.1" "pynetdicom<3" \
    "jsonschema<4"
"$ENV_DIR/bin/python" -c "import monailabel, medssl, pydicom; print('monailabel', monailabel.__version__, '| medssl', medssl.__version__, '| pydicom', pydicom.__version__)"
echo "MONAI Label environment: $ENV_DIR (start: $ENV_DIR/bin/monailabel start_server ...)"
