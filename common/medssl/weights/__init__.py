"""medssl.weights: export of a pretrained encoder as a plain state dict + manifest, and loading it back."""

from .export import (
    MANIFEST_FORMAT,
    build_encoder_from_manifest,
    export_encoder,
    extract_encoder_state_dict,
    load_encoder_state_dict,
    load_manifest,
    method_state_dict,
    write_encoder_files,
)
from .convert_unimiss import ConversionReport, convert_unimiss_checkpoint, convert_unimiss_state_dict
from .convert_swav import convert_swav_checkpoint
from .convert_dino import convert_dino_checkpoint
from .convert_medcoss import convert_medcoss_checkpoint
from .stages import load_stage_weights
from .loading import (
    ENCODER_ADAPTERS,
    EncoderAdapter,
    LoadReport,
    default_weights_cache,
    load_pretrained_encoder,
    pretrained_preprocessing,
    register_encoder_adapter,
    resolve_pretrained_path,
)
