"""Dynamic Visual Meta-Embedding (DVME: Truong et al., "How transferable are self-supervised features in
medical image classification tasks?", ML4H 2021, Appendix E listing), generalised to any set of encoders.

DVME fuses the embeddings of several frozen pretrained encoders (the paper: SimCLR ResNet-50 2048-d, SwAV ResNet-50
2048-d, DINO ViT-S/8 1536-d = CLS tokens of the last four blocks) into one classifier:

    z_e = W_e · h_e + b_e                          one Linear(dim_e → proj_dim) per encoder e
    m   = [z_1, …, z_E]                            meta-embedding, E · proj_dim values
    m   = Attention(m.reshape(B, E·proj_dim, 1))   ViT self-attention, each scalar of m a token
    y   = W_c · Dropout(ReLU(W_p · LayerNorm(m) + b_p)) + b_c

:class:`MetaEmbeddingAttention` is the ViT (DINO / timm) attention block the listing uses, without residual
connection, norm or MLP: qkv = Linear(d, 3d, bias=False); per head softmax(q kᵀ · head_dim^-1/2) v; output
Linear(d, d).
In the paper's layout (``attention="scalar"``) the token size d is 1 and there is one head, so the scale is 1 and the
module holds 5 parameters; it learns which components of the meta-embedding attend to which. (The listing's text is
not in this repository: the spec fixes the shapes; the attention internals follow the DINO / timm ViT ``Attention``
class with its defaults, which the listing reuses.)

Variants (``attention=``):
- ``"scalar"``: the paper's listing, (B, E·proj_dim, 1) tokens.
- ``"none"``: the paper's ablation "DVME without self-attention": the same network with the attention module left out
  (projections → concatenation → LayerNorm → Linear → ReLU → Dropout → classifier).
- ``"per_encoder"``: one token per encoder, (B, E, proj_dim), multi-head attention of width proj_dim.

Parameters with three encoders {2048, 2048, 1536}, proj_dim 512, 2 classes, ``attention="scalar"``: 3,676,167
(projections 2,885,120 + attention 5 + LayerNorm 3,072 + Linear 1536→512 786,944 + classifier 1,026); the paper's
Table G1 reports 3.6 M trainable parameters for DVME in linear evaluation (the encoders are frozen and not part of this
module). :meth:`DVME.parameter_breakdown` lists the counts by part.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

__all__ = ["DVME", "MetaEmbeddingAttention", "ATTENTION_MODES"]

ATTENTION_MODES = ("scalar", "none", "per_encoder")


class MetaEmbeddingAttention(nn.Module):
    """ViT multi-head self-attention (no residual, no norm): the module of the DVME listing.

    Args:
        dim: token size d (1 for scalar tokens).
        num_heads: number of heads h; ``dim`` must be divisible by it.
        qkv_bias: bias of the qkv projection (False, the ViT default the listing keeps).
        attn_drop: dropout on the attention weights (0).
        proj_drop: dropout after the output projection (0).

    ``forward(tokens (B, N, d)) -> (out (B, N, d), weights (B, h, N, N))``; each row of ``weights`` sums to 1.
    """

    def __init__(
        self, dim: int, num_heads: int = 1, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0
    ):
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"MetaEmbeddingAttention: dim {dim} must be a positive multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n_tokens, dim = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, n_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        queries, keys, values = qkv[0], qkv[1], qkv[2]  # (B, h, N, head_dim) each
        weights = ((queries * self.scale) @ keys.transpose(-2, -1)).softmax(dim=-1)  # (B, h, N, N)
        mixed = (self.attn_drop(weights) @ values).transpose(1, 2).reshape(batch, n_tokens, dim)
        return self.proj_drop(self.proj(mixed)), weights


class DVME(nn.Module):
    """Dynamic Visual Meta-Embedding classifier over the embeddings of several (frozen) encoders.

    Args:
        embed_dims: encoder name → embedding size, e.g. ``{"simclr": 2048, "swav": 2048, "dino": 1536}``. The order
            of this mapping is the canonical encoder order: it fixes the layout of the meta-embedding, the split of a
            concatenated input and the rows / columns of the attention map. Names must be non-empty and contain no
            ``"."`` (they name sub-modules: ``projections.<name>``).
        proj_dim: size each embedding is projected to (512), and width of the hidden layer.
        num_classes: outputs of the classifier (2). Logits, no activation.
        attention: ``"scalar"`` (the listing: every scalar of the meta-embedding a token), ``"none"`` (the ablation)
            or ``"per_encoder"`` (one proj_dim-wide token per encoder).
        num_heads: attention heads; ``None`` = 1 for ``"scalar"`` (the only choice with 1-wide tokens) and 8 for
            ``"per_encoder"`` (proj_dim must be divisible by it).
        dropout: dropout before the classifier (0.2).
        qkv_bias, attn_drop, proj_drop: options of :class:`MetaEmbeddingAttention` (False, 0, 0 as in ViT).

    Input of :meth:`forward`: either a mapping encoder name → (B, dim_e) tensor with exactly the names of
    ``embed_dims`` (any key order; the canonical order is applied), or one (B, sum(dim_e)) tensor, the embeddings
    concatenated along dim 1 in the canonical order (``split_sizes`` gives the split). Output: logits (B, num_classes).

    After every forward with attention, ``last_attention_map`` is the (E, E) encoder-to-encoder attention map averaged
    over the batch and heads (detached), and ``last_sample_attention_maps`` the per-sample maps (B, E, E), so that a
    caller can average over a whole dataset. Entry [i, j] is the share of attention that the tokens of encoder i put on
    the tokens of encoder j (summed over the keys of j, averaged over the queries of i): every row sums to 1. Both are
    ``None`` with ``attention="none"``.
    """

    def __init__(
        self,
        embed_dims: Mapping[str, int],
        proj_dim: int = 512,
        num_classes: int = 2,
        attention: str = "scalar",
        num_heads: int | None = None,
        dropout: float = 0.2,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if not isinstance(embed_dims, Mapping) or not embed_dims:
            raise ValueError(f"DVME: embed_dims must be a non-empty mapping encoder name → dim, got {embed_dims!r}")
        for name, dim in embed_dims.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"DVME: embed_dims: encoder name {name!r} must be a non-empty string without '.'")
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ValueError(f"DVME: embed_dims[{name!r}] = {dim!r}: the embedding size must be a positive int")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"DVME: attention={attention!r} is not one of {ATTENTION_MODES}")
        if proj_dim < 1 or num_classes < 1:
            raise ValueError(f"DVME: proj_dim ({proj_dim}) and num_classes ({num_classes}) must be positive")
        self.encoder_names: tuple[str, ...] = tuple(embed_dims)
        self.embed_dims: dict[str, int] = {name: int(embed_dims[name]) for name in self.encoder_names}
        self.proj_dim = proj_dim
        self.num_classes = num_classes
        self.attention_mode = attention
        meta_dim = proj_dim * len(self.encoder_names)

        self.projections = nn.ModuleDict({name: nn.Linear(dim, proj_dim) for name, dim in self.embed_dims.items()})
        if attention == "scalar":
            if num_heads not in (None, 1):
                raise ValueError(f"DVME: attention='scalar' has 1-wide tokens, so num_heads must be 1, got {num_heads}")
            self.attention = MetaEmbeddingAttention(1, 1, qkv_bias, attn_drop, proj_drop)
        elif attention == "per_encoder":
            heads = 8 if num_heads is None else num_heads
            if heads < 1 or proj_dim % heads:
                raise ValueError(f"DVME: attention='per_encoder': proj_dim {proj_dim} not divisible by {heads} heads")
            self.attention = MetaEmbeddingAttention(proj_dim, heads, qkv_bias, attn_drop, proj_drop)
        else:
            self.attention = None
        self.norm = nn.LayerNorm(meta_dim)
        self.hidden = nn.Linear(meta_dim, proj_dim)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(proj_dim, num_classes)

        self.last_attention_map: torch.Tensor | None = None
        self.last_sample_attention_maps: torch.Tensor | None = None

    @property
    def split_sizes(self) -> list[int]:
        """Embedding sizes in the canonical order: the split of a concatenated (B, sum) input."""
        return [self.embed_dims[name] for name in self.encoder_names]

    def _split_inputs(self, embeddings: Mapping[str, torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        if isinstance(embeddings, torch.Tensor):
            total = sum(self.split_sizes)
            if embeddings.dim() != 2 or embeddings.shape[1] != total:
                raise ValueError(
                    f"DVME: a concatenated input must be (B, {total}) = encoders {list(self.encoder_names)} with dims "
                    f"{self.split_sizes} in this order, got shape {tuple(embeddings.shape)}"
                )
            return list(torch.split(embeddings, self.split_sizes, dim=1))
        if not isinstance(embeddings, Mapping):
            raise TypeError(f"DVME: input must be a mapping name → tensor or a tensor, got {type(embeddings)}")
        missing = [name for name in self.encoder_names if name not in embeddings]
        unexpected = [name for name in embeddings if name not in self.embed_dims]
        if missing or unexpected:
            raise KeyError(
                f"DVME: input encoders {list(embeddings)} do not match the model's {list(self.encoder_names)}: "
                f"missing {missing}, unexpected {unexpected}"
            )
        parts = []
        for name in self.encoder_names:
            value = embeddings[name]
            if value.dim() != 2 or value.shape[1] != self.embed_dims[name]:
                raise ValueError(
                    f"DVME: input[{name!r}] must be (B, {self.embed_dims[name]}), got shape {tuple(value.shape)}"
                )
            parts.append(value)
        if len({part.shape[0] for part in parts}) != 1:
            sizes = {name: part.shape[0] for name, part in zip(self.encoder_names, parts)}
            raise ValueError(f"DVME: batch sizes differ between encoders: {sizes}")
        return parts

    def _encoder_attention_maps(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, h, N, N) token attention → (B, E, E): mean over heads, keys summed per encoder, queries averaged."""
        n_enc = len(self.encoder_names)
        per_token = weights.detach().float().mean(dim=1)  # (B, N, N)
        if self.attention_mode == "per_encoder":
            return per_token  # one token per encoder already
        batch = per_token.shape[0]
        blocks = per_token.reshape(batch, n_enc, self.proj_dim, n_enc, self.proj_dim)
        return blocks.sum(dim=4).mean(dim=2)

    def meta_embedding(self, embeddings: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Projected, concatenated and (if enabled) attended meta-embedding, (B, E·proj_dim), before the LayerNorm.

        Updates ``last_attention_map`` / ``last_sample_attention_maps``.
        """
        parts = self._split_inputs(embeddings)
        meta = torch.cat([self.projections[name](part) for name, part in zip(self.encoder_names, parts)], dim=1)
        if self.attention is None:
            self.last_attention_map = self.last_sample_attention_maps = None
            return meta
        batch = meta.shape[0]
        if self.attention_mode == "scalar":
            tokens = meta.reshape(batch, -1, 1)  # (B, E·proj_dim, 1): every scalar a token
        else:
            tokens = meta.reshape(batch, len(self.encoder_names), self.proj_dim)  # (B, E, proj_dim)
        attended, weights = self.attention(tokens)
        sample_maps = self._encoder_attention_maps(weights)
        self.last_sample_attention_maps = sample_maps
        self.last_attention_map = sample_maps.mean(dim=0)
        return attended.reshape(batch, -1)

    def embed(self, embeddings: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The DVME embedding (B, proj_dim): ReLU(W_p · LayerNorm(meta-embedding) + b_p), before dropout (t-SNE)."""
        return self.activation(self.hidden(self.norm(self.meta_embedding(embeddings))))

    def forward(self, embeddings: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) from a mapping name → (B, dim) or a concatenated (B, sum(dims)) tensor."""
        return self.classifier(self.dropout(self.embed(embeddings)))

    def parameter_breakdown(self, trainable_only: bool = True) -> dict[str, int]:
        """Parameter counts by part: ``projections.<name>``, ``attention``, ``norm``, ``hidden``, ``classifier``,
        and ``total``. ``trainable_only`` counts only parameters with ``requires_grad``."""

        def count(module: nn.Module | None) -> int:
            if module is None:
                return 0
            return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

        parts = {f"projections.{name}": count(self.projections[name]) for name in self.encoder_names}
        parts.update(
            attention=count(self.attention),
            norm=count(self.norm),
            hidden=count(self.hidden),
            classifier=count(self.classifier),
        )
        parts["total"] = sum(parts.values())
        return parts
