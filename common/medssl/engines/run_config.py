"""The run's config, saved in its run folder so that what was trained can be rebuilt without the command line.

A bundle run is ``train.json`` merged with override files (``demo.json``, ``smoke.json``, a stage file...) and
command-line values; the checkpoints alone do not say which. :func:`save_run_config`, called by the pretraining
bundles' ``run`` list before training, writes the merged config (MONAI's ``ConfigParser.get()``: every file and
override applied, ``@`` references and ``$`` expressions kept as text, ``_meta_`` included) to
``<output_dir>/run_config.json``; ``tools/export_encoder.py`` reads it there when no ``--config`` is given
(:func:`find_run_config`).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medssl.utils.dist import is_main_process
from medssl.utils.io import atomic_write_text

__all__ = ["RUN_CONFIG_NAME", "find_run_config", "save_run_config"]

logger = logging.getLogger(__name__)

RUN_CONFIG_NAME = "run_config.json"


def _active_config_parser() -> Any:
    """The ``monai.bundle.ConfigParser`` evaluating the expression that called us (found on the call stack)."""
    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, ConfigParser):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


def save_run_config(output_dir: str | Path, config: Mapping[str, Any] | None = None) -> Path | None:
    """Write the run's merged config to ``<output_dir>/run_config.json`` (rank 0; atomically) and return its path.

    ``config`` defaults to the config of the bundle being run: called from a bundle expression
    (``"$medssl.engines.save_run_config(@output_dir)"``), it is the content of the ``ConfigParser`` evaluating it.
    MONAI writes this file only with experiment tracking (``ConfigWorkflow``'s ``save_execute_config``); this
    writes it for every run. A resumed run rewrites it.
    """
    if config is None:
        parser = _active_config_parser()
        if parser is None:
            raise ValueError(
                "save_run_config: not called from a MONAI bundle config expression; pass config= (the config dict)"
            )
        config = parser.get()
    if not is_main_process():
        return None
    path = Path(output_dir) / RUN_CONFIG_NAME
    atomic_write_text(path, json.dumps(config, indent=4, default=str) + "\n")
    logger.info(f"saved the run's config to {path} (tools/export_encoder.py reads it)")
    return path


def find_run_config(checkpoint: str | Path) -> Path | None:
    """The ``run_config.json`` of the run a checkpoint file or ``ckpt_dir`` belongs to: beside it or one folder up
    (``output_dir/ckpt/...``); None when there is none."""
    checkpoint = Path(checkpoint)
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    for candidate in (folder / RUN_CONFIG_NAME, folder.parent / RUN_CONFIG_NAME):
        if candidate.is_file():
            return candidate
    return None
