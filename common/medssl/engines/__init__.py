"""medssl.engines: the Ignite SSL trainer (on monai.engines), its handlers and its checkpoints.

The process-group set-up and rank helpers (:mod:`medssl.utils.dist`) are re-exported here because the bundle configs
call them by these names."""

from .checkpoint import (
    FINAL_CHECKPOINT_NAME,
    BestModelState,
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
# process-group set-up and rank helpers live in medssl.utils.dist; the bundle configs call them as
# medssl.engines.init_distributed() / destroy_distributed() / local_device() / get_world_size()
from medssl.utils.dist import (
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
    AugmentOnDevice,
    SSLTrainer,
    StepOutput,
    UniMiSSAugmentOnDevice,
    default_prepare_batch,
    epoch_sampler,
    epoch_started_fresh,
    get_output_value,
    output_is_finite,
    to_device,
)
