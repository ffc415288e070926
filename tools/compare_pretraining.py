"""Compare pretraining methods against random initialisation on the demo data: the seeds' comparison tables in
miniature.

Usage:
    python tools/compare_pretraining.py [--dataset-dir demo_data] [--work-dir runs/compare] \\
        [--methods swav,unimiss,joint] [--finetune-epochs 8] [--seeds 3] [--out-dir runs/compare]

What it does (every step is a ``python -m monai.bundle run`` / tool command, printed before it runs, so any row of
the table can be reproduced by hand; steps whose output already exists are skipped, so an interrupted comparison
resumes):

1. builds the demo dataset in ``--dataset-dir`` when it has no ``datalist.json``;
2. pretrains each method for a short budget with the bundle's ``demo.json`` (the README quick start's budget):
   ``swav`` = ``ssl_swav_multimodal_pretrain`` (small ResNet), ``unimiss`` = ``ssl_unimiss_pretrain`` (narrow
   MiT-tiny), ``joint`` = stage 1 of ``ssl_joint_image_volume_pretrain`` (its 2D slice trunk), and exports each
   encoder with ``tools/export_encoder.py``;
3. for each encoder and for a randomly initialised encoder of the same architecture ("random"):
   * ``xray_classification`` linear probes on frozen features (``tools/probe.py``: kNN and logistic regression,
     mean ± 95 % CI over ``--seeds`` seeds at label fraction 1.0) on the demo's 3-class X-ray items;
   * ``xray_classification`` fine-tuning (``finetune_mode finetune`` from the encoder, ``scratch`` for random) for
     ``--finetune-epochs`` epochs, then ``evaluate.json`` on the test section: macro AUC and accuracy;
   * ``xray_segmentation_2d`` fine-tuning (ResNet encoders: the U-Net's encoder; MiT: the MiT segmenter), then
     ``evaluate.json``: mean Dice over the organs;
4. prints one table (markdown) and writes it with the raw numbers to ``--out-dir`` (``comparison.md``,
   ``comparison.json``).

The demo set is tiny (tens of images), so differences of a few points are noise; the table says what the methods
do at this scale, not what they do at the seeds' scale. It takes about 20-40 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from medssl.cli import run

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"

# method -> how to pretrain and export it
METHODS: dict[str, dict[str, Any]] = {
    "swav": {
        "bundle": "ssl_swav_multimodal_pretrain",
        "configs": ["configs/train.json", "configs/demo.json"],
        "encoder_key": "backbone",
        "kind": "resnet",
    },
    "unimiss": {
        "bundle": "ssl_unimiss_pretrain",
        "configs": ["configs/train.json", "configs/smoke.json", "configs/demo.json"],
        "encoder_key": "teacher.backbone",
        "kind": "mit",
    },
    "joint": {
        "bundle": "ssl_joint_image_volume_pretrain",
        "configs": ["configs/train.json", "configs/train_stage1.json", "configs/demo.json"],
        "encoder_key": "backbone",
        "kind": "resnet",
    },
}


def _config_arg(bundle: Path, configs: list[str]) -> str:
    return "[" + ",".join(f"'{bundle / c}'" for c in configs) + "]"


def _run(cmd: list[str], log: Path) -> None:
    """Run a command, echo it, keep its output in ``log``; an error shows the log's tail."""
    printable = " ".join(f'"{c}"' if any(ch in c for ch in " [],'") else c for c in cmd)
    print(f"$ {printable}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"command failed (exit {proc.returncode}); log {log}:\n{tail}")
    print(f"  done in {time.perf_counter() - start:.0f} s (log {log})", flush=True)


def _bundle_run(bundle: Path, configs: list[str], overrides: dict[str, Any], log: Path) -> None:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", _config_arg(bundle, configs),
           "--bundle_root", str(bundle)]
    for key, value in overrides.items():
        text = "$None" if value is None else value if isinstance(value, str) else json.dumps(value)
        cmd += [f"--{key}", text]
    _run(cmd, log)


def pretrain_and_export(name: str, dataset_dir: Path, work: Path) -> Path:
    """Pretrain ``name`` with its demo budget and export the encoder; returns the manifest path."""
    spec = METHODS[name]
    bundle = BUNDLES / spec["bundle"]
    out_dir = work / "pretrain" / name
    manifest = work / "encoders" / f"{name}.json"
    if manifest.is_file():
        print(f"[{name}] encoder exists: {manifest}")
        return manifest
    ckpt_dir = out_dir / "ckpt"
    if not (ckpt_dir.is_dir() and any(ckpt_dir.glob("checkpoint_final*"))):
        resume = ckpt_dir.is_dir() and any(ckpt_dir.iterdir())
        _bundle_run(bundle, spec["configs"], {"dataset_dir": str(dataset_dir), "output_dir": str(out_dir),
                                              "ckpt_dir": str(ckpt_dir), "resume": resume},
                    work / "logs" / f"pretrain_{name}.log")
    _run([sys.executable, str(REPO / "tools" / "export_encoder.py"), "--bundle", str(bundle), "--checkpoint",
          str(ckpt_dir), "--out", str(manifest.with_suffix(".pt")), "--config",
          ",".join(spec["configs"]), "--encoder-key", spec["encoder_key"]],
         work / "logs" / f"export_{name}.log")
    return manifest


def _encoder_overrides(task: str, manifest: dict) -> tuple[list[str], dict[str, Any]]:
    """Extra config files and overrides that give ``task``'s network the exported encoder's architecture."""
    target = manifest["backbone"]["_target_"]
    kwargs = manifest["backbone"]["kwargs"]
    size = (manifest.get("preprocessing") or {}).get("input_size")  # fine-tune at the pretraining input size
    if target.endswith("ResNetBackbone"):
        if task == "xray_classification":
            overrides = {f"encoder_resnet#{k}": v for k, v in kwargs.items() if k not in ("spatial_dims",)}
            return [], {**overrides, **({"image_size": size} if isinstance(size, int) else {})}
        return [], {"resnet_layers": kwargs.get("layers", [3, 4, 6, 3]),
                    "resnet_block_inplanes": kwargs.get("block_inplanes", [64, 128, 256, 512]),
                    "in_channels": kwargs.get("in_channels", 1),
                    **({"image_size": [size, size]} if isinstance(size, int) else {})}
    if target.split(".")[-1].startswith("mit_") or target.endswith("MiT"):
        variant = target.split(".")[-1].replace("mit_", "") if "mit_" in target else "small"
        size = kwargs.get("img_size_2d", 64)
        if task == "xray_classification":
            enc = {"_target_": target, "decoder": False, "spatial_dims": 2, "in_channels_2d": "@in_channels",
                   "img_size_2d": "@image_size"}
            enc.update({k: v for k, v in kwargs.items() if k in ("dims", "decoder_dims", "depths", "num_heads", "sr_ratios",
                                                                 "stem_channels", "mlp_ratio")})
            return ["configs/mit.json"], {"encoder_mit": enc, "image_size": size if isinstance(size, int) else size[0]}
        seg = {"mit_variant": variant, "mit_img_size": size if isinstance(size, int) else size[0]}
        if "dims" in kwargs:
            seg["mit_dims"] = kwargs["dims"]
        if "decoder_dims" in kwargs:
            seg["mit_decoder_dims"] = kwargs["decoder_dims"]
        return ["configs/mit.json"], seg
    raise ValueError(f"compare_pretraining: no downstream mapping for encoder {target}")


def finetune_and_evaluate(task: str, method: str, manifest_path: Path, dataset_dir: Path, work: Path,
                          epochs: int, random_init: bool) -> dict[str, Any]:
    """Fine-tune ``task`` from the encoder (or from scratch) and evaluate on the test section; returns the
    evaluation summary."""
    bundle = BUNDLES / task
    manifest = json.loads(manifest_path.read_text())
    extra_configs, overrides = _encoder_overrides(task, manifest)
    tag = f"{task}_{method}_{'scratch' if random_init else 'finetune'}"
    out_dir = work / "downstream" / tag
    eval_dir = out_dir / "eval"
    summary_file = eval_dir / "metrics_summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    common = {"dataset_dir": str(dataset_dir), "output_dir": str(out_dir), "seed": 0, **overrides}
    train_configs = ["configs/train.json", *extra_configs, "configs/smoke.json"]
    train = {**common, "epochs": epochs, "ckpt_dir": str(out_dir / "ckpt"),
             "finetune_mode": "scratch" if random_init else "finetune",
             "pretrained_path": "" if random_init else str(manifest_path)}
    if task == "xray_classification":
        train.update({"max_train_items": None})
    else:
        train["train#items"] = "$medssl.downstream.label_fraction_subset(@train#all_items, @label_fraction, @seed, stratify=False)"
    if not (out_dir / "models" / "model.pt").is_file():
        _bundle_run(bundle, train_configs, train, work / "logs" / f"{tag}.log")
    evaluate = {**common, "model_path": str(out_dir / "models" / "model.pt")}
    if task == "xray_classification":
        evaluate["eval_output_dir"] = str(eval_dir)
    else:
        evaluate["output_dir"] = str(eval_dir)
    _bundle_run(bundle, ["configs/train.json", *extra_configs, "configs/smoke.json", "configs/evaluate.json"],
                evaluate, work / "logs" / f"{tag}_eval.log")
    return json.loads(summary_file.read_text())


def _metric(summary: dict, key: str) -> float:
    value = summary.get(key)
    if isinstance(value, dict):
        value = value.get("mean")
    return float("nan") if value is None else float(value)


def compare(
    dataset_dir: str = "demo_data",
    work_dir: str = "runs/compare",
    methods: Any = ("swav", "unimiss", "joint"),
    finetune_epochs: int = 8,
    seeds: int = 3,
    out_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Run the comparison (see the module docstring); returns the table rows."""
    sys.path.insert(0, str(REPO / "tools"))
    import probe

    methods = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; known: {sorted(METHODS)}")
    dataset = Path(dataset_dir).resolve()
    work = Path(work_dir).resolve()
    if not (dataset / "datalist.json").is_file():
        _run([sys.executable, str(REPO / "tools" / "demo_data.py"), "--out", str(dataset)], work / "logs" / "demo.log")
    datalist = dataset / "datalist.json"
    rows: list[dict[str, Any]] = []
    random_archs: dict[str, str] = {}  # backbone spec -> the label of its random baseline
    for method in methods:
        manifest = pretrain_and_export(method, dataset, work)
        arch = json.dumps(json.loads(manifest.read_text())["backbone"], sort_keys=True)
        kind = METHODS[method]["kind"]
        random_label = f"random ({kind})" if f"random ({kind})" not in random_archs.values() else f"random ({method} arch.)"
        for label, encoder, random_init in ((method, str(manifest), False), (random_label, f"random:{manifest}", True)):
            if random_init and arch in random_archs:
                continue  # one random baseline per architecture
            if random_init:
                random_archs[arch] = label
            print(f"[{label}] linear probes", flush=True)
            spatial = {"dims": 2} if METHODS[method]["kind"] == "mit" else {}
            result = probe.run_probe(encoder=encoder, datalist=str(datalist), method="both", seeds=seeds,
                                     k=10, cache_dir=str(work / "feature_cache"), **spatial)
            row: dict[str, Any] = {"encoder": label, "method": method}
            for m in ("knn", "linear"):
                acc = result["results"][m]["accuracy"]
                row[f"{m}_acc"] = f"{acc['mean']:.3f} ± {acc['ci95']:.3f}"
            tag = method if not random_init else ("random_" + (kind if label == f"random ({kind})" else method))
            cls = finetune_and_evaluate("xray_classification", tag, manifest, dataset, work, finetune_epochs,
                                        random_init)
            row["finetune_auc"] = f"{_metric(cls, 'auc_macro'):.3f}"
            row["finetune_acc"] = f"{_metric(cls, 'accuracy'):.3f}"
            seg = finetune_and_evaluate("xray_segmentation_2d", tag, manifest, dataset, work, finetune_epochs,
                                        random_init)
            row["seg_dice"] = f"{_metric(seg, 'dice_mean'):.3f}"
            rows.append(row)
            print(f"[{label}] {row}", flush=True)
    table = format_table(rows, finetune_epochs, seeds)
    print(table)
    out = Path(out_dir or work_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table + "\n")
    (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out / 'comparison.md'} and {out / 'comparison.json'}")
    return rows


def format_table(rows: list[dict[str, Any]], epochs: int, seeds: int) -> str:
    header = (
        f"| encoder | kNN acc (probe, {seeds} seeds) | logistic acc (probe) | fine-tune AUC ({epochs} ep) "
        "| fine-tune acc | seg. Dice (fine-tune) |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['encoder']} | {r['knn_acc']} | {r['linear_acc']} | {r['finetune_auc']} | "
                     f"{r['finetune_acc']} | {r['seg_dice']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run(compare)
