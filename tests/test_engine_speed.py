"""SSLTrainer's speed switches (issue #12): channels_last, the CUDA amp default, compile with eager fallback.

CPU only: the CUDA defaults are checked through the resolution of the arguments, the memory format and the compile
fallback by forcing them on CPU.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from conftest import BUNDLES
from medssl.engines import trainer as trainer_mod
from medssl.engines.trainer import SSLTrainer, compile_backbone, has_conv2d, to_channels_last


class ConvMethod(nn.Module):
    """A method with a 2D conv ``backbone``; records the memory format of what the backbone receives."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)
        self.seen_channels_last: list[bool] = []

    def forward(self, batch):
        x = batch["crops"][0]
        self.seen_channels_last.append(x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1)
        return {"loss": self.head(self.backbone(x)).pow(2).mean()}


class LinearMethod(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 2)

    def forward(self, batch):
        return {"loss": self.backbone(batch["x"]).pow(2).mean()}


def batches(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [{"crops": [torch.randn(3, 2, 8, 8, generator=g)], "modality": ["CT"] * 3} for _ in range(n)]


def train(method: nn.Module, **kw) -> tuple[SSLTrainer, list[float]]:
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    engine = SSLTrainer("cpu", 1, batches(), method, optimizer, **kw)
    losses: list[float] = []
    engine.add_event_handler(trainer_mod.Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
    engine.run()
    return engine, losses


# ------------------------------------------------------------------------------------------------ defaults
def test_cpu_defaults_leave_amp_channels_last_and_compile_off():
    engine, _ = train(ConvMethod())
    assert engine.amp is False and engine.channels_last is False and engine.compiled is False
    assert not engine.method.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert engine.method.seen_channels_last == [False] * 3


def test_defaults_resolve_on_with_cuda(monkeypatch):
    """amp / channels_last left unset mean "on with CUDA": checked without a GPU through the resolution alone."""
    resolved = {}

    def fake_init(self, **kw):  # stop after the argument resolution, before anything touches the device
        resolved.update(kw)
        raise RuntimeError("stop")

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", fake_init)
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: self)
    method = ConvMethod()
    with pytest.raises(RuntimeError, match="stop"):
        SSLTrainer("cuda", 1, batches(), method, torch.optim.SGD(method.parameters(), lr=0.1))
    assert resolved["amp"] is True
    assert method.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="stop"):
        SSLTrainer("cuda", 1, batches(), ConvMethod(), torch.optim.SGD(method.parameters(), lr=0.1), amp="false")
    assert resolved["amp"] is False


@pytest.mark.parametrize("key", ["amp", "channels_last", "compile"])
def test_string_booleans_are_coerced_and_bad_values_name_the_key(key):
    engine, _ = train(ConvMethod(), **{key: "off"})
    assert getattr(engine, {"amp": "amp", "channels_last": "channels_last", "compile": "compiled"}[key]) is False
    method = ConvMethod()
    with pytest.raises(ValueError, match=key):
        SSLTrainer("cpu", 1, batches(), method, torch.optim.SGD(method.parameters(), lr=0.1), **{key: "maybe"})


# ------------------------------------------------------------------------------------------------ channels_last
def test_channels_last_forced_on_formats_model_and_inputs_and_keeps_the_losses():
    _, reference = train(ConvMethod())
    engine, losses = train(ConvMethod(), channels_last="true")
    assert engine.channels_last is True
    weight = engine.method.backbone[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert engine.method.seen_channels_last == [True] * 3
    assert losses == pytest.approx(reference, rel=1e-5, abs=1e-7)


def test_channels_last_keeps_parameter_identity_for_the_optimizer():
    method = ConvMethod()
    before = [id(p) for p in method.parameters()]
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    SSLTrainer("cpu", 1, batches(), method, optimizer, channels_last=True)
    assert [id(p) for p in method.parameters()] == before
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == before


def test_channels_last_skips_methods_without_2d_convolutions():
    method = LinearMethod()
    assert not has_conv2d(method) and has_conv2d(ConvMethod())
    engine = SSLTrainer("cpu", 1, [{"x": torch.randn(2, 4)}], method, torch.optim.SGD(method.parameters(), lr=0.1),
                        channels_last=True)
    assert engine.channels_last is False


def test_to_channels_last_recurses_and_leaves_other_tensors():
    batch = {"crops": [torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4, 4)], "label": torch.zeros(2, 3, 4, 4,
             dtype=torch.long), "modality": ["CT", "MR"], "pair": (torch.randn(1, 2, 3, 3),)}
    out = to_channels_last(batch)
    assert out["crops"][0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out["crops"][0], batch["crops"][0])
    assert out["crops"][1] is batch["crops"][1] and out["label"] is batch["label"]
    assert out["modality"] == ["CT", "MR"] and isinstance(out["pair"], tuple)
    assert out["pair"][0].is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------------ compile
def test_compile_falls_back_to_eager_when_torch_compile_raises(monkeypatch, caplog):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler for this platform\nsecond line")

    monkeypatch.setattr(torch, "compile", broken_compile)
    _, reference = train(ConvMethod())
    with caplog.at_level(logging.WARNING, logger=trainer_mod.__name__):
        engine, losses = train(ConvMethod(), compile=True)
    assert engine.compiled is False
    warnings = [r.getMessage() for r in caplog.records if "compile" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler for this platform" in warnings[0] and "eagerly" in warnings[0]
    assert "\n" not in warnings[0]
    assert losses == reference


def test_compile_falls_back_to_eager_when_the_compiled_forward_fails(monkeypatch, caplog):
    calls = []

    def lazy_failing_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls.append(1)
            raise RuntimeError("inductor: backend compiler failed")

        return compiled

    monkeypatch.setattr(torch, "compile", lazy_failing_compile)
    _, reference = train(ConvMethod())
    with caplog.at_level(logging.WARNING, logger=trainer_mod.__name__):
        engine, losses = train(ConvMethod(), compile="yes")
    assert engine.compiled is True  # installed; it failed at its first call and every call since ran eagerly
    assert len(calls) == 1
    warnings = [r.getMessage() for r in caplog.records if "compile" in r.getMessage()]
    assert len(warnings) == 1 and "backend compiler failed" in warnings[0]
    assert losses == reference


def test_compile_wraps_the_backbone_only_and_keeps_state_dict_keys(monkeypatch):
    compiled_fns = []

    def recording_compile(fn, **kwargs):
        compiled_fns.append((fn, kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    method = ConvMethod()
    keys = list(method.state_dict())
    engine, _ = train(method, compile=True, compile_kwargs={"mode": "reduce-overhead"})
    assert engine.compiled is True
    assert len(compiled_fns) == 1 and compiled_fns[0][1] == {"mode": "reduce-overhead"}
    assert compiled_fns[0][0].__self__ is method.backbone  # the backbone's bound forward, not the method's
    assert list(engine.method.state_dict()) == keys


def test_compile_backbone_with_the_real_compiler_matches_eager():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    x = torch.randn(5, 4)
    expected = module(x)
    assert compile_backbone(module, backend="eager") is True
    torch.testing.assert_close(module(x), expected)
    assert list(module.state_dict()) == ["0.weight", "0.bias"]


# ------------------------------------------------------------------------------------------------ views on the device
def seeded_views_loader(num_workers: int, n: int = 8, batch_size: int = 4):
    from monai.data import DataLoader
    from monai.transforms import Compose

    from medssl.data.pipeline import make_dataset
    from medssl.data.samplers import DistributedBatchSampler
    from medssl.transforms.batched import SampleSeedd

    g = torch.Generator().manual_seed(0)
    items = [{"image": torch.rand(1, 32, 32, generator=g), "modality": "XR"} for _ in range(n)]
    dataset = make_dataset(items, Compose([SampleSeedd()]))
    sampler = DistributedBatchSampler(n, batch_size, shuffle=True, seed=3, drop_last=True)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)


class CropsMethod(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.seen: list[list[torch.Tensor]] = []

    def forward(self, batch):
        self.seen.append([c.clone() for c in batch["crops"]])
        return {"loss": sum(self.backbone(c).pow(2).mean() for c in batch["crops"])}


def test_augment_on_device_trains_and_its_views_do_not_depend_on_workers():
    from medssl.engines.trainer import AugmentOnDevice
    from medssl.transforms.batched import BatchedMultiCrop, BatchedViewsCollate

    augment = BatchedMultiCrop(crops=[(2, 16), (2, 8)], flip_prob=0.5)
    seen = []
    for workers in (0, 2):
        method = CropsMethod()
        engine = SSLTrainer("cpu", 1, seeded_views_loader(workers), method,
                            torch.optim.SGD(method.parameters(), lr=0.1), prepare_batch=AugmentOnDevice(augment))
        engine.run()
        assert engine.state.iteration == 2 and [c.shape[-1] for c in method.seen[0]] == [16, 16, 8, 8]
        seen.append(method.seen)
    for a, b in zip(seen[0], seen[1]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the same views as made in the DataLoader workers by the collate function (CPU training)
    loader = seeded_views_loader(0)
    loader.collate_fn = BatchedViewsCollate(augment)
    loader.batch_sampler.set_epoch(0)
    first = next(iter(loader))
    assert all(torch.equal(x, y) for x, y in zip(first["crops"], seen[0][0]))


def test_sample_seed_is_a_function_of_the_sample_key():
    from medssl.data.samplers import SampleKey

    dataset = seeded_views_loader(0).dataset
    a = [dataset[SampleKey(i, 50 + i)]["seed"] for i in range(4)]
    assert a == [dataset[SampleKey(i, 50 + i)]["seed"] for i in range(4)]
    assert a != [dataset[SampleKey(i, 60 + i)]["seed"] for i in range(4)]


def test_compiled_forward_is_used_in_training_mode_only(monkeypatch):
    calls = []

    def recording_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls.append(1)
            return fn(*args, **kw)

        return compiled

    monkeypatch.setattr(torch, "compile", recording_compile)
    module = nn.Linear(3, 2)
    assert compile_backbone(module)
    module(torch.randn(1, 3))
    module.eval()
    module(torch.randn(4, 3))
    assert len(calls) == 1


@pytest.mark.parametrize("bundle", ["ssl_swav_multimodal_pretrain", "ssl_unimiss_pretrain",
                                    "ssl_joint_image_volume_pretrain", "ssl_medcoss_continual_pretrain"])
def test_pretraining_bundles_expose_channels_last_and_compile(bundle):
    """Each pretraining bundle's ``channels_last`` (null = on with CUDA) and ``compile`` keys reach its SSLTrainer, with
    the command line's strings read as the trainer reads them (``--compile true``, ``--channels_last none``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    assert parser["channels_last"] is None and parser["compile"] is False
    for given, expected in (("true", True), ("false", False)):
        parser["compile"] = given
        assert parser.get_parsed_content("train#trainer#compile") is expected
    for given, expected in (("none", None), ("auto", None), ("true", True), ("false", False), (None, None)):
        parser["channels_last"] = given
        value = parser.get_parsed_content("train#trainer#channels_last")
        assert trainer_mod._optional_bool(value, "channels_last") is expected
    with pytest.raises(ValueError, match="channels_last"):
        trainer_mod._optional_bool("sometimes", "channels_last")
