"""Stages 2 and 3 of Nguyen et al., "Joint self-supervised image-volume representation learning with intra-inter
contrastive clustering" (AAAI 2023).

* Stage 1 (L_2D, Eq. 1–5) reuses :class:`medssl.methods.SwAV` / :class:`medssl.methods.DeepClusterV2` on 2D slices
  of every volume plus the 2D images, with f_intra's trunk (a :class:`medssl.networks.ResNetBackbone` returning the
  L2-normalised multi-level features, exactly ``SliceEncoder.backbone``) as the backbone.
* Stage 2 (L_mask, Eq. 13–15): :class:`MaskedSliceEmbeddingPrediction`. f_intra is frozen; a learnable [MASK]
  replaces 10 % of the slice embeddings; f_inter contextualises them and f_decode (Linear D → D) predicts the
  missing embeddings; squared error on the masked slices only.
* Stage 3 (L_3D, Eq. 11–12): :class:`medssl.methods.SwAV` (or ``DeepClusterV2``) with
  :class:`medssl.networks.HybridVolumeBackbone` as backbone: the two views' volume embeddings Z_s, Z_t
  (L2-normalised means of f_inter over slices) predict each other's Sinkhorn codes computed over the batch of
  volumes; f_intra and f_inter are trained jointly. The clustering methods put their projection head between Z and
  the prototypes; the bundle uses ``hidden_dim = 0`` (one linear layer), the closest to the paper's Z · Cᵀ that
  keeps one implementation of SwAV and DeepCluster-v2.
* The stages are chained through ``pretrained_path`` outside this module: the bundle builds each stage's backbone
  with :func:`medssl.weights.load_stage_weights`, which copies the encoder tensors of the previous stage's checkpoint
  into it (stage 1 ``backbone`` → stage 2 ``encoder.slice_encoder.backbone``; stage 2 ``encoder`` → stage 3
  ``backbone``), so the methods here receive loaded modules and do no file I/O.

Axis convention: volumes are MONAI-style channel-first (B, C, X, Y, Z), depth (slice) axis LAST.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from medssl.losses.masked_embedding import masked_embedding_loss
from medssl.methods.base import SSLMethod, build_param_groups, crops_from_batch
from medssl.networks.hybrid_volume import HybridVolumeEncoder, random_slice_mask
from medssl.utils.dist import get_rank
from medssl.utils.tensors import as_plain_tensor

__all__ = ["MaskedSliceEmbeddingPrediction"]


# --------------------------------------------------------------------------------------------- stage 2
class MaskedSliceEmbeddingPrediction(SSLMethod):
    """Stage 2 of Nguyen et al. 2023: masked slice-embedding prediction with f_intra frozen (Eq. 13–15).

    One step on volumes x (B, C, X, Y, Z), depth last (``batch[crops_key]``: a list of view tensors, concatenated
    along the batch; or ``batch[image_key]``):

    1. e = f_intra(x) (B, F, D) under ``no_grad`` (``slice_encoder`` frozen: no gradient, eval-mode BatchNorm, so its
       weights and running statistics never change);
    2. M: ceil(``mask_ratio`` · F) slices per volume (7 of 64 at 10 %), drawn from a CPU generator reseeded at every
       step from (``seed``, iteration, rank);
    3. h = f_inter(e with e_M replaced by the learnable [MASK]); ê = f_decode(h) (Linear D → D);
    4. loss = :func:`medssl.losses.masked_embedding_loss` (ê, e, M).

    The target e comes from the frozen f_intra (projection included): were the projection trainable, collapsing it to
    zero would make the target trivially predictable.

    Args:
        encoder: f_intra + f_inter (:class:`~medssl.networks.HybridVolumeEncoder`); its ``mask_embedding`` is [MASK].
        mask_ratio: fraction of masked slices (0.1).
        seed: base seed of the masks.
        crops_key, image_key: batch keys (the crops list is used when present).

    Returns of :meth:`training_step`: ``{"loss": L_mask, "n_masked": masked slices in this rank's batch}``.
    """

    def __init__(
        self,
        encoder: HybridVolumeEncoder,
        mask_ratio: float = 0.1,
        seed: int = 0,
        crops_key: str = "crops",
        image_key: str = "image",
    ) -> None:
        super().__init__()
        if not isinstance(encoder, HybridVolumeEncoder):
            raise TypeError(
                f"MaskedSliceEmbeddingPrediction: encoder must be a HybridVolumeEncoder, got {type(encoder).__name__}"
            )
        if not 0.0 < float(mask_ratio) < 1.0:
            raise ValueError(f"MaskedSliceEmbeddingPrediction: mask_ratio must be in (0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.decoder = nn.Linear(encoder.embed_dim, encoder.embed_dim)  # f_decode
        self.mask_ratio = float(mask_ratio)
        self.seed = int(seed)
        self.crops_key, self.image_key = crops_key, image_key
        self.generator = torch.Generator()
        self.generator.manual_seed(self._step_seed(0))
        for param in self.encoder.slice_encoder.parameters():
            param.requires_grad_(False)
        self.encoder.mask_embedding.requires_grad_(True)  # [MASK] is learnt in this stage
        self.encoder.slice_encoder.eval()

    def train(self, mode: bool = True) -> "MaskedSliceEmbeddingPrediction":
        super().train(mode)
        self.encoder.slice_encoder.eval()  # frozen f_intra: BatchNorm running statistics stay as loaded
        return self

    def _step_seed(self, iteration: int) -> int:
        return (self.seed * 1_000_003 + int(iteration) * 7_919 + get_rank() * 104_729) % (2**63 - 1)

    def on_iteration_start(self, engine: Any) -> None:
        """Reseed the mask generator from (seed, iteration, rank): the masks are the same after a resume."""
        self.generator.manual_seed(self._step_seed(engine.state.iteration))

    def _volumes(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if isinstance(batch, Mapping) and self.crops_key in batch:
            volumes = torch.cat(crops_from_batch(batch, self.crops_key, "MaskedSliceEmbeddingPrediction"), dim=0)
        elif isinstance(batch, Mapping) and self.image_key in batch:
            volumes = as_plain_tensor(batch[self.image_key])
        else:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(
                f"MaskedSliceEmbeddingPrediction: the batch has neither {self.crops_key!r} nor {self.image_key!r}; "
                f"batch keys: {keys}"
            )
        if volumes.dim() != 5:
            raise ValueError(
                f"MaskedSliceEmbeddingPrediction: volumes (B, C, X, Y, Z) with the depth axis last expected, got "
                f"{tuple(volumes.shape)}"
            )
        return volumes

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        volumes = self._volumes(batch)
        with torch.no_grad():
            targets = self.encoder.embed_slices(volumes)  # e: (B, F, D), frozen f_intra
        mask = random_slice_mask(
            targets.shape[0], targets.shape[1], self.mask_ratio, generator=self.generator, device=targets.device
        )
        contextual = self.encoder.contextualize(self.encoder.mask_slices(targets, mask))
        predictions = self.decoder(contextual)
        loss = masked_embedding_loss(predictions, targets, mask)
        # detached diagnostics for medssl.evaluation.HealthMonitorHandler: the predicted embeddings of masked slices
        health = {"embeddings": predictions.detach()[mask.to(torch.bool)]}
        return {"loss": loss, "n_masked": int(mask.sum()), "health": health}

    def parameter_groups(
        self, base_lr: float | None = None, weight_decay: float | None = None, no_decay_bias_norm: bool = True
    ) -> list[dict[str, Any]]:
        """Groups ``transformer_*`` (f_inter and [MASK]) and ``decoder_*`` (f_decode); f_intra is frozen."""
        seen: set[int] = set()
        groups = build_param_groups(
            [(n, p) for n, p in self.encoder.named_parameters() if not n.startswith("slice_encoder.")],
            base_lr, weight_decay, no_decay_bias_norm, name="transformer", exclude=seen,
        )
        groups += build_param_groups(
            self.decoder.named_parameters(), base_lr, weight_decay, no_decay_bias_norm, name="decoder", exclude=seen
        )
        return groups
