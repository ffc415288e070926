"""UniMiSS: cross-dimensional self-distillation of one dimension-free MiT on 2D images and 3D volumes.

Xie et al., "UniMiSS: Universal Medical Self-Supervised Learning via Breaking Dimensionality Barrier", ECCV 2022
(numbers: the paper's implementation details and the authors' code, YtongXie/UniMiSS-code). A student g_s = head ∘ MiT
and a teacher g_t of the same architecture (the EMA of the student, :class:`medssl.engines.EMATeacherHandler`; no
gradient) see V (= 2) augmented views of each item; H is :class:`medssl.losses.DINOLoss` (centred, sharpened teacher;
τ_s = 0.1, τ_t = 0.04; the centre C updated after every call). Every batch holds items of one spatial dimension
(:class:`medssl.data.DimensionAlternatingBatchSampler`: v batches of 2D, then v of 3D).

* **2D step (Eq. 5)**: f = g(x) for the views x₁, x₂ (B, C, H, W); loss = ½ (H(f_t(x₁), f_s(x₂)) + H(f_t(x₂),
  f_s(x₁))). Only the 2D path and the shared parameters are used: the 3D-only parameters (3D patch embeddings,
  3D spatial-reduction convs, 3D position embeddings) get no gradient (``grad`` stays ``None``).
* **3D step (Eq. 6, volume–slice consistency)**: for each view v (B, C, X, Y, Z), depth last, the volume output
  f_v = g(v) (3D path) and the slice output f′_v = (1/m) Σ_z g(v[..., z]) — the mean over the m axial slices
  (96 × 96 images, the grey channel repeated to 3) of the head outputs of the 2D path. Loss = the sum of four DINO
  losses, each the two cross terms between the views (both directions), eight cross terms in all::

      L = H̄(f_s, f_t) + H̄(f′_s, f_t) + H̄(f_s, f′_t) + H̄(f′_s, f′_t),
      H̄(a_s, b_t) = ½ (H(b_t(x₁), a_s(x₂)) + H(b_t(x₂), a_s(x₁)))

  (volume↔volume, slice-student↔volume-teacher, volume-student↔slice-teacher, slice↔slice), in this order, each
  call updating the centre C as the reference does (four updates per 3D step). A 3D step uses both paths.

Stacks are view-major ((V·B, K), rows v·B … (v+1)·B − 1 = view v). MiT's 2D path takes 3 channels: a grey view or
slice (1 channel) is repeated to 3 here (the reference's channel repeat), on the device.

Distributed: the trainer wraps the method in DDP; give it ``find_unused_parameters=True`` (the bundle does), since a
2D step leaves the 3D-only parameters unused. The teacher's parameters have ``requires_grad=False`` (DDP ignores
them; the EMA handler updates them identically on every rank).

The stateful recipe lives in handlers, listed by the bundle: EMA teacher (cosine momentum 0.996 → 1), last head
layer frozen during the first epoch (``FreezeLastLayerHandler("student.head.last_layer")``), per-parameter gradient
clipping 0.3, cosine schedules of lr (warm-up) and weight decay (0.04 → 0.4).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from medssl.bundle.params import as_bool
from medssl.losses.dino import DINOLoss
from medssl.methods.base import SSLMethod, crops_from_batch
from medssl.networks.dino_head import DINOHead

__all__ = ["UniMiSS", "DistillationNetwork", "volume_slices", "match_channels"]


def match_channels(x: torch.Tensor, channels: int | None, where: str) -> torch.Tensor:
    """``x`` (N, C, *spatial) with ``channels`` channels: unchanged when it has them (or ``channels`` is None); a single
    grey channel repeated (an expanded view, no copy); anything else is a ValueError naming ``where``."""
    if channels is None or x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, *x.shape[2:])
    raise ValueError(f"UniMiSS: {where} of shape {tuple(x.shape)} has {x.shape[1]} channels; expected {channels} or 1")


def volume_slices(volumes: torch.Tensor, max_slices: int | None = None) -> tuple[torch.Tensor, int]:
    """The axial slices of volumes (N, C, X, Y, Z) — depth LAST — as 2D images (N·m, C, X, Y), slice-major within
    each volume (row n·m + j = slice j of volume n). ``max_slices``: keep m evenly spaced slices (rounded indices
    over [0, Z − 1]) instead of all Z (None = all, the reference). Returns (slices, m)."""
    if volumes.dim() != 5:
        raise ValueError(f"volume_slices: expected volumes (N, C, X, Y, Z), depth last; got {tuple(volumes.shape)}")
    depth = int(volumes.shape[-1])
    if max_slices is not None and 0 < max_slices < depth:
        index = torch.linspace(0, depth - 1, int(max_slices)).round().long().to(volumes.device)
        volumes = volumes.index_select(-1, index)
    n, c, x, y, m = volumes.shape
    return volumes.permute(0, 4, 1, 2, 3).reshape(n * m, c, x, y), int(m)


class DistillationNetwork(nn.Module):
    """g = head ∘ backbone: the student / teacher network (keys ``backbone.*`` and ``head.*``, as the reference's
    ``MultiCropWrapper`` and the published checkpoints' ``teacher`` entry)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class UniMiSS(SSLMethod):
    """Cross-dimensional self-distillation (see the module docstring).

    Args:
        backbone: the MiT (``medssl.networks.mit_small()``; both paths for mixed data) or any module mapping 2D
            ``(B, C, H, W)`` and 3D ``(B, C, X, Y, Z)`` (depth last) batches to ``(B, feature_dim)``; needs an int
            attribute ``feature_dim`` (48 for MiT with its decoder). Its ``in_channels_2d`` / ``in_channels_3d``
            attributes, when present, are the channel counts grey inputs are repeated to.
        out_dim: K, the DINO head's output size (65536).
        hidden_dim, bottleneck_dim, n_layers: the head's MLP (2048, 256, 3: 48 → 2048 → 2048 → 256).
        norm_last_layer: the head's last-layer weight-norm gain fixed at 1 (True, the reference).
        use_bn: BatchNorm1d after each hidden Linear of the head (False, the reference; DINO's option for CNNs).
        student_temp, teacher_temp, center_momentum: τ_s (0.1), τ_t (0.04), ω (0.9) of :class:`DINOLoss`
            (``loss.teacher_temp`` can be scheduled).
        n_views: V, views per item (2).
        slice_consistency: add the slice terms of Eq. 6 in 3D steps (True). False = 3D steps use the volume term
            only (an ablation; also what a backbone without a 2D path allows).
        max_slices: slices per view for f′ (None = every slice, the reference; fewer, evenly spaced, to save
            memory).
        crops_key: the batch key of the list of views.

    Attributes: ``student`` / ``teacher`` (:class:`DistillationNetwork`; the teacher starts as a copy of the student,
    ``requires_grad=False``), ``loss`` (:class:`DINOLoss`).

    :meth:`training_step` returns ``{"loss", "dim", "loss_volume"}`` and, for 3D steps with slices,
    ``"loss_volume_slice"`` (the two mixed terms) and ``"loss_slice"``; ``"loss_volume"`` is the 2D loss in 2D steps.
    """

    def __init__(
        self,
        backbone: nn.Module,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        center_momentum: float = 0.9,
        n_views: int = 2,
        slice_consistency: bool = True,
        max_slices: int | None = None,
        crops_key: str = "crops",
    ) -> None:
        super().__init__()
        feature_dim = getattr(backbone, "feature_dim", None)
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(
                f"UniMiSS: the backbone ({type(backbone).__name__}) needs an int attribute feature_dim "
                "(its output size)"
            )
        if n_views < 2:
            raise ValueError(f"UniMiSS: n_views={n_views} must be >= 2")
        if max_slices is not None and max_slices < 1:
            raise ValueError(f"UniMiSS: max_slices={max_slices} must be >= 1 or None")
        paths = tuple(getattr(backbone, "paths", (2, 3)))
        if slice_consistency and 2 not in paths:
            raise ValueError(
                f"UniMiSS: slice_consistency=True needs a backbone with a 2D path (it has paths {paths}); "
                "use slice_consistency=False for a 3D-only backbone"
            )
        head = DINOHead(
            feature_dim, out_dim, hidden_dim, bottleneck_dim, n_layers=n_layers, norm_last_layer=norm_last_layer,
            use_bn=as_bool(use_bn, "use_bn"),
        )
        self.student = DistillationNetwork(backbone, head)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.loss = DINOLoss(out_dim, student_temp, teacher_temp, center_momentum, n_views=n_views)
        self.feature_dim = feature_dim
        self.n_views = int(n_views)
        self.slice_consistency = bool(slice_consistency)
        self.max_slices = max_slices
        self.crops_key = crops_key
        self.channels = {2: getattr(backbone, "in_channels_2d", None), 3: getattr(backbone, "in_channels_3d", None)}

    # ------------------------------------------------------------------ convenience
    @property
    def backbone(self) -> nn.Module:
        """The student's backbone."""
        return self.student.backbone

    def embed(self, images: torch.Tensor, teacher: bool = True) -> torch.Tensor:
        """SSL-token embeddings (B, feature_dim) of images (B, C, H, W) or volumes (B, C, X, Y, Z), depth last, by the
        teacher's backbone (default; the network the reference exports) or the student's. Grey 2D inputs are
        repeated to the 2D path's channels. Gradient and modes are the caller's."""
        network = self.teacher if teacher else self.student
        dim = images.dim() - 2
        return network.backbone(match_channels(images, self.channels.get(dim), f"{dim}D input"))

    def _apply_network(self, network: nn.Module, x: torch.Tensor, dim: int, where: str) -> torch.Tensor:
        return network(match_channels(x, self.channels.get(dim), where))

    def _slice_outputs(self, network: nn.Module, volumes: torch.Tensor) -> torch.Tensor:
        """f′ = mean over the slices of g(slice): (N, K) for volumes (N, C, X, Y, Z), depth last."""
        slices, m = volume_slices(volumes, self.max_slices)
        out = self._apply_network(network, slices, 2, "slice")
        return out.reshape(volumes.shape[0], m, -1).mean(dim=1)

    # ------------------------------------------------------------------ step
    def training_step(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        views = crops_from_batch(batch, self.crops_key, "UniMiSS")
        if len(views) != self.n_views:
            raise ValueError(f"UniMiSS: the batch holds {len(views)} views; n_views={self.n_views}")
        if len({tuple(v.shape) for v in views}) != 1:
            raise ValueError(f"UniMiSS: views of different shapes {[tuple(v.shape) for v in views]}")
        rank = views[0].dim()
        if rank not in (4, 5):
            raise ValueError(
                f"UniMiSS: views of shape {tuple(views[0].shape)}; expected 2D (B, C, H, W) or 3D (B, C, X, Y, Z), "
                "depth last — every batch must hold items of one dimension (DimensionAlternatingBatchSampler)"
            )
        dim = rank - 2
        stacked = torch.cat(views, dim=0)  # (V·B, C, *spatial), view-major
        student_out = self._apply_network(self.student, stacked, dim, f"{dim}D view")
        with torch.no_grad():
            teacher_features = self.teacher.backbone(match_channels(stacked, self.channels.get(dim), f"{dim}D view"))
            teacher_out = self.teacher.head(teacher_features)  # = self.teacher(...), keeping the backbone features
            # detached diagnostics of view 0 (one row per item) for medssl.evaluation.HealthMonitorHandler: P_t
            # with the centre this loss uses
            first = slice(0, stacked.shape[0] // self.n_views)
            health = {
                "embeddings": teacher_features[first],
                "teacher_probs": self.loss.teacher_probs(teacher_out[first]),
                "center": self.loss.center.clone(),
                "teacher_temp": self.loss.teacher_temp,
            }
        loss_volume = self.loss(student_out, teacher_out)
        if dim == 2 or not self.slice_consistency:
            return {"loss": loss_volume, "dim": float(dim), "loss_volume": loss_volume.detach(), "health": health}

        student_slices = self._slice_outputs(self.student, stacked)
        with torch.no_grad():
            teacher_slices = self._slice_outputs(self.teacher, stacked)
        loss_slice_volume = self.loss(student_slices, teacher_out)
        loss_volume_slice = self.loss(student_out, teacher_slices)
        loss_slice = self.loss(student_slices, teacher_slices)
        loss = loss_volume + loss_slice_volume + loss_volume_slice + loss_slice
        return {
            "loss": loss,
            "dim": float(dim),
            "loss_volume": loss_volume.detach(),
            "loss_volume_slice": (loss_slice_volume + loss_volume_slice).detach(),
            "loss_slice": loss_slice.detach(),
            "health": health,
        }
