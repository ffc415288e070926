"""MedCoSS's shared encoder (Ye et al. 2024, continual multi-modal SSL): one ViT-B for report text, 2D images and 3D
volumes, each kind with its own tokenizer.

Encoder: 12 pre-norm blocks of :mod:`medssl.networks.vit` (768-d, 12 heads, FFN 3072 GELU), LayerScale 1e-3 on the
attention and the MLP branch, DropPath 0.1 in every block (the authors use the same rate in all 12, not a linear
ramp), LayerNorm eps 1e-5 (their ``nn.TransformerEncoderLayer`` default), and no final LayerNorm: 85,072,896
parameters (12 x 7,087,872 + 18,432 LayerScale), tokenizers, class token and position tables not counted.

Tokenizers (each adds learned positions, then a LayerNorm):

- ``"text"``: ``Embedding(vocab, 768)`` + 512 learned positions; sequences of at most ``text_len`` (112) ids. Padding
  (``attention_mask == 0``) is left out as a key of every attention; the authors' code also applies a causal mask to
  text, which the MedCoSS paper does not describe: we attend both ways, as BERT's masked language modelling does.
- ``"2d"``: ``Conv2d(3, 768, 16, stride 16)``: a 224 x 224 image gives 14 x 14 = 196 tokens.
- ``"3d"``: ``Conv3d(1, 768, 16, stride 16)`` on medssl's (B, C, X, Y, Z) depth-last volumes. The authors crop
  16 x 192 x 192 (D x H x W, depth first); here that crop is (X, Y, Z) = (192, 192, 16): a (12, 12, 1) grid, 144
  tokens. Tokens run row-major over the grid (X slowest), as :func:`medssl.losses.patchify` orders the patches.

Other image / volume sizes (each side a multiple of the patch: a downstream task's 64-slice volumes) resample the
stored position table on the fly (:func:`medssl.networks.mit_blocks.resample_position_embedding`, bicubic 2D /
trilinear 3D), so a stage's encoder loads unchanged. ``kinds`` limits the tokenizers built (a 2D task: ``["2d"]``).

Images are masked MAE-style (:func:`random_masking`: per-sample random shuffle, keep ``int(N * (1 - ratio))``), and
the class token (no position) is prepended after masking: 2D at ratio 0.75 keeps 49 of 196 -> (B, 50, 768), 3D 36 of
144 -> (B, 37, 768). Only ``encoder`` and the tokenizers carry over between MedCoSS stages; the MAE decoder and the
MLM head are the separate modules of :mod:`medssl.networks.medcoss_heads`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from medssl.networks.mit_blocks import resample_position_embedding
from medssl.networks.vit import _Block
from medssl.text import pack_text

__all__ = [
    "MultiModalViT", "MultiModalViTEmbedder", "MultiModalClassifier", "MultiModalEncoder", "random_masking", "KINDS",
    "pack_text",
]

KINDS = ("text", "2d", "3d")


def random_masking(
    tokens: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking of ``tokens`` (B, N, D).

    Returns ``(kept (B, K, D), mask (B, N) float: 1 = masked / 0 = kept, ids_restore (B, N))`` with
    ``K = int(N * (1 - mask_ratio))``; the kept tokens stay in shuffled order, ``ids_restore`` puts a (B, N) sequence
    of [kept, mask tokens] back in grid order (``torch.gather(seq, 1, ids_restore)``)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"random_masking: mask_ratio must be in [0, 1), got {mask_ratio!r}")
    b, n, d = tokens.shape
    keep = int(n * (1.0 - mask_ratio))
    noise = torch.rand(b, n, generator=generator, device=tokens.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=tokens.device, dtype=tokens.dtype)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


class MultiModalEncoder(nn.Module):
    """The shared transformer: ``depth`` blocks, no final norm; ``forward(tokens, attn_mask=None)``."""

    def __init__(
        self, dim: int, depth: int, heads: int, mlp_ratio: float, layer_scale_init: float | None, drop_path_rate: float
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            _Block(dim, heads, mlp_ratio, True, 1e-5, drop_path_rate, layer_scale_init) for _ in range(depth)
        )

    def forward(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens, attn_mask)
        return tokens

    def forward_layers(self, tokens: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """The tokens after each block of ``layers`` (1-based: 12 = the last of ViT-B), in the order given."""
        depth = len(self.blocks)
        if not layers or any(not 1 <= int(i) <= depth for i in layers):
            raise ValueError(f"MultiModalEncoder: layers {list(layers)} must be in 1..{depth}")
        wanted, out = {int(i) for i in layers}, {}
        for i, block in enumerate(self.blocks[: max(wanted)], start=1):
            tokens = block(tokens)
            if i in wanted:
                out[i] = tokens
        return [out[int(i)] for i in layers]


class _TextTokenizer(nn.Module):
    def __init__(self, vocab_size: int, dim: int, max_len: int, positions: int) -> None:
        super().__init__()
        if max_len > positions:
            raise ValueError(f"MultiModalViT: text_len {max_len} exceeds the {positions} text positions")
        self.max_len = max_len
        self.token = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, positions, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64) or ids.shape[1] > self.max_len:
            raise ValueError(
                f"MultiModalViT: text must be integer ids (B, L <= {self.max_len}), got {tuple(ids.shape)} {ids.dtype}"
            )
        return self.norm(self.token(ids) + self.pos_embed[:, : ids.shape[1]])


class _PatchTokenizer(nn.Module):
    def __init__(self, spatial_dims: int, in_channels: int, img_size, patch, dim: int) -> None:
        super().__init__()
        self.img_size = _as_size(img_size, spatial_dims, "img_size")
        self.patch = _as_size(patch, spatial_dims, "patch")
        if any(s % p for s, p in zip(self.img_size, self.patch)):
            raise ValueError(f"MultiModalViT: img_size {self.img_size} is not a multiple of patch {self.patch}")
        self.in_channels = in_channels
        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch))
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.proj = conv(in_channels, dim, kernel_size=self.patch, stride=self.patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid), dim))
        self.norm = nn.LayerNorm(dim)

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    @property
    def patch_dim(self) -> int:
        return math.prod(self.patch) * self.in_channels

    def grid_of(self, x: torch.Tensor) -> tuple[int, ...]:
        """The patch grid of input ``x``; its channels and dims checked, each side a multiple of the patch."""
        n = len(self.img_size)
        if x.dim() != n + 2 or x.shape[1] != self.in_channels or any(s % p for s, p in zip(x.shape[2:], self.patch)):
            raise ValueError(
                f"MultiModalViT: expected input (B, {self.in_channels}, {', '.join('XYZ'[:n])}) with every side a "
                f"multiple of the patch {self.patch} (positions stored for {self.img_size}), got {tuple(x.shape)}"
            )
        grid = tuple(s // p for s, p in zip(x.shape[2:], self.patch))
        if grid != self.grid and sorted(grid) == sorted(self.grid):  # resampling would hide an axis-order mistake
            raise ValueError(
                f"MultiModalViT: expected input (B, {self.in_channels}, {', '.join('XYZ'[:n])}) (depth last), got "
                f"{tuple(x.shape)}: its patch grid {grid} is the stored {self.grid} in another axis order"
            )
        return grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid_of(x)
        pos = self.pos_embed
        if grid != self.grid:  # another input size: the stored table resampled, as ViTBackbone / MiT do
            pos = resample_position_embedding(torch.cat((pos[:, :1], pos), dim=1), self.grid, grid)[:, 1:]
        return self.norm(self.proj(x).flatten(2).transpose(1, 2) + pos)


def _as_size(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    size = (int(value),) * spatial_dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(size) != spatial_dims or min(size) < 1:
        raise ValueError(f"MultiModalViT: {name} {value!r} must be one positive int or {spatial_dims} of them")
    return size


class MultiModalViT(nn.Module):
    """MedCoSS's encoder with its three tokenizers (see the module docstring).

    Sub-modules: ``encoder`` (:class:`MultiModalEncoder`, the 85,072,896 parameters of ViT-B), ``tokenizers``
    (``"text"``, ``"2d"``, ``"3d"``) and ``cls_token``; :meth:`encoder_parameters` yields the encoder's parameters.
    """

    def __init__(
        self,
        vocab_size: int = 30522,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4,
        layer_scale_init: float | None = 1e-3,
        drop_path_rate: float = 0.1,
        text_len: int = 112,
        text_positions: int = 512,
        img_size_2d: int | Sequence[int] = 224,
        patch_2d: int | Sequence[int] = 16,
        in_channels_2d: int = 3,
        img_size_3d: int | Sequence[int] = (192, 192, 16),
        patch_3d: int | Sequence[int] = 16,
        in_channels_3d: int = 1,
        kinds: Sequence[str] = KINDS,
    ) -> None:
        super().__init__()
        kinds = tuple(kinds)
        if not kinds or any(k not in KINDS for k in kinds):
            raise ValueError(f"MultiModalViT: kinds must be some of {KINDS}, got {list(kinds)}")
        self.dim, self.vocab_size, self.text_len = int(dim), int(vocab_size), int(text_len)
        self.encoder = MultiModalEncoder(dim, depth, heads, mlp_ratio, layer_scale_init, drop_path_rate)
        builders = {
            "text": lambda: _TextTokenizer(vocab_size, dim, text_len, text_positions),
            "2d": lambda: _PatchTokenizer(2, in_channels_2d, img_size_2d, patch_2d, dim),
            "3d": lambda: _PatchTokenizer(3, in_channels_3d, img_size_3d, patch_3d, dim),
        }
        # a downstream network builds only its input's tokenizer (kinds=["2d"]): the others' weights are then
        # reported as ignored when a stage's encoder loads, and the text vocabulary size does not matter
        self.tokenizers = nn.ModuleDict({k: builders[k]() for k in KINDS if k in kinds})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self._init_weights()

    def _init_weights(self) -> None:
        # the authors' (MAE's) initialisation: xavier-uniform linears and patch projections, N(0, 0.02) tables
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for table in (self.cls_token, *(t.pos_embed for t in self.tokenizers.values())):
            nn.init.normal_(table, std=0.02)

    def encoder_parameters(self):
        """The shared transformer's parameters (not the tokenizers, class token or position tables)."""
        return self.encoder.parameters()

    def patch_geometry(self, kind: str) -> tuple[tuple[int, ...], int, int]:
        """``(patch size, patches per input, values per patch)`` of ``"2d"`` / ``"3d"``, for the MAE decoder."""
        tok = self._tokenizer(kind)
        if kind == "text":
            raise ValueError("MultiModalViT.patch_geometry: text has no patches")
        return tok.patch, tok.num_patches, tok.patch_dim

    def _tokenizer(self, kind: str) -> nn.Module:
        if kind not in KINDS:
            raise ValueError(f"MultiModalViT: kind must be one of {KINDS}, got {kind!r}")
        if kind not in self.tokenizers:
            raise ValueError(f"MultiModalViT: built for {list(self.tokenizers)} only (kinds), not {kind!r}")
        return self.tokenizers[kind]

    def tokenize(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Tokens (B, N, dim) of text ids (B, L), images (B, C, X, Y) or volumes (B, C, X, Y, Z), positions added."""
        return self._tokenizer(kind)(x)

    def forward_encoder(
        self,
        x: torch.Tensor,
        kind: str,
        mask_ratio: float = 0.0,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Encode one batch of one kind: ``(tokens, mask, ids_restore)``.

        Images: tokens (B, 1 + kept, dim) with the class token first; ``mask`` / ``ids_restore`` as
        :func:`random_masking` (all zeros / identity at ``mask_ratio = 0``). Text: tokens (B, L, dim), ``mask`` and
        ``ids_restore`` None (text is masked on its ids, :func:`medssl.losses.mlm_mask`); ``attention_mask`` (B, L),
        nonzero = real token, keeps padding out of every attention."""
        tokens = self.tokenize(x, kind)
        if kind == "text":
            if mask_ratio:
                raise ValueError("MultiModalViT: text is masked on its ids (medssl.losses.mlm_mask), not mask_ratio")
            attn = None
            if attention_mask is not None:
                if tuple(attention_mask.shape) != tuple(x.shape):
                    raise ValueError(
                        f"MultiModalViT: attention_mask {tuple(attention_mask.shape)} != ids {tuple(x.shape)}"
                    )
                attn = attention_mask.bool()[:, None, None, :]
            return self.encoder(tokens, attn), None, None
        if attention_mask is not None:
            raise ValueError("MultiModalViT: attention_mask is for text only")
        b, n, _ = tokens.shape
        if mask_ratio:
            tokens, mask, ids_restore = random_masking(tokens, mask_ratio, generator)
        else:
            mask = tokens.new_zeros(b, n)
            ids_restore = torch.arange(n, device=tokens.device).expand(b, n)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        return self.encoder(tokens), mask, ids_restore

    def forward(self, x: torch.Tensor, kind: str, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Features of the whole input (no masking), as :meth:`forward_encoder`'s tokens."""
        return self.forward_encoder(x, kind, attention_mask=attention_mask)[0]

    def forward_layers(self, x: torch.Tensor, kind: str, layers: Sequence[int]) -> tuple[list[torch.Tensor], tuple]:
        """Image / volume features after the blocks ``layers`` (1-based; UNETR's 4, 7, 10, 12 of ViT-B), unmasked:
        ``([tokens (B, 1 + N, dim) per layer, class token first], patch grid)``."""
        if kind == "text":
            raise ValueError("MultiModalViT.forward_layers: for images and volumes ('2d' / '3d'), not text")
        tokenizer = self._tokenizer(kind)
        grid = tokenizer.grid_of(x)
        tokens = tokenizer(x)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        return self.encoder.forward_layers(tokens, layers), grid


class MultiModalViTEmbedder(MultiModalViT):
    """:class:`MultiModalViT` whose ``forward(x)`` is one input kind's embedding: the mean of all output tokens
    (B, dim), as MedCoSS's rehearsal buffer pools them (text: over the real tokens, ``attention_mask`` given). Same
    state dict as :class:`MultiModalViT`, so a stage's ``encoder.pt`` loads as it is (inference, MONAI Label)."""

    def __init__(self, kind: str = "2d", **kwargs) -> None:
        super().__init__(**kwargs)
        self._tokenizer(kind)  # validates the kind
        self.kind = kind

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        tokens = self.forward_encoder(x, self.kind, attention_mask=attention_mask)[0]
        if self.kind == "text" and attention_mask is not None:
            weights = attention_mask[..., None].to(tokens.dtype)
            return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return tokens.mean(dim=1)


class MultiModalClassifier(nn.Module):
    """MedCoSS's classification network: ``encoder`` (a :class:`MultiModalViTEmbedder`: the mean of its output tokens,
    over the real tokens for text) and a head, as the MedCoSS appendix's Table 1: ``"mlp"`` = Linear(dim, dim) -
    LayerNorm - GELU - Linear(dim, classes) (reports, 3D CT), ``"linear"`` = one Linear (X-ray, pathology).

    Input: images (B, C, X, Y) / volumes (B, C, X, Y, Z) for the 2D / 3D kinds; for text the packed ids and attention
    mask (B, 2, L) of :func:`pack_text`. Output: logits (B, num_classes)."""

    def __init__(self, encoder: MultiModalViTEmbedder, num_classes: int, head: str = "mlp") -> None:
        super().__init__()
        if not isinstance(encoder, MultiModalViTEmbedder):
            raise TypeError(f"MultiModalClassifier: encoder must be a MultiModalViTEmbedder, got {type(encoder).__name__}")
        if head not in ("mlp", "linear"):
            raise ValueError(f"MultiModalClassifier: head must be 'mlp' or 'linear', got {head!r}")
        self.encoder, self.kind = encoder, encoder.kind
        # the other kinds' tokenizers (and the class token, for text) take no part: frozen, so DistributedDataParallel
        # sees no unused parameter
        for name, tokenizer in encoder.tokenizers.items():
            tokenizer.requires_grad_(name == self.kind)
        encoder.cls_token.requires_grad_(self.kind != "text")
        dim = encoder.dim
        if head == "mlp":
            self.head = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU(), nn.Linear(dim, int(num_classes)))
        else:
            self.head = nn.Linear(dim, int(num_classes))
        self.feature_dim = dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "text":
            if x.dim() != 3 or x.shape[1] != 2:
                raise ValueError(f"MultiModalClassifier: text input is packed ids + mask (B, 2, L), got {tuple(x.shape)}")
            return self.encoder(x[:, 0].long(), attention_mask=x[:, 1].long())
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
