"""The chain of a staged bundle (MedCoSS's ``ssl_medcoss_continual_pretrain``): every stage a full run of the same
merged bundle config with ``stage`` set, in ``<output_dir>/<stage>`` with checkpoints in ``<ckpt_dir>/<stage>``; a
chain resumed with ``resume=True`` skips the stages whose folder holds ``stage_done.json`` (written by the stage's own
last step, :func:`medssl.engines.medcoss_stages.finish_stage`) and resumes the interrupted one. Ours: MONAI bundles
run one workflow; this runs one per stage from a single command line, overrides included."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medssl.bundle import as_bool
from medssl.engines.run_config import _active_config_parser
from medssl.engines.medcoss_stages import STAGE_DONE, previous_stage

__all__ = ["run_stages"]

logger = logging.getLogger(__name__)


def run_stages(order: Sequence[str], run_only: Sequence[str] | None, output_dir: str, ckpt_dir: str,
               resume: Any = False, stage_key: str = "stage", stage_run_key: str = "stage_run") -> list[str]:
    """Run the chain's stages (see the module docstring) from the bundle config evaluating this call: for each stage
    a new ``ConfigParser`` of the same merged config (command-line overrides included) with ``stage``,
    ``output_dir``, ``ckpt_dir`` and ``previous_stage_dir`` set, whose ``stage_run`` list is evaluated. Returns the
    stages run."""
    from monai.bundle import ConfigParser

    parser = _active_config_parser()
    if parser is None:
        raise ValueError("run_stages: call it from a bundle config expression ($medssl.engines.medcoss_stages...)")
    order = list(order)
    wanted = list(order if run_only in (None, "", []) else run_only)
    unknown = [s for s in wanted if s not in order]
    if unknown:
        raise ValueError(f"MedCoSS: unknown stage(s) {unknown}; the stages are {order}")
    resume = as_bool(resume, "resume")
    root, ckpt_root = Path(output_dir), Path(ckpt_dir)
    ran = []
    for stage in order:
        if stage not in wanted:
            continue
        prev = previous_stage(order, stage)
        stage_dir = root / stage
        if (stage_dir / STAGE_DONE).is_file():
            if resume:
                logger.info("stage %s is done (%s): skipped", stage, stage_dir / STAGE_DONE)
                continue
            raise FileExistsError(
                f"{stage_dir}: stage {stage} already ran; pass --resume true to continue the chain, or another "
                "--output_dir"
            )
        config = copy.deepcopy(parser.get())
        config.update({
            stage_key: stage, "output_dir": str(stage_dir), "ckpt_dir": str(ckpt_root / stage),
            "previous_stage_dir": str(root / prev) if prev else None,
        })
        logger.info("MedCoSS stage %s (%d of %d) in %s", stage, order.index(stage) + 1, len(order), stage_dir)
        sub = ConfigParser(config)
        sub.get_parsed_content(stage_run_key)
        ran.append(stage)
    return ran
