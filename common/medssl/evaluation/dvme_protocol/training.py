"""The head training of the DVME protocol: :func:`train_classifier` (Adam, plateau scheduler on the validation
loss, best epoch by validation AUC) run by an Ignite ``Engine``, the evaluation pass
(:func:`predict_probabilities`) and DVME's averaged attention map (:func:`attention_map`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from medssl.evaluation.metrics import classification_metrics

from .heads import DVMEImageClassifier

# the head-training engines' own logger: Ignite's run / epoch INFO lines are left out of a protocol's log (one run per
# (model, regime, fold) job); warnings and errors still show
_ENGINE_LOGGER = logging.getLogger(f"{__name__}.engine")
_ENGINE_LOGGER.setLevel(logging.WARNING)


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, Mapping):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def predict_probabilities(
    model: nn.Module, batches: Iterable[tuple[Any, torch.Tensor]], device: torch.device, with_attention: bool = False
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
    """``(probabilities (N, C), labels (N,), mean cross-entropy, attention map (E, E) or None)`` of ``model`` (eval
    mode, no grad) over ``(inputs, labels)`` batches. The attention map is DVME's encoder-to-encoder map averaged
    over all N samples."""
    was_training = model.training
    model.eval()
    probs, labels, loss_sum, attn_sum = [], [], 0.0, None
    try:
        with torch.no_grad():
            for inputs, y in batches:
                logits = model(_to_device(inputs, device)).float()
                y = y.to(device)
                loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                probs.append(logits.softmax(dim=1).cpu())
                labels.append(y.cpu())
                head = model.head if isinstance(model, DVMEImageClassifier) else model
                maps = getattr(head, "last_sample_attention_maps", None)
                if with_attention and maps is not None:
                    attn_sum = maps.sum(0).cpu() if attn_sum is None else attn_sum + maps.sum(0).cpu()
    finally:
        model.train(was_training)
    p, y = torch.cat(probs), torch.cat(labels)
    return p, y, loss_sum / max(1, len(y)), None if attn_sum is None else attn_sum / len(y)


def _auc(probs: torch.Tensor, labels: torch.Tensor, ordinal: bool, class_names: Sequence[str] | None) -> dict:
    return classification_metrics(probs, labels, ordinal=ordinal, class_names=class_names)


def train_classifier(
    model: nn.Module,
    train_batches: Callable[[int], Iterable[tuple[Any, torch.Tensor]]],
    val_batches: Callable[[], Iterable[tuple[Any, torch.Tensor]]],
    *,
    max_epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    plateau_patience: int = 5,
    plateau_factor: float = 0.1,
    encoder_lr_scale: float = 1.0,
    device: torch.device | str = "cpu",
    ordinal: bool = False,
    class_names: Sequence[str] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    seed: int = 0,
) -> tuple[dict, dict]:
    """Train ``model`` with Adam + ``ReduceLROnPlateau`` (on the validation loss) and cross-entropy; keep the epoch
    with the best validation AUC (ties and undefined AUCs: lower validation loss).

    ``train_batches(epoch)`` yields ``(inputs, labels)`` for a 0-based epoch (the caller seeds the shuffle by epoch);
    ``val_batches()`` the validation batches. Parameters named ``encoders.*`` get ``lr * encoder_lr_scale``.
    ``on_epoch(record)`` receives ``{"epoch", "loss", "val_loss", "val_auc", "lr"}`` after each epoch.
    Dropout draws from a generator seeded with ``seed`` inside a forked RNG state (the caller's global RNG is left
    as it was), so a run is reproducible. Returns ``(best state dict (CPU copies), best record)``.
    """
    device = torch.device(device)
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        return _train_loop(model, train_batches, val_batches, max_epochs=max_epochs, lr=lr, weight_decay=weight_decay,
                           plateau_patience=plateau_patience, plateau_factor=plateau_factor,
                           encoder_lr_scale=encoder_lr_scale, device=device, ordinal=ordinal, class_names=class_names,
                           on_epoch=on_epoch)


class _EpochBatches:
    """What the head-training engine iterates: ``iter()`` gives ``train_batches(epoch)`` for the engine's current
    (0-based) epoch, so every epoch is a fresh pass shuffled by its own seed."""

    def __init__(self, engine: Engine, train_batches: Callable[[int], Iterable[tuple[Any, torch.Tensor]]]):
        self.engine = engine
        self.train_batches = train_batches

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        return iter(self.train_batches(self.engine.state.epoch - 1))


def _train_loop(model, train_batches, val_batches, *, max_epochs, lr, weight_decay, plateau_patience, plateau_factor,
                encoder_lr_scale, device, ordinal, class_names, on_epoch) -> tuple[dict, dict]:
    """The training of :func:`train_classifier` as an Ignite ``Engine``: one iteration = one optimizer step on a
    training batch; at each epoch's end the validation pass, the plateau scheduler and the best-epoch choice."""
    model.to(device)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"train_classifier: {type(model).__name__} has no trainable parameters")
    groups = [{"params": [p for n, p in params if not n.startswith("encoders.")], "lr": lr}]
    encoder_params = [p for n, p in params if n.startswith("encoders.")]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": lr * encoder_lr_scale})
    optimizer = torch.optim.Adam([g for g in groups if g["params"]], weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=plateau_factor,
                                                           patience=plateau_patience)

    def step(engine: Engine, batch: tuple[Any, torch.Tensor]) -> float:
        inputs, y = batch
        logits = model(_to_device(inputs, device))
        loss = nn.functional.cross_entropy(logits.float(), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        engine.state.loss_sum += value * len(y)
        engine.state.seen += len(y)
        return value

    engine = Engine(step)
    engine.logger = _ENGINE_LOGGER
    best: dict[str, Any] = {"state": None, "record": None, "key": None}

    @engine.on(Events.EPOCH_STARTED)
    def start_epoch(engine: Engine) -> None:
        model.train()
        engine.state.loss_sum, engine.state.seen = 0.0, 0
        engine.set_data(engine.state.dataloader)  # this epoch's pass (see _EpochBatches)

    @engine.on(Events.EPOCH_COMPLETED)
    def validate(engine: Engine) -> None:
        probs, labels, val_loss, _ = predict_probabilities(model, val_batches(), device)
        val_auc = _auc(probs, labels, ordinal, class_names)["auc_macro"]
        record = {"epoch": engine.state.epoch, "loss": engine.state.loss_sum / max(1, engine.state.seen),
                  "val_loss": val_loss, "val_auc": val_auc, "lr": optimizer.param_groups[0]["lr"]}
        scheduler.step(val_loss)
        key = (-math.inf if math.isnan(val_auc) else val_auc, -val_loss)
        if best["key"] is None or key > best["key"]:
            best["key"], best["record"] = key, dict(record)
            best["state"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if on_epoch is not None:
            on_epoch(record)

    engine.run(_EpochBatches(engine, train_batches), max_epochs=max_epochs)
    return best["state"], best["record"]


def attention_map(model: nn.Module, features: Mapping[str, torch.Tensor], batch_size: int = 64,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """DVME's encoder-to-encoder attention map (E, E) averaged over the N samples of ``features`` (name → (N, D))."""
    n = next(iter(features.values())).shape[0]
    labels = torch.zeros(n, dtype=torch.long)
    batches = (({k: v[i:i + batch_size] for k, v in features.items()}, labels[i:i + batch_size])
               for i in range(0, n, batch_size))
    _, _, _, attn = predict_probabilities(model, batches, torch.device(device), with_attention=True)
    if attn is None:
        raise ValueError(f"attention_map: {type(model).__name__} exposes no attention weights (attention='none'?)")
    return attn
