"""MedCoSS's continual chain around :class:`medssl.methods.MedCoSS` (bundle ``ssl_medcoss_continual_pretrain``).

A chain runs its stages in order (reports -> X-ray -> CT -> MRI -> pathology by default), each a full bundle run of
the same merged config with ``stage`` set, in ``<output_dir>/<stage>`` with checkpoints in ``<ckpt_dir>/<stage>``
(:func:`medssl.engines.chain.run_stages`). A stage:

1. starts from the previous stage's exported encoder (:func:`start_encoder`) and tokenizer (:func:`stage_tokenizer`;
   the text stage trains a WordPiece vocabulary on its reports when no tokenizer folder is given);
2. trains (the bundle's ``SSLTrainer``), rehearsing the earlier stages' buffers;
3. finishes (:func:`finish_stage`, rank 0 writes, every rank waits): ``encoder.pt`` (the MultiModalViT with its
   tokenizers) and its manifest ``encoder.json`` (a downstream bundle's ``--pretrained_path``), ``heads.pt`` (the
   stage's MAE decoder or MLM head, for the stage table), its rehearsal buffer
   (:mod:`medssl.data.rehearsal`) as ``buffer.json`` plus ``buffers.json`` (every buffer so far), the stage table
   (``stage_table.json`` / ``stage_table.md``: the reconstruction loss of every modality seen so far, with the
   current encoder and each modality's own stage heads, on its validation items under fixed masks, so forgetting
   shows as a rising row), and ``stage_done.json``.

A chain resumed with ``resume=True`` skips the stages that have ``stage_done.json`` and resumes the interrupted one
from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from medssl.utils.dist import barrier, is_main_process
from medssl.data.rehearsal import select_rehearsal_items, write_rehearsal_datalist
from medssl.networks.medcoss_heads import MAEDecoder, MLMHead
from medssl.networks.multimodal_vit import MultiModalViT
from medssl.text import load_tokenizer, train_wordpiece
from medssl.utils.io import ENCODER_MANIFEST_FORMAT, atomic_torch_save, atomic_write_text, file_sha256, json_safe

from medssl.methods.medcoss import MedCoSS, reconstruction_loss

__all__ = [
    "STAGE_DONE", "print_stage_table", "stage_tokenizer", "start_encoder", "finish_stage", "previous_stage",
    "stage_kinds", "write_stage_encoder",
]

logger = logging.getLogger(__name__)
STAGE_DONE = "stage_done.json"
ENCODER_FILE, ENCODER_MANIFEST, HEADS_FILE, BUFFER_FILE, BUFFERS_FILE, TABLE_FILE = (
    "encoder.pt", "encoder.json", "heads.pt", "buffer.json", "buffers.json", "stage_table.json"
)


def previous_stage(order: Sequence[str], stage: str) -> str | None:
    """The stage before ``stage`` in ``order`` (None for the first)."""
    order = list(order)
    if stage not in order:
        raise ValueError(f"MedCoSS: stage {stage!r} is not among the stages {order}")
    i = order.index(stage)
    return order[i - 1] if i else None


def stage_kinds(stages: Mapping[str, Mapping[str, Any]], order: Sequence[str], stage: str) -> list[tuple[str, str]]:
    """``[(name, kind), ...]`` of the stages before ``stage`` (the ones it rehearses)."""
    order = list(order)
    return [(name, stages[name]["kind"]) for name in order[: order.index(stage)]]


# --------------------------------------------------------------------------------------------- start of a stage
def stage_tokenizer(
    kind: str,
    output_dir: str,
    previous_stage_dir: str | None = None,
    tokenizer_dir: str | None = None,
    texts: Sequence[str] | None = None,
    vocab_size: int = 30522,
    min_frequency: int = 2,
    max_length: int = 112,
) -> Any:
    """The stage's :class:`medssl.text.TextTokenizer`: ``tokenizer_dir`` if given, else the previous stage's, else
    (text stage) a WordPiece vocabulary trained on ``texts``; ``None`` for an image stage with no text before it.
    Saved to ``<output_dir>/tokenizer`` (rank 0) for the next stage and for downstream use."""
    tokenizer = None
    if tokenizer_dir:
        tokenizer = load_tokenizer(tokenizer_dir, max_length)
    elif previous_stage_dir and (Path(previous_stage_dir) / "tokenizer").is_dir():
        tokenizer = load_tokenizer(Path(previous_stage_dir) / "tokenizer", max_length)
    elif kind == "text":
        if not texts:
            raise ValueError("MedCoSS text stage: no reports to train a vocabulary on (and no tokenizer_dir given)")
        tokenizer = train_wordpiece(texts, vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                    max_length=int(max_length))
        logger.info("trained a WordPiece vocabulary of %d entries on %d reports", tokenizer.vocab_size, len(texts))
    if tokenizer is not None and is_main_process():
        tokenizer.save(Path(output_dir) / "tokenizer")
    return tokenizer


def start_encoder(encoder: MultiModalViT, previous_stage_dir: str | None = None) -> MultiModalViT:
    """``encoder`` with the previous stage's weights (``<previous_stage_dir>/encoder.pt``, every tensor); as built
    for the first stage."""
    if not previous_stage_dir:
        return encoder
    path = Path(previous_stage_dir) / ENCODER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the previous stage's encoder is missing (did that stage finish?)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = saved["state_dict"]
    mine = encoder.state_dict()
    wrong = [k for k in state if k in mine and tuple(state[k].shape) != tuple(mine[k].shape)]
    if wrong:
        raise ValueError(
            f"{path}: {len(wrong)} tensors do not fit this stage's MultiModalViT, e.g. {wrong[0]} "
            f"{tuple(state[wrong[0]].shape)} vs {tuple(mine[wrong[0]].shape)} (same model settings in every stage)"
        )
    encoder.load_state_dict(state, strict=True)
    logger.info("stage starts from %s (%d tensors)", path, len(state))
    return encoder


# --------------------------------------------------------------------------------------------- end of a stage
def write_stage_encoder(
    encoder: MultiModalViT, out: str | Path, stage: str, kind: str | None, model_config: Mapping[str, Any] | None,
    order: Sequence[str] = (),
) -> Path:
    """``<out>/encoder.pt`` (the next stage's start: state dict, stage, kind, model config) and its manifest
    ``encoder.json``, with which a downstream bundle's ``--pretrained_path`` loads it (adapter ``multimodal_vit``) and
    builds the encoder as the chain did (:func:`medssl.downstream.multimodal_vit_encoder`)."""
    out = Path(out)
    config = dict(model_config or {})
    atomic_torch_save({"state_dict": encoder.state_dict(), "stage": stage, "kind": kind, "config": config},
                      out / ENCODER_FILE)
    # the backbone is the stage kind's embedder (mean of the output tokens: what tools/probe.py and inference embed);
    # its state dict is the whole MultiModalViT's
    manifest = {
        "format": ENCODER_MANIFEST_FORMAT, "weights": ENCODER_FILE,
        "method": f"MedCoSS continual pretraining, stage {stage} ({kind})",
        "backbone": {
            "_target_": "medssl.networks.MultiModalViTEmbedder", "kwargs": json_safe({"kind": kind, **config}),
        },
        "feature_dim": encoder.dim, "stage": stage, "stage_order": list(order),
        "num_tensors": len(encoder.state_dict()), "encoder_sha256": file_sha256(out / ENCODER_FILE),
    }
    if kind in ("2d", "3d"):
        tokenizer = encoder.tokenizers[kind]
        manifest["in_channels"] = tokenizer.in_channels
        manifest["preprocessing"] = {f"input_size_{kind}": list(tokenizer.img_size)}
    atomic_write_text(out / ENCODER_MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return out / ENCODER_FILE


@torch.no_grad()
def _mean_token_features(encoder: MultiModalViT, kind: str, loader: Any, device: torch.device) -> torch.Tensor:
    feats = []
    for batch in loader:
        if kind == "text":
            ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            tokens = encoder(ids, "text", attention_mask=attn)
            weights = attn[..., None].to(tokens.dtype)
            feats.append(((tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)).float().cpu())
        else:
            feats.append(encoder(batch["image"].to(device), kind).mean(dim=1).float().cpu())
    return torch.cat(feats)


@torch.no_grad()
def _stage_losses(
    encoder: MultiModalViT, seen: Sequence[Mapping[str, Any]], loaders: Mapping[str, Any], device: torch.device,
    mask_ratio: float, mlm_kwargs: Mapping[str, Any], seed: int,
) -> dict[str, float]:
    losses = {}
    for entry in seen:
        name, kind = entry["stage"], entry["kind"]
        loader = loaders.get(name)
        heads_path = Path(entry["dir"]) / HEADS_FILE
        if loader is None or not heads_path.is_file():
            continue
        heads = torch.load(heads_path, map_location="cpu", weights_only=True)
        if kind == "text":
            head, decoder = MLMHead(encoder.dim, encoder.vocab_size), None
            head.load_state_dict(heads["state_dict"])
            head = head.to(device).eval()
        else:
            _, n_patches, patch_dim = encoder.patch_geometry(kind)
            decoder, head = MAEDecoder(encoder.dim, patch_dim=patch_dim, num_patches=n_patches, **heads["config"]), None
            decoder.load_state_dict(heads["state_dict"])
            decoder = decoder.to(device).eval()
        gen = torch.Generator(device=device).manual_seed(int(seed))
        total, count = 0.0, 0
        for batch in loader:
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            loss = reconstruction_loss(encoder, kind, batch, decoder=decoder, mlm_head=head, mask_ratio=mask_ratio,
                                       generator=gen, **mlm_kwargs)
            n = len(next(v for v in batch.values() if torch.is_tensor(v)))
            total, count = total + float(loss) * n, count + n
        losses[name] = round(total / max(count, 1), 6)
    return losses


def _table_markdown(rows: Sequence[Mapping[str, Any]], order: Sequence[str]) -> str:
    names = [n for n in order if any(n in r["losses"] for r in rows)]
    lines = [
        "# MedCoSS stage table: reconstruction loss of each modality (columns) after each stage (rows)",
        "",
        "Validation items, fixed masks, each modality scored with its own stage's decoder / MLM head and the encoder",
        "after the row's stage; a value rising down a column is forgetting. Text: MLM cross-entropy; images: MAE",
        "normalised-pixel loss.",
        "",
        "| after stage | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for r in rows:
        cells = [f"{r['losses'][n]:.4f}" if n in r["losses"] else "" for n in names]
        lines.append(f"| {r['stage']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def finish_stage(
    method: MedCoSS,
    stage: str,
    output_dir: str,
    previous_stage_dir: str | None,
    order: Sequence[str],
    buffer_loader: Any,
    buffer_items: Sequence[Mapping[str, Any]],
    table_loaders: Mapping[str, Any],
    device: Any = "cpu",
    seed: int = 0,
    cluster_fraction: float = 0.01,
    keep_fraction: float = 0.05,
    model_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the stage's outputs (see the module docstring); returns the stage table row."""
    out = Path(output_dir)
    device = torch.device(device)
    encoder = method.encoder
    was_training = encoder.training
    encoder.eval()
    kind = method.kind
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_stage_encoder(encoder, out, stage, kind, model_config, order)
        head = method.mlm_head if kind == "text" else method.decoder
        head_config = {} if kind == "text" else {
            "dim": head.embed.out_features, "depth": len(head.blocks), "heads": head.blocks[0].attn.num_heads,
        }
        atomic_torch_save({"state_dict": head.state_dict(), "kind": kind, "config": head_config}, out / HEADS_FILE)
        # rehearsal buffer of this stage's training items
        feats = _mean_token_features(encoder, kind, buffer_loader, device).numpy()
        idx, clusters, dists = select_rehearsal_items(feats, cluster_fraction, keep_fraction, seed)
        write_rehearsal_datalist(out / BUFFER_FILE, list(buffer_items), idx, clusters, dists, stage=stage, kind=kind,
                                 name=f"MedCoSS rehearsal buffer of stage {stage}")
        earlier = json.loads((Path(previous_stage_dir) / BUFFERS_FILE).read_text()) if previous_stage_dir else []
        buffers = [*earlier, {"stage": stage, "kind": kind, "datalist": str(out / BUFFER_FILE), "dir": str(out)}]
        atomic_write_text(out / BUFFERS_FILE, json.dumps(buffers, indent=1) + "\n")
        logger.info("stage %s: rehearsal buffer of %d of %d items -> %s", stage, len(idx), len(feats), out / BUFFER_FILE)
        # stage table
        rows = json.loads((Path(previous_stage_dir) / TABLE_FILE).read_text())["rows"] if previous_stage_dir else []
        mlm = method.mlm_kwargs
        row = {"stage": stage, "losses": _stage_losses(encoder, buffers, table_loaders, device, method.mask_ratio,
                                                       mlm, seed)}
        rows = [*rows, row]
        atomic_write_text(out / TABLE_FILE, json.dumps({"order": list(order), "rows": rows}, indent=1) + "\n")
        atomic_write_text(out / "stage_table.md", _table_markdown(rows, order))
        logger.info("stage table after %s: %s", stage, row["losses"])
        atomic_write_text(out / STAGE_DONE, json.dumps({"stage": stage, "kind": kind}) + "\n")
    else:
        row = {}
    encoder.train(was_training)
    barrier()
    return row


def print_stage_table(output_dir: str, order: Sequence[str]) -> str | None:
    """Print (rank 0) and return the stage table of the last finished stage of the chain in ``output_dir``."""
    for stage in reversed(list(order)):
        path = Path(output_dir) / stage / "stage_table.md"
        if path.is_file():
            text = path.read_text()
            if is_main_process():
                print(text, flush=True)
            return text
    return None
