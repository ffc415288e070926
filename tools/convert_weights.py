"""Convert published pretrained checkpoints into medssl encoder files (state dict + manifest), one subcommand per
source.

Usage:
    python tools/convert_weights.py swav CKPT --out encoder.pt [--transpose_2d True|False] [--trusted]
    python tools/convert_weights.py dino CKPT --out encoder.pt [--entry teacher|student] [--transpose_2d True|False]
        [--trusted]
    python tools/convert_weights.py unimiss CKPT --out encoder.pt [--entry teacher|student] [--variant tiny|small]
        [--decoder True|False] [--spatial_dims 2|3|[2,3]] [--transpose_2d True|False]
        [--img_size_2d 224] [--img_size_3d "[96,96,16]"] [--strict] [--trusted]
    python tools/convert_weights.py medcoss CKPT --out encoder.pt [--transpose_2d True|False] [--heads 12]
        [--img_size_2d 224] [--img_size_3d "[192,192,16]"] [--trusted]

Subcommands:
    swav      SwAV / DeepCluster-v2 ResNet-50 (w2, w4, w5) checkpoints of facebookresearch/swav ->
              ``medssl.networks.ResNetBackbone`` (``medssl.weights.convert_swav``): ``module.`` removed, 2D kernels
              transposed to medssl's column-first 2D order, projection head + prototypes kept in ``OUT_head.pt``.
    dino      DINO ViT-S/16, ViT-S/8, ViT-B/16, ViT-B/8 checkpoints of facebookresearch/dino ->
              ``medssl.networks.ViTBackbone`` (``medssl.weights.convert_dino``): hub backbone files as they are,
              training checkpoints' teacher (or student) with ``module.`` / ``backbone.`` removed and the head kept in
              ``OUT_head.pt``; patch kernel and position grid transposed to medssl's column-first 2D order.
    unimiss   the UniMiSS checkpoints of YtongXie/UniMiSS-code (``UniMiss_tiny`` / ``UniMiss_small``) ->
              ``medssl.networks.mit.MiT`` (``medssl.weights.convert_unimiss``): the teacher's (or student's) MiT
              weights renamed to MiT's keys, 3D kernels / position grids permuted from the reference's (D, H, W)
              to medssl's (X, Y, Z) depth-last order, 2D ones transposed to medssl's column-first 2D order.
    medcoss   the MedCoSS pretraining checkpoints of yeerwen/MedCoSS (``Unified_Model`` under ``"model"``) ->
              ``medssl.networks.MultiModalViT`` (``medssl.weights.convert_medcoss``), written as a MedCoSS stage's
              ``encoder.pt`` (``{"state_dict", "stage", "kind", "config"}``, not a plain state dict): the shared
              encoder, the text / 2D / 3D tokenizers (token-type and temporal position row 0 folded into the position
              tables), the 3D kernel and grid permuted to (X, Y, Z), 2D ones transposed; decoder / MLM keys listed.

Each subcommand writes OUT (a plain state dict, ``torch.load(weights_only=True)``-able) and OUT's ``.json`` manifest
(format ``medssl-encoder/1``, as ``tools/export_encoder.py``), prints what was mapped and every source key that was
not, and fails with a message naming the key and both shapes when a tensor does not fit. A downstream bundle loads the
result with ``medssl.weights.export.build_encoder_from_manifest("encoder.json")``.

To add a converter: write ``medssl.weights.convert_<source>`` and a function here, and register it in ``CONVERTERS``.
"""

from __future__ import annotations

from collections.abc import Sequence

from medssl.cli import run


def unimiss(
    checkpoint: str,
    out: str,
    entry: str = "teacher",
    variant: str | None = None,
    decoder: bool | None = None,
    spatial_dims: int | Sequence[int] | None = None,
    transpose_2d: bool = True,
    img_size_2d: int | Sequence[int] = 224,
    img_size_3d: Sequence[int] = (96, 96, 16),
    strict: bool = False,
    trusted: bool = False,
    quiet: bool = False,
) -> None:
    """Convert a published UniMiSS checkpoint to a medssl MiT encoder file.

    Args:
        checkpoint: the authors' checkpoint (teacher / student entries), or a plain MiT state dict.
        out: the state dict file to write (e.g. encoder.pt); the manifest goes beside it (encoder.json).
        entry: "teacher" (default, the EMA network) or "student".
        variant: "tiny" or "small" (default: read from the checkpoint's block counts).
        decoder: keep the decoder (default: when the checkpoint has one); False writes the encoder alone.
        spatial_dims: the paths to keep: 2, 3 or [2,3] (default: those in the checkpoint).
        transpose_2d: transpose 2D kernels / position grids to medssl's column-first 2D images (default True).
        img_size_2d: the 2D input size the checkpoint's position embeddings are sized for (224).
        img_size_3d: the 3D input size (X, Y, Z), depth last, of its position embeddings ([96, 96, 16]).
        strict: fail on source keys the mapping does not know (they are always listed).
        trusted: allow full unpickling if the checkpoint cannot be read with weights_only=True.
        quiet: print the first few unused keys of each kind only.
    """
    from medssl.weights.convert_unimiss import convert_unimiss_checkpoint

    if isinstance(img_size_3d, str) or isinstance(img_size_2d, str) or isinstance(spatial_dims, str):
        raise ValueError("--img_size_2d / --img_size_3d / --spatial_dims take numbers or lists such as [96,96,16]")
    weights, manifest, report = convert_unimiss_checkpoint(
        checkpoint,
        out,
        entry=entry,
        variant=variant,
        decoder=decoder,
        spatial_dims=spatial_dims,
        transpose_2d=transpose_2d,
        img_size_2d=img_size_2d,
        img_size_3d=tuple(img_size_3d),
        strict=strict,
        trusted=trusted,
    )
    print(report.summary(full=not quiet))
    print(f"wrote {weights} ({len(report.mapped)} tensors) and {manifest}")


def swav(checkpoint: str, out: str, transpose_2d: bool = True, trusted: bool = False) -> None:
    """Convert a published SwAV or DeepCluster-v2 ResNet-50 / 50w2 / 50w4 / 50w5 checkpoint to a medssl ResNet
    encoder file; the projection head and prototypes go to OUT's ``_head.pt`` beside it.

    Args:
        checkpoint: the checkpoint (``module.`` prefixes and a ``state_dict`` entry are handled).
        out: the state dict file to write (e.g. encoder.pt); the manifest goes beside it (encoder.json).
        transpose_2d: transpose the 2D kernels to medssl's column-first 2D images (default True).
        trusted: allow full unpickling if the checkpoint cannot be read with weights_only=True.
    """
    from medssl.weights.convert_swav import convert_swav_checkpoint

    weights, manifest, report = convert_swav_checkpoint(checkpoint, out, transpose_2d=transpose_2d, trusted=trusted)
    kept = ""
    if report["head_file"]:
        kept = f"; head and prototypes ({len(report['head_keys'])} tensors) in {report['head_file']}"
    print(f"wrote {weights} ({report['mapped']} tensors, ResNet-50 width {report['width']}) and {manifest}{kept}")


def dino(checkpoint: str, out: str, entry: str = "teacher", transpose_2d: bool = True, trusted: bool = False) -> None:
    """Convert a published DINO ViT-S/16, ViT-S/8, ViT-B/16 or ViT-B/8 checkpoint (a hub backbone file, or a training
    checkpoint's teacher / student) to a medssl ViTBackbone encoder file; a training checkpoint's projection head goes
    to OUT's ``_head.pt`` beside it.

    Args:
        checkpoint: the checkpoint (``dino_deitsmall16_pretrain.pth``, ... or ``checkpoint.pth`` of main_dino.py).
        out: the state dict file to write (e.g. encoder.pt); the manifest goes beside it (encoder.json).
        entry: for a training checkpoint, "teacher" (default, the network DINO evaluates) or "student".
        transpose_2d: transpose the patch kernel and position grid to medssl's column-first 2D images (default True).
        trusted: allow full unpickling if the checkpoint cannot be read with weights_only=True.
    """
    from medssl.weights.convert_dino import convert_dino_checkpoint

    weights, manifest, report = convert_dino_checkpoint(
        checkpoint, out, transpose_2d=transpose_2d, trusted=trusted, entry=entry
    )
    kept = ""
    if report["head_file"]:
        kept = f"; projection head ({len(report['head_keys'])} tensors) in {report['head_file']}"
    print(f"wrote {weights} ({report['mapped']} tensors, {report['arch']}) and {manifest}{kept}")


def medcoss(
    checkpoint: str,
    out: str,
    transpose_2d: bool = True,
    heads: int | None = None,
    img_size_2d: int | Sequence[int] = 224,
    img_size_3d: Sequence[int] = (192, 192, 16),
    trusted: bool = False,
) -> None:
    """Convert a published MedCoSS checkpoint to the encoder file of the ssl_medcoss_continual_pretrain bundle (what
    each stage writes as encoder.pt): start a stage from it (its folder as the previous stage) or embed with
    ``MultiModalViTEmbedder(kind, **saved["config"])``. The manifest (OUT's .json) lists the keys not converted.

    Args:
        checkpoint: the authors' checkpoint (weights under "model"), or a plain Unified_Model state dict.
        out: the file to write (e.g. encoder.pt); the manifest goes beside it (encoder.json).
        transpose_2d: transpose the 2D kernel and position grid to medssl's column-first 2D images (default True).
        heads: attention heads (default: width / 64, 12 for ViT-B).
        img_size_2d: the 2D input size of the position table, medssl's (X, Y) order (224).
        img_size_3d: the 3D input size (X, Y, Z), depth last ([192, 192, 16] = the reference's 16 x 192 x 192).
        trusted: allow full unpickling if the checkpoint cannot be read with weights_only=True.
    """
    from medssl.weights.convert_medcoss import convert_medcoss_checkpoint

    if isinstance(img_size_3d, str) or isinstance(img_size_2d, str):
        raise ValueError("--img_size_2d / --img_size_3d take numbers or lists such as [192,192,16]")
    weights, manifest, report = convert_medcoss_checkpoint(
        checkpoint, out, transpose_2d=transpose_2d, trusted=trusted, heads=heads, img_size_2d=img_size_2d,
        img_size_3d=tuple(img_size_3d) if not isinstance(img_size_3d, int) else img_size_3d,
    )
    unused = report["unused_keys"]
    print(f"not converted ({len(unused)}, not encoder): {', '.join(unused[:10])}"
          + (f", ... and {len(unused) - 10} more" if len(unused) > 10 else ""))
    print(f"wrote {weights} ({report['mapped']} source tensors -> {report['num_tensors']}, MultiModalViT width "
          f"{report['config']['dim']}, depth {report['config']['depth']}, vocabulary {report['config']['vocab_size']}) "
          f"and {manifest}")


CONVERTERS = {"unimiss": unimiss, "swav": swav, "dino": dino, "medcoss": medcoss}


def main(argv: list[str] | None = None) -> None:
    run(CONVERTERS, argv, name="convert_weights")


if __name__ == "__main__":
    main()
