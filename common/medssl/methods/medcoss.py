"""MedCoSS (Ye et al. 2024): one stage of continual multi-modal self-supervised pretraining.

A stage learns one modality (``kind``: ``"text"``, ``"2d"`` or ``"3d"``) with a shared
:class:`medssl.networks.MultiModalViT`:

* **current-modality batches**: images through MAE (mask ratio 0.75, :class:`medssl.networks.MAEDecoder`,
  :func:`medssl.losses.normalized_pixel_loss` on the masked patches), text through masked language modelling (15 %,
  :class:`medssl.networks.MLMHead`, :func:`medssl.losses.mlm_loss`);
* **rehearsal batches** of every earlier modality (``batch["buffer"]``, a list of single-modality sub-batches, each
  with its ``"kind"``): intra-modal mixup (images ``x <- lam x + (1 - lam) x[perm]``, ``lam ~ U(0, 1)`` per sample;
  text: each token's id and attention bit swapped with the permuted sequence's with probability ``r ~ U(0, 1)`` per
  sequence), then the mean squared error between the student's output tokens and those of the frozen previous-stage
  encoder (``teacher``, not an EMA), both with the same masking noise (the same MAE shuffle for images, the same
  masked ids for text).

``loss = reconstruction + distill_weight * mean(distillation over the rehearsal sub-batches)``. The decoder, the mask
token and the MLM head belong to the stage and are rebuilt by the next one; only ``encoder`` (the ViT and its
tokenizers) carries over. Tokenizers of kinds the stage never sees are frozen, so every trainable parameter gets a
gradient at every step (DistributedDataParallel without ``find_unused_parameters``) — apart from rehearsal kinds on a
step without their sub-batch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from medssl.losses.mae import mlm_loss, mlm_mask, normalized_pixel_loss, patchify
from medssl.methods.base import SSLMethod
from medssl.networks.medcoss_heads import MAEDecoder, MLMHead
from medssl.networks.multimodal_vit import KINDS, MultiModalViT

__all__ = ["MedCoSS", "intra_modal_mixup", "reconstruction_loss", "masked_text"]


def intra_modal_mixup(
    batch: Mapping[str, torch.Tensor], kind: str, generator: torch.Generator | None = None, image_key: str = "image",
    ids_key: str = "input_ids", attention_key: str = "attention_mask",
) -> dict[str, torch.Tensor]:
    """MedCoSS's rehearsal mixup within one single-modality sub-batch (see the module docstring); returns a new dict."""
    out = dict(batch)
    if kind == "text":
        ids = batch[ids_key]
        b = ids.shape[0]
        perm = torch.randperm(b, generator=generator, device=ids.device)
        rate = torch.rand(b, 1, generator=generator, device=ids.device)
        swap = torch.rand(ids.shape, generator=generator, device=ids.device) < rate
        out[ids_key] = torch.where(swap, ids[perm], ids)
        if attention_key in batch and batch[attention_key] is not None:
            attn = batch[attention_key]
            out[attention_key] = torch.where(swap, attn[perm], attn)
        return out
    x = batch[image_key]
    b = x.shape[0]
    perm = torch.randperm(b, generator=generator, device=x.device)
    lam = torch.rand(b, generator=generator, device=x.device).to(x.dtype).view(b, *([1] * (x.dim() - 1)))
    out[image_key] = lam * x + (1.0 - lam) * x[perm]
    return out


def masked_text(
    sub: Mapping[str, Any], ids_key: str, attention_key: str, mlm_prob: float, generator: torch.Generator | None,
    vocab_size: int, mask_token_id: int, special_ids: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(masked input ids, attention mask, labels)`` of a text sub-batch (:func:`medssl.losses.mlm_mask`)."""
    ids, attn = sub[ids_key], sub.get(attention_key)
    inputs, labels = mlm_mask(ids, attn, vocab_size, mask_token_id, mlm_prob, generator, special_ids)
    return inputs, attn, labels


def reconstruction_loss(
    encoder: MultiModalViT,
    kind: str,
    sub: Mapping[str, Any],
    decoder: nn.Module | None = None,
    mlm_head: nn.Module | None = None,
    mask_ratio: float = 0.75,
    mlm_prob: float = 0.15,
    generator: torch.Generator | None = None,
    image_key: str = "image",
    ids_key: str = "input_ids",
    attention_key: str = "attention_mask",
    vocab_size: int | None = None,
    mask_token_id: int = 4,
    special_ids: Sequence[int] = (0, 2, 3),
) -> torch.Tensor:
    """MLM (text, with ``mlm_head``) or MAE normalised-pixel loss (images, with ``decoder``) of ``encoder`` on one
    sub-batch; ``generator`` fixes the masks (the stage table scores every modality with the same masks)."""
    if kind == "text":
        inputs, attn, labels = masked_text(
            sub, ids_key, attention_key, mlm_prob, generator, vocab_size or encoder.vocab_size, mask_token_id,
            special_ids,
        )
        tokens = encoder.forward_encoder(inputs, "text", attention_mask=attn)[0]
        return mlm_loss(mlm_head(tokens), labels)
    x = sub[image_key]
    tokens, mask, ids_restore = encoder.forward_encoder(x, kind, mask_ratio, generator)
    pred = decoder(tokens, ids_restore)
    return normalized_pixel_loss(pred.float(), patchify(x, encoder.patch_geometry(kind)[0]).float(), mask)


class MedCoSS(SSLMethod):
    """One MedCoSS stage (see the module docstring).

    Args:
        encoder: the shared :class:`medssl.networks.MultiModalViT` (the previous stage's, loaded by the bundle).
        kind: the stage's modality kind: ``"text"``, ``"2d"`` or ``"3d"``.
        teacher: the frozen previous-stage encoder for the rehearsal distillation; ``None`` (the first stage) or
            ``"copy"``: a frozen copy of ``encoder`` as given (its weights are then those the stage starts from).
        rehearsal_kinds: the kinds of the earlier stages' buffers (their tokenizers stay trainable).
        mask_ratio: MAE mask ratio (0.75).
        mlm_prob: masked-language-modelling rate (0.15).
        mask_token_id, special_ids: the tokenizer's [MASK] id and the ids never masked ([CLS], [SEP], [PAD]).
        decoder_dim, decoder_depth, decoder_heads: the MAE decoder (512, 8, 16).
        distill_weight: weight of the rehearsal distillation.
        image_key, ids_key, attention_key, buffer_key: batch keys.
    """

    def __init__(
        self,
        encoder: MultiModalViT,
        kind: str,
        teacher: MultiModalViT | str | None = None,
        rehearsal_kinds: Sequence[str] = (),
        mask_ratio: float = 0.75,
        mlm_prob: float = 0.15,
        mask_token_id: int = 4,
        special_ids: Sequence[int] = (0, 2, 3),
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        distill_weight: float = 1.0,
        image_key: str = "image",
        ids_key: str = "input_ids",
        attention_key: str = "attention_mask",
        buffer_key: str = "buffer",
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"MedCoSS: kind must be one of {KINDS}, got {kind!r}")
        bad = [k for k in rehearsal_kinds if k not in KINDS]
        if bad:
            raise ValueError(f"MedCoSS: rehearsal_kinds {bad} are not among {KINDS}")
        if not 0.0 < float(mask_ratio) < 1.0:
            raise ValueError(f"MedCoSS: mask_ratio must be in (0, 1), got {mask_ratio!r}")
        self.encoder, self.kind = encoder, kind
        self.rehearsal_kinds = tuple(dict.fromkeys(rehearsal_kinds))
        self.mask_ratio, self.mlm_prob = float(mask_ratio), float(mlm_prob)
        self.mask_token_id, self.special_ids = int(mask_token_id), tuple(int(i) for i in special_ids)
        self.distill_weight = float(distill_weight)
        self.image_key, self.ids_key, self.attention_key, self.buffer_key = image_key, ids_key, attention_key, buffer_key
        if kind == "text":
            self.mlm_head: nn.Module | None = MLMHead(encoder.dim, encoder.vocab_size)
            self.decoder: nn.Module | None = None
        else:
            _, n_patches, patch_dim = encoder.patch_geometry(kind)
            self.decoder = MAEDecoder(encoder.dim, decoder_dim, decoder_depth, decoder_heads, patch_dim, n_patches)
            self.mlm_head = None
        if isinstance(teacher, str):
            if teacher != "copy":
                raise ValueError(f"MedCoSS: teacher must be a MultiModalViT, 'copy' or None, got {teacher!r}")
            teacher = copy.deepcopy(encoder)
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        elif self.rehearsal_kinds:
            raise ValueError("MedCoSS: rehearsal batches need the previous stage's encoder as `teacher`")
        self.teacher = teacher
        used = {kind, *self.rehearsal_kinds}
        for name, tokenizer in encoder.tokenizers.items():
            tokenizer.requires_grad_(name in used)
        encoder.cls_token.requires_grad_(bool(used - {"text"}))  # images only: frozen in a text-only stage

    def train(self, mode: bool = True) -> MedCoSS:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: no DropPath, the previous stage's features
        return self

    # ------------------------------------------------------------------ objectives
    def _text_inputs(self, sub: Mapping[str, Any], generator: torch.Generator | None):
        return masked_text(sub, self.ids_key, self.attention_key, self.mlm_prob, generator, **self.mlm_kwargs)

    @property
    def mlm_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": self.encoder.vocab_size, "mask_token_id": self.mask_token_id,
                "special_ids": self.special_ids}

    def reconstruction_loss(self, sub: Mapping[str, Any], kind: str | None = None) -> torch.Tensor:
        """The stage's pretext loss on one current-modality sub-batch: MLM for text, MAE for images."""
        return reconstruction_loss(
            self.encoder, kind or self.kind, sub, decoder=self.decoder, mlm_head=self.mlm_head,
            mask_ratio=self.mask_ratio, mlm_prob=self.mlm_prob, image_key=self.image_key, ids_key=self.ids_key,
            attention_key=self.attention_key, **self.mlm_kwargs,
        )

    def distillation_loss(self, sub: Mapping[str, Any], kind: str) -> torch.Tensor:
        """Mixup, then the MSE between the student's and the frozen teacher's output tokens (same masking noise)."""
        sub = intra_modal_mixup(sub, kind, None, self.image_key, self.ids_key, self.attention_key)
        if kind == "text":
            inputs, attn, _ = self._text_inputs(sub, None)
            student = self.encoder.forward_encoder(inputs, "text", attention_mask=attn)[0]
            with torch.no_grad():
                target = self.teacher.forward_encoder(inputs, "text", attention_mask=attn)[0]
        else:
            x = sub[self.image_key]
            seed = int(torch.randint(2**62, (1,)).item())  # one draw, the same shuffle for student and teacher
            gen = torch.Generator(device=x.device)
            student = self.encoder.forward_encoder(x, kind, self.mask_ratio, gen.manual_seed(seed))[0]
            with torch.no_grad():
                target = self.teacher.forward_encoder(x, kind, self.mask_ratio, gen.manual_seed(seed))[0]
        return F.mse_loss(student.float(), target.float())

    # ------------------------------------------------------------------ step
    def training_step(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        loss_rec = self.reconstruction_loss(batch)
        subs = batch.get(self.buffer_key) or []
        logs: dict[str, Any] = {}
        if subs:
            losses = []
            for sub in subs:
                kind = sub.get("kind")
                kind = kind[0] if isinstance(kind, (list, tuple)) else kind
                if kind not in self.rehearsal_kinds:
                    raise ValueError(
                        f"MedCoSS: a rehearsal sub-batch of kind {kind!r}; this stage rehearses {self.rehearsal_kinds}"
                    )
                value = self.distillation_loss(sub, kind)
                name = sub.get("name", kind)
                logs[f"loss_distill_{name[0] if isinstance(name, (list, tuple)) else name}"] = value.detach()
                losses.append(value)
            loss_distill = torch.stack(losses).mean()
            loss = loss_rec + self.distill_weight * loss_distill
            return {"loss": loss, "loss_rec": loss_rec.detach(), "loss_distill": loss_distill.detach(), **logs}
        return {"loss": loss_rec, "loss_rec": loss_rec.detach()}
