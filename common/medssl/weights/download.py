"""Downloading weights files: the cache folder, what counts as a URL, and one download with a sha256 check.

Shared by :mod:`medssl.weights.loading` (``pretrained_path`` URLs) and :mod:`medssl.weights.catalogue` (published
encoders by name); kept apart so that the loader can resolve catalogue names without an import cycle.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse

from medssl.utils.io import file_sha256

__all__ = ["default_weights_cache", "is_url", "download_file", "URL_SCHEMES"]

URL_SCHEMES = ("http", "https", "file")


def default_weights_cache() -> Path:
    """``$MEDSSL_CACHE/weights`` or ``~/.cache/medssl/weights``."""
    root = os.environ.get("MEDSSL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medssl")
    return Path(root) / "weights"


def is_url(path: Any) -> bool:
    return isinstance(path, str) and urlparse(path).scheme in URL_SCHEMES


def _reason(error: BaseException) -> str:
    """A short, one-line reason for a failed download (no network, HTTP status, missing file)."""
    if isinstance(error, HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, URLError):
        text = str(error.reason)
        if "Name or service not known" in text or "Temporary failure in name resolution" in text:
            text += "; no internet connection?"
        return text
    return f"{type(error).__name__}: {error}"


def download_file(url: str, dest: Path, sha256: str | None, expected_from: str = "pretrained_sha256") -> str:
    """Download ``url`` to ``dest`` (through a temporary file beside it, so nothing partial is left) and return the
    file's sha256. With ``sha256`` the file must match, else a one-line ``ValueError`` naming the URL, both hashes and
    where the expected one came from (``expected_from``); the file is then deleted. A failed download (no network,
    HTTP error, a ``file://`` path that does not exist) is a one-line ``OSError`` naming the URL and the reason."""
    from monai.apps.utils import download_url

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmp_file = Path(tmp) / dest.name
        monai_logger = logging.getLogger("monai.apps")  # its "Download failed" line is replaced by ours below
        level = monai_logger.level
        monai_logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():  # MONAI warns that no hash was given: it is checked below, naming both
            warnings.filterwarnings("ignore", message="No hash value provided")
            try:
                download_url(url, tmp_file, hash_val=None, progress=False)
            except (OSError, RuntimeError) as e:  # URLError / HTTPError are OSErrors; MONAI may wrap in RuntimeError
                cause = e.__cause__ if isinstance(e, RuntimeError) and e.__cause__ is not None else e
                raise OSError(f"{url}: download failed ({_reason(cause)}); nothing was cached") from e
            finally:
                monai_logger.setLevel(level)
        actual = file_sha256(tmp_file)
        if sha256 and actual.lower() != sha256.lower():
            raise ValueError(
                f"{url}: downloaded file has sha256 {actual}, but {expected_from} is {sha256} (wrong URL, "
                "changed upload or corrupted download; nothing was cached)"
            )
        os.replace(tmp_file, dest)
    return actual
