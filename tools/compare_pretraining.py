"""The evidence table: does each pretraining method beat random initialisation of the same architecture?

Usage:
    python tools/compare_pretraining.py [--dataset-dir demo_data] [--work-dir runs/compare] \\
        [--methods swav,deepcluster,unimiss,joint] [--fractions 0.01,0.1,1.0] [--seeds 3] \\
        [--pretrain-seeds 1] [--finetune-epochs 20] [--detection-epochs 0] [--out-dir runs/compare]

What it does (every pretraining / fine-tuning step is a ``python -m monai.bundle run`` or tool command, printed
before it runs, so any row can be reproduced by hand; steps whose output exists are skipped, so an interrupted
comparison resumes):

1. builds the demo data in ``--dataset-dir`` when its learnability set (``datalist_learn.json``, demo data v3) is
   missing;
2. pretrains each method on the learnability set with its bundle's ``demo.json`` budget, once per pretraining seed
   (``--pretrain-seeds``), and exports the encoder with ``tools/export_encoder.py``:
   ``swav`` and ``deepcluster`` (``ssl_swav_multimodal_pretrain``, + ``deepcluster_v2.json``) on the 2D items;
   ``unimiss`` (``ssl_unimiss_pretrain``) on the 2D and 3D items, one dimension-free MiT probed on both;
   ``joint`` (``ssl_joint_image_volume_pretrain``) stage 1 on the 2D items, probed in 2D (the slice trunk), then
   stages 2 and 3 on the 3D items from the stage-1 checkpoint (5 and 10 epochs: about demo.json's step counts
   on the small demo set), probed in 3D (f_intra + f_inter: the volume embedding);
3. probes every encoder and a randomly initialised encoder of the same architecture ("random") on the frozen
   features of its own dimensionality (``tools/probe.py``): kNN and logistic regression trained on a stratified
   ``--fractions`` share of the labelled training items (1 %, 10 %, 100 %), scored on the test section, over
   ``--seeds`` label-subset seeds x ``--pretrain-seeds``: mean and 95 % CI (Student t); the logistic probe's
   cross-validation tries C = 1e-3, 1e-2, 1e-1 (weaker regularisation takes many more iterations). Labels are the
   learnability set's flat classes, three per modality (chance within a modality 1/3);
4. fine-tunes ``xray_classification`` on 10 % of the learnability set's X-ray items from each 2D ResNet and from
   scratch (``--finetune-epochs``, 0 = skip), one seed, and reports test accuracy;
   with ``--detection-epochs N`` (default 0 = off) also trains ``xray_lesion_detection`` (its ``demo.json``: the
   demo's detection phantoms) from each 2D ResNet and from scratch for N epochs, one seed, and reports the test
   mAP@0.5;
5. prints one markdown table -- with a verdict per method: does its linear probe at 10 % labels beat random with
   non-overlapping confidence intervals? -- and writes it with the raw numbers to ``--out-dir`` (``comparison.md``,
   ``comparison.json``).

These are the demo's minutes-long budgets on synthetic data: the table shows whether a method learns at all, not
how well it does at the papers' scale. The README gives the measured table, its command, date and duration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import probe  # noqa: E402  (tools/probe.py: the frozen-feature probes)
from medssl.cli import run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"

# method -> how to pretrain it (bundle, config files, overrides), which learnability datalist it trains on, the key of
# the encoder to export, and the dimensionalities its encoder is probed on
METHODS: dict[str, dict[str, Any]] = {
    "swav": {
        "bundle": "ssl_swav_multimodal_pretrain",
        "configs": ["configs/train.json", "configs/demo.json"],
        "datalist": "datalist_learn_2d.json",
        "encoder_key": "backbone",
        "dims": [2],
    },
    "deepcluster": {
        "bundle": "ssl_swav_multimodal_pretrain",
        "configs": ["configs/train.json", "configs/deepcluster_v2.json", "configs/demo.json"],
        "datalist": "datalist_learn_2d.json",
        "encoder_key": "backbone",
        "dims": [2],
        # demo.json sizes SwAV's one prototype matrix; DeepCluster-v2's three heads get the same count
        "overrides": {"n_heads_prototypes": "$[@n_prototypes] * 3"},
    },
    "unimiss": {
        "bundle": "ssl_unimiss_pretrain",
        "configs": ["configs/train.json", "configs/smoke.json", "configs/demo.json"],
        "datalist": "datalist_learn.json",
        "encoder_key": "teacher.backbone",
        "dims": [2, 3],
    },
    "joint": {
        "bundle": "ssl_joint_image_volume_pretrain",
        "configs": ["configs/train.json", "configs/train_stage1.json", "configs/demo.json"],
        "datalist": "datalist_learn_2d.json",
        "encoder_key": "backbone",
        "dims": [2, 3],
        # the 3D encoder: stages 2 and 3 on the volumes, each from the previous stage's checkpoint (stage 1 above)
        "chain_3d": {
            "datalist": "datalist_learn_3d.json",
            "stages": [["configs/train.json", "configs/train_stage2.json", "configs/demo.json"],
                       ["configs/train.json", "configs/train_stage3.json", "configs/demo.json"]],
            # demo.json's 20 / 30 epochs are 80 / 120 steps on the small demo set's 27 volumes; on the 300 learnability
            # volumes 5 / 10 epochs (185 / 370 steps) keep the step counts within 3x of those and the stages at ~6 min
            "overrides": [{"epochs": 5}, {"epochs": 10, "knn_every_n_epochs": 5}],
            "encoder_id": "encoder",  # f_intra + f_inter: a volume -> its embedding
            "encoder_key": "backbone",
        },
    },
}
LEARN_DATALIST = "datalist_learn.json"  # every learnability item: the probes' labels


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


def _pretrain(bundle: Path, configs: list[str], datalist: Path, out_dir: Path, seed: int, log: Path,
              extra: dict[str, Any]) -> Path:
    """One ``monai.bundle run`` of a pretraining bundle into ``out_dir`` unless its final checkpoint exists (an
    interrupted run resumes); returns its ckpt_dir."""
    ckpt_dir = out_dir / "ckpt"
    if not (ckpt_dir.is_dir() and any(ckpt_dir.glob("checkpoint_final*"))):
        resume = ckpt_dir.is_dir() and any(ckpt_dir.iterdir())
        overrides = {"dataset_dir": str(datalist.parent), "datalist": str(datalist), "output_dir": str(out_dir),
                     "ckpt_dir": str(ckpt_dir), "resume": resume, "seed": seed, **extra}
        _bundle_run(bundle, configs, overrides, log)
    return ckpt_dir


def _export(bundle: Path, ckpt_dir: Path, manifest: Path, encoder_key: str, log: Path, encoder_id: str | None = None):
    cmd = [sys.executable, str(REPO / "tools" / "export_encoder.py"), "--bundle", str(bundle), "--checkpoint",
           str(ckpt_dir), "--out", str(manifest.with_suffix(".pt")), "--encoder-key", encoder_key]
    _run(cmd + (["--encoder-id", encoder_id] if encoder_id else []), log)


def pretrain_and_export(name: str, dataset_dir: Path, work: Path, seed: int = 0, dims: int = 2) -> Path:
    """Pretrain ``name`` with its demo budget and pretraining ``seed``, export the encoder probed on ``dims``-D items;
    returns the manifest. A method with a ``chain_3d`` (the joint method) gets its 3D encoder from further stages
    that start from the first stage's checkpoint."""
    spec = METHODS[name]
    bundle = BUNDLES / spec["bundle"]
    chain = spec.get("chain_3d") if dims == 3 else None
    tag = f"{name}_seed{seed}"
    manifest = work / "encoders" / f"{tag}{'_3d' if chain else ''}.json"
    if manifest.is_file():
        print(f"[{tag}] encoder exists: {manifest}")
        return manifest
    ckpt_dir = _pretrain(bundle, spec["configs"], dataset_dir / spec["datalist"], work / "pretrain" / tag, seed,
                         work / "logs" / f"pretrain_{tag}.log", spec.get("overrides", {}))
    if chain is None:
        _export(bundle, ckpt_dir, manifest, spec["encoder_key"], work / "logs" / f"export_{tag}.log")
        return manifest
    for stage, (configs, extra) in enumerate(zip(chain["stages"], chain["overrides"]), start=2):
        stage_tag = f"{tag}_stage{stage}"
        ckpt_dir = _pretrain(bundle, configs, dataset_dir / chain["datalist"], work / "pretrain" / stage_tag, seed,
                             work / "logs" / f"pretrain_{stage_tag}.log", {**extra, "pretrained_path": str(ckpt_dir)})
    _export(bundle, ckpt_dir, manifest, chain["encoder_key"], work / "logs" / f"export_{tag}_3d.log",
            chain["encoder_id"])
    return manifest


def _encoder_overrides(manifest: dict) -> dict[str, Any]:
    """``xray_classification`` overrides that give its encoder the exported ResNet's architecture and input size (the
    fine-tuning column covers the 2D ResNet methods; UniMiSS's MiT rows leave it empty)."""
    target = manifest["backbone"]["_target_"]
    if not target.endswith("ResNetBackbone"):
        raise ValueError(f"compare_pretraining: no fine-tuning mapping for encoder {target}")
    kwargs = manifest["backbone"]["kwargs"]
    size = (manifest.get("preprocessing") or {}).get("input_size")  # fine-tune at the pretraining input size
    overrides = {f"encoder_resnet#{k}": v for k, v in kwargs.items() if k != "spatial_dims"}
    return {**overrides, **({"image_size": size} if isinstance(size, int) else {})}


def xr_datalist(dataset_dir: Path, work: Path) -> Path:
    """The learnability set's X-ray items as a 3-class datalist (labels 0-2) for ``xray_classification``."""
    learn = json.loads((dataset_dir / LEARN_DATALIST).read_text())
    offset = learn["label_offsets"]["XR"]
    out = {"name": "learnability set, X-ray items", "classes": learn["modality_classes"]["XR"]}
    for section in ("training", "validation", "test"):
        out[section] = [{**it, "image": str(dataset_dir / it["image"]), "label": int(it["label"]) - offset}
                        for it in learn[section] if it.get("modality") == "XR"]
    path = work / "data" / "learn_xr.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return path


def finetune_and_evaluate(tag: str, manifest_path: Path, datalist: Path, dataset_dir: Path, work: Path,
                          epochs: int, random_init: bool, label_fraction: float = 0.1) -> dict[str, Any]:
    """Fine-tune ``xray_classification`` on ``label_fraction`` of ``datalist``'s training items from the encoder (or
    from scratch with its architecture) and evaluate on the test section; returns the evaluation summary."""
    task = "xray_classification"
    bundle = BUNDLES / task
    overrides = _encoder_overrides(json.loads(manifest_path.read_text()))
    out_dir = work / "finetune" / tag
    eval_dir = out_dir / "eval"
    summary_file = eval_dir / "metrics_summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    names = json.loads(datalist.read_text())["classes"]
    common = {"dataset_dir": str(dataset_dir), "datalist": str(datalist), "output_dir": str(out_dir), "seed": 0,
              "class_names": names, **overrides}
    configs = ["configs/train.json", "configs/smoke.json"]
    train = {**common, "epochs": epochs, "ckpt_dir": str(out_dir / "ckpt"), "max_train_items": None,
             "batch_size": 16, "label_fraction": label_fraction,
             "finetune_mode": "scratch" if random_init else "finetune",
             "pretrained_path": "" if random_init else str(manifest_path)}
    if not (out_dir / "models" / "model.pt").is_file():
        _bundle_run(bundle, configs, train, work / "logs" / f"finetune_{tag}.log")
    evaluate = {**common, "model_path": str(out_dir / "models" / "model.pt"), "eval_output_dir": str(eval_dir)}
    _bundle_run(bundle, [*configs, "configs/evaluate.json"], evaluate, work / "logs" / f"finetune_{tag}_eval.log")
    return json.loads(summary_file.read_text())


def _detection_overrides(manifest: dict) -> dict[str, Any]:
    """``xray_lesion_detection`` overrides that give its RetinaNet backbone the exported ResNet's architecture."""
    target = manifest["backbone"]["_target_"]
    if not target.endswith("ResNetBackbone"):
        raise ValueError(f"compare_pretraining: no detection mapping for encoder {target}")
    kwargs = manifest["backbone"]["kwargs"]
    out = {"resnet_layers": list(kwargs["layers"]), "resnet_width": kwargs.get("width", 1),
           "in_channels": kwargs.get("in_channels", 1)}
    if kwargs.get("block_inplanes"):
        out["resnet_block_inplanes"] = list(kwargs["block_inplanes"])
    return out


def detect_and_evaluate(tag: str, manifest_path: Path, dataset_dir: Path, work: Path, epochs: int,
                        random_init: bool) -> dict[str, Any]:
    """Train ``xray_lesion_detection`` (its ``demo.json``: the demo's detection phantoms) from the encoder (or from
    scratch with its architecture) for ``epochs`` and evaluate on the test section; returns the evaluation summary."""
    bundle = BUNDLES / "xray_lesion_detection"
    out_dir = work / "detection" / tag
    eval_dir = out_dir / "eval"
    summary_file = eval_dir / "metrics_summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    common = {"dataset_dir": str(dataset_dir), "seed": 0, **_detection_overrides(json.loads(manifest_path.read_text()))}
    configs = ["configs/train.json", "configs/demo.json"]
    train = {**common, "epochs": epochs, "output_dir": str(out_dir), "ckpt_dir": str(out_dir / "ckpt"),
             "finetune_mode": "scratch" if random_init else "finetune",
             "pretrained_path": "" if random_init else str(manifest_path)}
    if not (out_dir / "models" / "model.pt").is_file():
        _bundle_run(bundle, configs, train, work / "logs" / f"detection_{tag}.log")
    evaluate = {**common, "output_dir": str(eval_dir), "model_path": str(out_dir / "models" / "model.pt")}
    _bundle_run(bundle, [*configs, "configs/evaluate.json"], evaluate, work / "logs" / f"detection_{tag}_eval.log")
    return json.loads(summary_file.read_text())


def compare(
    dataset_dir: str = "demo_data",
    work_dir: str = "runs/compare",
    methods: Any = ("swav", "deepcluster", "unimiss", "joint"),
    fractions: Any = (0.01, 0.1, 1.0),
    seeds: int = 3,
    pretrain_seeds: int = 1,
    finetune_epochs: int = 20,
    detection_epochs: int = 0,
    out_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Run the comparison (see the module docstring); returns the table rows."""
    methods = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; known: {sorted(METHODS)}")
    fractions = [float(f) for f in (str(fractions).strip("[]()").split(",") if not isinstance(fractions, (list, tuple))
                                    else fractions)]
    if any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"--fractions {fractions}: every fraction must be in (0, 1]")
    started = time.perf_counter()
    dataset = Path(dataset_dir).resolve()
    work = Path(work_dir).resolve()
    if not (dataset / LEARN_DATALIST).is_file():
        _run([sys.executable, str(REPO / "tools" / "demo_data.py"), "--out", str(dataset)], work / "logs" / "demo.log")
    datalist = str(dataset / LEARN_DATALIST)
    xr = xr_datalist(dataset, work) if finetune_epochs > 0 else None
    rows: list[dict[str, Any]] = []
    done_random: set[tuple[str, int]] = set()  # (architecture, dims) of the random baselines already probed
    for method in methods:
        for dims in METHODS[method]["dims"]:
            manifests = [pretrain_and_export(method, dataset, work, seed, dims) for seed in range(int(pretrain_seeds))]
            arch = json.dumps(json.loads(manifests[0].read_text())["backbone"], sort_keys=True)
            encoders = [(method, [str(m) for m in manifests], False)]
            if (arch, dims) not in done_random:
                done_random.add((arch, dims))
                encoders.append((f"random ({method} arch.)", [f"random:{manifests[0]}"], True))
            for label, paths, random_init in encoders:
                row: dict[str, Any] = {"method": method, "encoder": label, "dims": dims, "random": random_init,
                                       "arch": arch}
                values: dict[str, list[float]] = {}
                for path in paths:
                    print(f"[{label}, {dims}D] probes of {path}", flush=True)
                    data = probe.embed_sections(path, datalist, str(dataset), dims=dims,
                                                cache_dir=str(work / "feature_cache"), batch_size=32)
                    for fraction in fractions:
                        result = probe.score_probes(data, "both", fraction, seeds, k=10, max_c=0.1)
                        for m in ("knn", "linear"):
                            accuracy = result["results"][m]["accuracy"]["values"]
                            values.setdefault(f"{m}@{fraction:g}", []).extend(accuracy)
                for key, vals in values.items():
                    mean, half = probe._ci95(vals)
                    row[key] = {"mean": mean, "ci95": half, "values": vals}
                if xr is not None and dims == 2 and "ResNetBackbone" in arch:
                    tag = f"{method}_random" if random_init else f"{method}_seed0"
                    summary = finetune_and_evaluate(tag, manifests[0], xr, dataset, work, finetune_epochs, random_init)
                    row["finetune@0.1"] = _metric(summary, "accuracy")
                if int(detection_epochs) > 0 and dims == 2 and "ResNetBackbone" in arch:
                    tag = f"{method}_random" if random_init else f"{method}_seed0"
                    summary = detect_and_evaluate(tag, manifests[0], dataset, work, int(detection_epochs), random_init)
                    row["detection_map50"] = float(summary["map50"])
                rows.append(row)
                print(f"[{label}, {dims}D] " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in row.items()
                                                       if isinstance(v, dict)), flush=True)
    minutes = (time.perf_counter() - started) / 60
    table = format_table(rows, fractions, seeds, int(pretrain_seeds), finetune_epochs, int(detection_epochs))
    print(table)
    print(f"comparison took {minutes:.0f} min")
    out = Path(out_dir or work_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table + f"\n\n{minutes:.0f} min, {time.strftime('%Y-%m-%d')}\n")
    (out / "comparison.json").write_text(json.dumps({"rows": rows, "minutes": minutes}, indent=2) + "\n")
    print(f"wrote {out / 'comparison.md'} and {out / 'comparison.json'}")
    return rows


def _metric(summary: dict, key: str) -> float:
    value = summary.get(key)
    if isinstance(value, dict):
        value = value.get("mean")
    return float("nan") if value is None else float(value)


def beats_random(row: dict[str, Any], baseline: dict[str, Any], key: str = "linear@0.1") -> bool | None:
    """True when ``row``'s 95 % CI on ``key`` lies wholly above ``baseline``'s (None when either lacks it)."""
    if key not in row or key not in baseline:
        return None
    a, b = row[key], baseline[key]
    return a["mean"] - a["ci95"] > b["mean"] + b["ci95"]


def format_table(rows: list[dict[str, Any]], fractions: list[float], seeds: int, pretrain_seeds: int = 1,
                 finetune_epochs: int = 0, detection_epochs: int = 0) -> str:
    """One markdown table: accuracy mean ± 95 % CI per probe and label fraction, and the verdict per method."""
    cols = [f"{m}@{f:g}" for m in ("knn", "linear") for f in fractions]
    names = [f"{'kNN' if c.startswith('knn') else 'linear'} {float(c.split('@')[1]) * 100:g} %" for c in cols]
    header = "| method | dims | encoder | " + " | ".join(names)
    header += " | fine-tune 10 % (XR)" if finetune_epochs else ""
    header += " | detection mAP@0.5 (test)" if detection_epochs else ""
    header += " | beats random (linear 10 %, CIs apart) |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    baselines = {(r.get("arch"), r["dims"]): r for r in rows if r.get("random")}
    for r in rows:
        cells = [f"{r[c]['mean']:.3f} ± {r[c]['ci95']:.3f}" if c in r else "—" for c in cols]
        if r.get("random"):
            verdict = "(baseline)"
        else:
            base = baselines.get((r.get("arch"), r["dims"]))
            ok = beats_random(r, base) if base else None
            verdict = "n/a" if ok is None else ("**yes**" if ok else "no")
        ft = [f"{r['finetune@0.1']:.3f}" if "finetune@0.1" in r else "—"] if finetune_epochs else []
        ft += [f"{r['detection_map50']:.3f}" if "detection_map50" in r else "—"] if detection_epochs else []
        lines.append(f"| {r['method']} | {r['dims']}D | {r['encoder']} | " + " | ".join(cells + ft + [verdict]) + " |")
    lines.append(f"\nAccuracy on the test items, mean ± 95 % CI over {seeds} label-subset seeds x {pretrain_seeds} "
                 "pretraining seed(s); chance within a modality 1/3.")
    return "\n".join(lines)


def main(**kwargs: Any) -> None:
    """See the module docstring; the table is printed and written, not returned (fire would print the rows again)."""
    compare(**{k.replace("-", "_"): v for k, v in kwargs.items()})


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run(main)
