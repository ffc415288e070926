"""Frozen-feature probes of a pretrained encoder: kNN and logistic regression, with a confidence interval over seeds.

Usage:
    python tools/probe.py --encoder ENCODER.json --datalist DATALIST.json [--dataset-dir DIR] \\
        [--method knn|linear|both] [--label-fraction 1.0] [--seeds 5] [--k 20] [--image-size 224] \\
        [--train-section training] [--test-section test] [--dims 2] [--cache-dir DIR] [--max-c 100] \\
        [--recalibrate-bn] [--out results.json]
    python tools/probe.py --encoder random:resnet50 ...     # the random-initialisation baseline (see below)

What it does:
1. builds the encoder from its manifest (``tools/export_encoder.py`` / ``tools/convert_weights.py`` output; the
   weights' sha256 is checked), or a randomly initialised one for ``random:<manifest>`` (the same architecture with
   fresh weights: the baseline to compare against);
2. reads the class-labelled items of the two sections (``label`` an int class index) of the encoder's spatial dims,
   applies the medssl loading front (reader, channels, modality intensity preset) and resizes to ``--image-size``
   (default: the manifest's recorded input size, else 224 for 2D / 96x96x32 for 3D);
3. with ``--recalibrate-bn``, first recomputes every BatchNorm layer's running statistics on the training
   section's images as the probe sees them (``torch.optim.swa_utils.update_bn``: an exact average over the items,
   no augmentation), for encoders whose statistics were gathered on augmented pretraining views;
4. embeds them once (``medssl.evaluation.cache``: a second run with the same encoder and data reads the cache);
5. for each seed: keeps ``--label-fraction`` of the training items (stratified, seeded), fits the probe on them
   and scores the test items: kNN (cosine, temperature-weighted vote, k neighbours) and/or multinomial logistic
   regression on standardised features (scikit-learn, L2, C chosen by 3-fold cross-validation over 1e-3..1e2 when
   every class has 3 items, else C = 1);
6. prints accuracy, macro AUC, macro F1 and kappa as mean ± 95 % CI over the seeds (Student t; 0 with one seed)
   and writes them as JSON with ``--out``.

With label fraction 1.0 the kNN probe has no randomness (every seed gives the same number); seeds matter for
fractions below 1 and for logistic regression's cross-validation split.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai.transforms import Compose, Resized

from medssl.bundle.params import as_bool
from medssl.cli import run
from medssl.data.pipeline import load_items, loading_transforms
from medssl.downstream.subsets import label_fraction_subset
from medssl.evaluation.cache import cached_embeddings
from medssl.evaluation.knn import knn_classify
from medssl.evaluation.metrics import classification_metrics


def _ci95(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan")
    mean = float(np.mean(finite))
    if len(finite) < 2:
        return mean, 0.0
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(finite) - 1) * np.std(finite, ddof=1) / math.sqrt(len(finite)))
    return mean, half


def _input_size(manifest: dict, dims: int, image_size: Any) -> list[int]:
    if image_size is not None:
        size = [int(s) for s in (image_size if isinstance(image_size, (list, tuple)) else [image_size])]
    else:
        pre = manifest.get("preprocessing")
        pre = pre if isinstance(pre, dict) else {}
        # the recorded input size: "input_size", or per path "input_size_2d" / "input_size_3d" (UniMiSS; the joint
        # method's stages 2-3 record the volume size next to the 2D slice size)
        value = pre.get(f"input_size_{dims}d", pre.get("input_size"))
        if isinstance(value, (int, list)):
            size = [int(v) for v in (value if isinstance(value, list) else [value])]
        else:
            size = [224] if dims == 2 else [96, 96, 32]
    if len(size) == 1:
        size = size * dims
    if len(size) != dims:
        raise ValueError(f"--image-size {size}: needs {dims} values for {dims}D images")
    return size


def build_probe_encoder(encoder: str) -> tuple[torch.nn.Module, dict, str | None]:
    """(module in eval mode, manifest, fingerprint or None for a random encoder) for ``--encoder``."""
    from medssl.evaluation.cache import encoder_fingerprint
    from medssl.weights.export import _instantiate, build_encoder_from_manifest, load_manifest

    if encoder.startswith("random:"):
        manifest = load_manifest(encoder[len("random:") :])
        torch.manual_seed(0)
        module = _instantiate(manifest, manifest["_manifest_path"])
        return module.eval(), manifest, None
    manifest = load_manifest(encoder)
    module = build_encoder_from_manifest(manifest)
    return module.eval(), manifest, encoder_fingerprint(manifest_path=manifest["_manifest_path"])


def recalibrate_batchnorm(module: torch.nn.Module, items: list[dict], transform: Any, batch_size: int = 8,
                          device: str | None = None) -> None:
    """Recompute ``module``'s BatchNorm running statistics in place from ``items`` (through ``transform``), with
    torch's ``update_bn`` (exact cumulative average); the module is left in eval mode."""
    from torch.optim.swa_utils import update_bn

    def image(item: dict) -> torch.Tensor:
        return torch.as_tensor(transform(dict(item))["image"]).float()

    step = int(batch_size)
    batches = (torch.stack([image(item) for item in items[i:i + step]]) for i in range(0, len(items), step))
    module.to(device or "cpu")
    with torch.no_grad():
        update_bn(batches, module, device=device)
    module.eval()


def _encoder_dims(module: torch.nn.Module, manifest: dict, dims: int | None) -> int:
    if dims is not None:
        return int(dims)
    value = manifest.get("spatial_dims") or getattr(module, "spatial_dims", None)
    if isinstance(value, int):
        return value
    raise ValueError(f"{manifest['_manifest_path']}: the encoder handles several dims; pass --dims 2 or --dims 3")


def run_probe(
    encoder: str,
    datalist: str,
    method: str = "both",
    label_fraction: float = 1.0,
    seeds: int = 5,
    k: int = 20,
    temperature: float = 0.07,
    max_c: float = 100.0,
    **embed_options: Any,
) -> dict[str, Any]:
    """Run the probes; returns ``{"encoder", "n_train", "n_test", "label_fraction", "seeds", "results": {method:
    {metric: {"mean", "ci95", "values"}}}}``. ``embed_options`` go to :func:`embed_sections` (``dataset_dir``,
    ``image_size``, ``train_section``, ``test_section``, ``dims``, ``cache_dir``, ``batch_size``, ``max_items``,
    ``device``)."""
    if method not in ("knn", "linear", "both"):
        raise ValueError(f"--method {method!r}: choose knn, linear or both")
    data = embed_sections(encoder, datalist, **embed_options)
    return score_probes(data, method, label_fraction, seeds, k, temperature, max_c)


def embed_sections(
    encoder: str,
    datalist: str,
    dataset_dir: str | None = None,
    image_size: Any = None,
    train_section: str = "training",
    test_section: str = "test",
    dims: int | None = None,
    cache_dir: str | None = None,
    batch_size: int = 8,
    max_items: int | None = None,
    device: str | None = None,
    recalibrate_bn: bool = False,
) -> dict[str, Any]:
    """Steps 1-4 of the module docstring: the encoder's embeddings of the two sections' class-labelled items, for
    :func:`score_probes` (which can then score several label fractions without embedding again)."""
    module, manifest, fingerprint = build_probe_encoder(str(encoder))
    spatial_dims = _encoder_dims(module, manifest, dims)
    size = _input_size(manifest, spatial_dims, image_size)
    # a dimension-free encoder (MiT) has one channel count per path
    in_channels = (
        manifest.get("in_channels")
        or getattr(module, f"in_channels_{spatial_dims}d", None)
        or getattr(module, "in_channels", None)
        or 1
    )
    transform = Compose(
        loading_transforms(keys=["image"], channels=int(in_channels)) + [Resized(keys=["image"], spatial_size=size)]
    )
    preprocessing = {"probe": "loading_transforms + Resized", "channels": in_channels, "size": size}
    keys = ["image", "modality", "dim", "label"]
    train_items = load_items(datalist, train_section, dataset_dir, dims=spatial_dims, keys=keys,
                             labelled_only="class", max_items=max_items)
    test_items = load_items(datalist, test_section, dataset_dir, dims=spatial_dims, keys=keys,
                            labelled_only="class", max_items=max_items)
    classes = json.loads(Path(datalist).read_text()).get("classes")
    if isinstance(classes, int):  # a class count instead of names
        classes = None
    num_classes = len(classes) if classes else 1 + max(int(it["label"]) for it in train_items + test_items)
    name = "random" if fingerprint is None else Path(manifest["_manifest_path"]).stem
    recalibrate = as_bool(recalibrate_bn, "--recalibrate-bn")
    if recalibrate:
        preprocessing["batchnorm"] = f"recalibrated on {train_section}"

    def before_compute() -> None:  # recalibrates once, and only when an embedding is not in the cache
        nonlocal recalibrate
        if recalibrate:
            recalibrate_batchnorm(module, train_items, transform, batch_size, device)
            recalibrate = False

    cache = cache_dir if fingerprint is not None else None  # a random encoder is never cached
    start = time.perf_counter()
    common = dict(cache_dir=cache, encoder_id=name, preprocessing=preprocessing, batch_size=batch_size,
                  device=device, fingerprint=fingerprint, before_compute=before_compute)
    train = cached_embeddings(module, train_items, transform, **common)
    test = cached_embeddings(module, test_items, transform, **common)
    print(f"embedded {len(train_items)} {train_section} + {len(test_items)} {test_section} items "
          f"({'cache' if train.from_cache and test.from_cache else 'computed'}, {time.perf_counter() - start:.1f} s)",
          flush=True)
    return {"encoder": str(encoder), "train": train, "test": test, "train_items": train_items,
            "test_items": test_items, "classes": classes, "num_classes": num_classes}


def score_probes(
    data: dict[str, Any],
    method: str = "both",
    label_fraction: float = 1.0,
    seeds: int = 5,
    k: int = 20,
    temperature: float = 0.07,
    max_c: float = 100.0,
) -> dict[str, Any]:
    """Steps 4-5 of the module docstring on :func:`embed_sections`' embeddings; returns what :func:`run_probe` does.
    ``max_c``: the largest inverse regularisation strength the logistic probe's cross-validation tries (one value per
    decade from 1e-3); weakly regularised fits on hundreds of feature dimensions take the most iterations."""
    train, test, train_items, test_items = data["train"], data["test"], data["train_items"], data["test_items"]
    classes, num_classes = data["classes"], data["num_classes"]
    index_of = {key: i for i, key in enumerate(train.keys)}
    results: dict[str, dict[str, list[float]]] = {}
    methods = ["knn", "linear"] if method == "both" else [method]
    for seed in range(int(seeds)):
        subset = label_fraction_subset(train_items, label_fraction, seed=seed)
        rows = torch.tensor([index_of[str(it["image"])] for it in subset])
        f_train, y_train = train.features[rows], torch.as_tensor([int(it["label"]) for it in subset])
        y_test = torch.as_tensor([int(it["label"]) for it in test_items])
        for m in methods:
            if m == "knn":
                _, scores = knn_classify(f_train, y_train, test.features, k=k, temperature=temperature,
                                         num_classes=num_classes, return_scores=True)
                probs = scores.numpy()
            else:
                probs = _logistic_probs(f_train.numpy(), y_train.numpy(), test.features.numpy(), num_classes, seed,
                                        max_c)
            metrics = classification_metrics(probs, y_test.numpy(), class_names=classes)
            for key in ("accuracy", "auc_macro", "f1_macro", "kappa"):
                results.setdefault(m, {}).setdefault(key, []).append(metrics.get(key, float("nan")))
    summary = {
        m: {key: dict(zip(("mean", "ci95"), _ci95(v)), values=v) for key, v in per.items()}
        for m, per in results.items()
    }
    return {
        "encoder": data["encoder"], "n_train": len(train_items), "n_test": len(test_items),
        "label_fraction": float(label_fraction), "seeds": int(seeds), "results": summary,
    }


def _logistic_probs(x_train, y_train, x_test, num_classes: int, seed: int, max_c: float = 100.0) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    present = np.unique(y_train)
    if len(present) == 1:  # a single class in the subset: it is predicted with certainty
        probs = np.zeros((len(x_test), num_classes))
        probs[:, present[0]] = 1.0
        return probs
    counts = np.bincount(y_train, minlength=num_classes)[present]
    # one multinomial fit per C and fold (LogisticRegressionCV fitted one-vs-rest paths here, 10x slower); tol 1e-3
    # gives the accuracy of tol 1e-4 to 0.005 in a quarter of the iterations
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=min(1.0, max_c), max_iter=2000, tol=1e-3,
                                                              random_state=seed))
    if counts.min() >= 3:
        cs = np.logspace(-3, math.log10(max_c), int(round(math.log10(max_c))) + 4).tolist()  # one per decade
        folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)
        pipe = GridSearchCV(pipe, {"logisticregression__C": cs}, cv=folds)
    with warnings.catch_warnings():  # scikit-learn's notices about future defaults, not about this fit
        warnings.simplefilter("ignore", FutureWarning)
        pipe = pipe.fit(x_train, y_train)
    probs = np.zeros((len(x_test), num_classes))
    probs[:, pipe.classes_] = pipe.predict_proba(x_test)
    return probs


def format_results(result: dict[str, Any]) -> str:
    lines = [
        f"encoder {result['encoder']}: {result['n_train']} training / {result['n_test']} test items, label fraction "
        f"{result['label_fraction']}, {result['seeds']} seeds (mean ± 95% CI)"
    ]
    for m, per in result["results"].items():
        parts = [f"{key} {v['mean']:.4f} ± {v['ci95']:.4f}" for key, v in per.items()]
        lines.append(f"  {m:<6} " + "  ".join(parts))
    return "\n".join(lines)


def main(out: str | None = None, **kwargs: Any) -> None:
    """See the module docstring; every option of :func:`run_probe` is a flag (``--label-fraction 0.2``)."""
    kwargs = {k.replace("-", "_"): v for k, v in kwargs.items()}
    result = run_probe(**kwargs)
    print(format_results(result))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    run(main)
