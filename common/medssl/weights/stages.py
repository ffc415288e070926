"""Chaining pretraining stages: a previous stage's encoder tensors loaded into the next stage's module.

The joint image-volume bundle (``bundles/ssl_joint_image_volume_pretrain``) trains in three stages, each from the
previous one's ``ckpt_dir``; its stage files build the backbone as ::

    "backbone": "$medssl.weights.load_stage_weights(@encoder, @pretrained_path, @pretrained_source_key,
                                                    @pretrained_target_key)"

(stage 1 ``backbone`` → stage 2 ``encoder.slice_encoder.backbone``; stage 2 ``encoder`` → stage 3 ``backbone``), so
the method (:mod:`medssl.methods.joint_volume`) receives an already loaded module and does no I/O itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from medssl.engines.checkpoint import find_latest_checkpoint
from medssl.weights.export import extract_encoder_state_dict, load_encoder_state_dict, method_state_dict

__all__ = ["load_stage_weights"]

logger = logging.getLogger(__name__)


def _checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        found = find_latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"pretrained_path {path}: a folder without any complete checkpoint")
        return found
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained_path {path}: no such checkpoint file or ckpt_dir (run the previous stage first, or pass "
            "--pretrained_path)"
        )
    return path


def load_stage_weights(
    module: nn.Module,
    path: str | Path | None,
    source_key: str = "backbone",
    target_key: str = "",
    method_key: str = "method",
) -> nn.Module:
    """Load the tensors of a previous stage into ``module`` (strict) and return ``module``.

    Args:
        module: the module of this stage (e.g. a :class:`~medssl.networks.HybridVolumeEncoder`).
        path: a checkpoint written by :class:`medssl.engines.CheckpointHandler`, a ``ckpt_dir`` (its latest complete
            checkpoint), or a plain state dict file (``tools/export_encoder.py`` output); None or "" = nothing is
            loaded (a warning says the stage starts from random weights).
        source_key: dotted module path of the encoder inside the checkpoint's method (stage 1: ``"backbone"``;
            stage 2: ``"encoder"``); ``""`` = the whole state dict.
        target_key: the sub-module of ``module`` that receives it (``"slice_encoder.backbone"``; ``""`` = ``module``).
        method_key: the checkpoint entry holding the method's state dict.

    Raises FileNotFoundError / KeyError / ValueError naming the file and the missing, unexpected or mis-shaped keys.
    """
    if path is None or str(path) == "":
        logger.warning(f"load_stage_weights: no pretrained_path; {type(module).__name__} starts from random weights")
        return module
    file = _checkpoint_file(Path(path))
    source = str(file)
    checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    state = method_state_dict(checkpoint, method_key, source)
    encoder_state = extract_encoder_state_dict(state, source_key, source)
    try:
        target = module.get_submodule(target_key) if target_key else module
    except AttributeError as e:
        raise KeyError(f"load_stage_weights({source}): {type(module).__name__} has no sub-module {target_key!r}") from e
    load_encoder_state_dict(target, encoder_state, f"{source} [{source_key or 'all'} -> {target_key or 'all'}]")
    logger.info(f"load_stage_weights: {len(encoder_state)} tensors of {source} [{source_key}] -> {target_key or 'all'}")
    return module
