"""medssl.engines: the Ignite SSL trainer (on monai.engines), its handlers, checkpoints and distributed set-up."""

from .checkpoint import (
    FINAL_CHECKPOINT_NAME,
    CheckpointHandler,
    CheckpointReadError,
    checkpoint_name,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from .clustering_handlers import DeepClusterEpochHandler, FreezePrototypesHandler, SwAVQueueHandler
from .profiling import StepTimeProfiler, batch_size_of
from .run_config import RUN_CONFIG_NAME, find_run_config, save_run_config
from .distributed import (
    barrier,
    destroy_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    local_device,
)
from .handlers import (
    CosineScheduleHandler,
    HandlerGroup,
    TerminateOnNanHandler,
    TrainingLogHandler,
    cosine_schedule_value,
)
from .teacher import (
    EMATeacherHandler,
    FreezeLastLayerHandler,
    PerParameterGradClipHandler,
    clip_gradients_per_parameter,
    ema_update_,
)
from .trainer import (
    SSLTrainer,
    StepOutput,
    default_prepare_batch,
    epoch_sampler,
    epoch_started_fresh,
    get_output_value,
    output_is_finite,
    to_device,
)
