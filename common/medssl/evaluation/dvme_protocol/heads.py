"""The classifiers of the DVME protocol: the heads trained on the embeddings (DVME, its no-attention ablation,
:class:`SingleEncoderHead` linear probes) and :class:`DVMEImageClassifier`, image in, logits out (inference and
fine-tuning)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medssl.networks import DVME

from .encoders import EncoderSpec, build_encoder, parse_encoder_specs
from .smoke import SMOKE_BACKBONES, SMOKE_EMBED_FNS

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------ models
class SingleEncoderHead(nn.Module):
    """Linear evaluation of one encoder: ``Linear(dim, num_classes)`` on ``embeddings[name]`` (the other encoders'
    embeddings of the input mapping are ignored). The paper's linear probe (10.2 K parameters for ResNet-50 with five
    classes)."""

    def __init__(self, name: str, dim: int, num_classes: int):
        super().__init__()
        self.name = name
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(embeddings[self.name])


def _make_head(model: str, embed_dims: Mapping[str, int], num_classes: int, proj_dim: int, dropout: float,
               seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # seeded init, global RNG untouched
        torch.manual_seed(seed)
        if model == "dvme":
            return DVME(embed_dims, proj_dim=proj_dim, num_classes=num_classes, attention="scalar", dropout=dropout)
        if model == "dvme_no_attention":
            return DVME(embed_dims, proj_dim=proj_dim, num_classes=num_classes, attention="none", dropout=dropout)
        if model.startswith("single:"):
            name = model.split(":", 1)[1]
            return SingleEncoderHead(name, embed_dims[name], num_classes)
    raise ValueError(f"unknown model {model!r}: expected 'dvme', 'dvme_no_attention' or 'single:<encoder>'")


class DVMEImageClassifier(nn.Module):
    """Image in, class logits out: the encoders (frozen unless ``trainable_encoders``) embed the image, a head
    (``dvme`` by default) classifies the embeddings. The network of ``inference.json`` (so MONAI's
    ``verify_net_in_out`` and TorchScript-free inference see one tensor in, one tensor out) and of fine-tuning.

    Args:
        encoders: the encoder list (see :class:`EncoderSpec`).
        num_classes, proj_dim, dropout: of the head.
        attention: ``"scalar"`` (DVME, the paper) or ``"none"`` (the ablation); ``head="single:<name>"`` replaces DVME
            with one encoder's linear probe.
        in_channels, probe_size: shape of the dummy image ``(1, in_channels, probe_size, probe_size)`` run once to
            learn each encoder's embedding size.
        trainable_encoders: fine-tuning; False keeps the encoders frozen and in eval mode.

    ``forward(image (B, C, H, W)) -> logits (B, num_classes)``; :meth:`embeddings` gives the per-encoder embeddings.
    The head is the ``head`` sub-module (its state dict is what :class:`DVMEProtocol` saves).
    """

    def __init__(
        self,
        encoders: Sequence[Mapping[str, Any] | EncoderSpec],
        num_classes: int = 2,
        proj_dim: int = 512,
        attention: str = "scalar",
        dropout: float = 0.2,
        head: str = "dvme",
        in_channels: int = 1,
        probe_size: int = 224,
        trainable_encoders: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.specs = parse_encoder_specs(encoders)
        self.encoders = nn.ModuleDict({s.name: build_encoder(s) for s in self.specs})
        self.trainable_encoders = trainable_encoders
        with torch.no_grad():
            probe = torch.zeros(1, in_channels, probe_size, probe_size)
            self.embed_dims = {name: int(enc(probe).reshape(1, -1).shape[1]) for name, enc in self.encoders.items()}
        if not trainable_encoders:
            self.encoders.requires_grad_(False)
        model = head if head != "dvme" else ("dvme" if attention == "scalar" else "dvme_no_attention")
        if attention not in ("scalar", "none"):
            raise ValueError(f"DVMEImageClassifier: attention must be 'scalar' or 'none', got {attention!r}")
        self.head = _make_head(model, self.embed_dims, num_classes, proj_dim, dropout, seed)
        self.class_names: list[str] | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, in_channels: int = 1, probe_size: int = 224) -> "DVMEImageClassifier":
        """The network of a :class:`DVMEProtocol` checkpoint (``checkpoint_final.pt`` / ``models/model.pt``): its
        encoders (from their files), head sizes and trained head weights."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in ("model", "encoders", "num_classes", "proj_dim", "attention") if k not in ckpt]
        if missing:
            raise KeyError(f"{path}: not a DVME checkpoint (missing {missing})")
        network = cls(ckpt["encoders"], num_classes=ckpt["num_classes"], proj_dim=ckpt["proj_dim"],
                      attention=ckpt["attention"], dropout=ckpt.get("dropout", 0.2), in_channels=in_channels,
                      probe_size=probe_size)
        network.head.load_state_dict(ckpt["model"])
        network.class_names = list(ckpt.get("class_names") or [str(i) for i in range(ckpt["num_classes"])])
        return network.eval()

    def train(self, mode: bool = True) -> "DVMEImageClassifier":
        super().train(mode)
        if not self.trainable_encoders:
            self.encoders.eval()  # frozen encoders keep their batch-norm statistics
        return self

    def embeddings(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(self.trainable_encoders and torch.is_grad_enabled()):
            return {name: enc(image).reshape(image.shape[0], -1) for name, enc in self.encoders.items()}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.embeddings(image))


def encoders_from_checkpoint(path: str | Path, default: Sequence[Mapping[str, Any]] | None = None) -> list[dict]:
    """The ``encoders`` list saved in a :class:`DVMEProtocol` checkpoint (``models/model.pt``), else ``default``
    (with a warning: inference then runs untrained encoders). ``default=None``: the randomly initialised
    :data:`SMOKE_BACKBONES` (so that the inference network can be built and checked before any training)."""
    path = Path(path)
    if default is None:
        default = [{"name": n, "backbone": b, **({"embed_fn": SMOKE_EMBED_FNS[n]} if n in SMOKE_EMBED_FNS else {})}
                   for n, b in SMOKE_BACKBONES.items()]
    if path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(ckpt, Mapping) and isinstance(ckpt.get("encoders"), list):
            return [dict(e) for e in ckpt["encoders"]]
        logger.warning(f"{path}: no 'encoders' list in the checkpoint; using the configured default encoders")
    else:
        logger.warning(f"{path}: not found; the network uses the configured default encoders (untrained head)")
    return [dict(e) for e in default]
