"""report_classification (issue #15 item 6, the 1D task): labelled text from a JSON datalist or a CSV / JSONL file, the
packed text input, a MedCoSS stage's encoder loading into the classifier with every tensor, and the trained network's
inference on sentences (the smoke / two-process / verify_net_in_out runs are in test_bundle_runs.py)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import BUNDLES, run_bundle_in_process

BUNDLE = BUNDLES / "report_classification"
ROLES = ["background", "objective", "methods", "results", "conclusions"]


def test_labelled_text_from_a_datalist_a_csv_and_a_jsonl(demo_datalist, tmp_path):
    from medssl.data.medcoss import labelled_text_items

    items = labelled_text_items(str(demo_datalist.parent / "datalist_sentences.json"), "validation", ROLES)
    assert len(items) == 300 and {it["label"] for it in items} == set(range(5)) and all(it["text"] for it in items)
    rows = [("The scans were read twice.", "methods"), ("Accuracy was 91 %.", "results")]
    with (tmp_path / "s.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": t, "label": c}) + "\n" for t, c in rows))
    for name in ("s.csv", "s.jsonl"):
        got = labelled_text_items(str(tmp_path / name), "training", ROLES)
        assert [it["label"] for it in got] == [2, 3], name
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x", "label": "diagnosis"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl"):
        labelled_text_items(str(tmp_path / "bad.jsonl"), "training", ROLES)
    with pytest.raises(FileNotFoundError, match="no such file"):
        labelled_text_items(str(tmp_path / "missing.csv"))


def test_medcoss_stage_encoder_loads_into_the_classifier(tmp_path):
    from medssl.data.medcoss import PackTextd, text_tokenizer
    from medssl.downstream import prepare_network
    from medssl.networks import MultiModalClassifier, MultiModalViT, MultiModalViTEmbedder

    tok = text_tokenizer(None, ["no pleural effusion", "a rounded opacity in the left lung"] * 5, 60, 1, 16)
    cfg = dict(vocab_size=tok.vocab_size, dim=32, depth=2, heads=2, text_len=16, img_size_2d=32, patch_2d=8,
               img_size_3d=(16, 16, 8), patch_3d=8)
    pretrained = MultiModalViT(**cfg)
    torch.save({"state_dict": pretrained.state_dict(), "stage": "1_reports", "kind": "text", "config": cfg},
               tmp_path / "encoder.pt")
    net = MultiModalClassifier(MultiModalViTEmbedder("text", **cfg), 5)
    # only the text path trains: DistributedDataParallel would find the image tokenizers and the class token unused
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("encoder.tokenizers.2d.", "encoder.tokenizers.3d.", "encoder.cls_token"))
                   for n in trainable)
    assert any(n.startswith("encoder.tokenizers.text.") for n in trainable)
    net = prepare_network(net, str(tmp_path / "encoder.pt"), finetune_mode="finetune")
    mine = net.encoder.state_dict()
    assert mine.keys() == pretrained.state_dict().keys()
    assert all(torch.equal(mine[k], v) for k, v in pretrained.state_dict().items())
    enc = tok.encode(["no effusion"])
    x = PackTextd()({"input_ids": enc["input_ids"][0], "attention_mask": enc["attention_mask"][0], "label": 0})["image"]
    assert x.shape == (2, 16) and x.dtype == torch.int64
    net.eval()
    logits = net(x[None])
    assert logits.shape == (1, 5)
    # what sits in the padding does not change the prediction: attention and the mean skip it
    other = x.clone()
    other[0, x[1] == 0] = 7
    assert torch.allclose(net(other[None]), logits, atol=1e-6)
    with pytest.raises(ValueError, match="packed"):
        net(torch.zeros(1, 16, dtype=torch.long))


def test_trained_network_evaluates_and_classifies_sentences_from_a_text_file(demo_datalist, tmp_path):
    """train -> evaluate -> inference through monai.bundle.run, in this process (the generic smoke run,
    test_bundle_runs.py, runs train.json as a command)."""
    data = str(demo_datalist.parent)  # the bundle's own datalist (datalist_sentences.json) in the demo folder
    run_bundle_in_process(BUNDLE, ["train.json", "smoke.json"], out=tmp_path / "run", dataset_dir=data)
    models = tmp_path / "run" / "models"
    assert (models / "model.pt").is_file() and (models / "tokenizer" / "tokenizer.json").is_file()
    run_bundle_in_process(BUNDLE, ["train.json", "smoke.json", "evaluate.json"], model_path=str(models / "model.pt"),
                          output_dir=str(tmp_path / "test"), dataset_dir=data)
    summary = json.loads((tmp_path / "test" / "eval" / "metrics_summary.json").read_text())
    assert summary["num_cases"] == 300 and 0.0 <= summary["accuracy"] <= 1.0 and "f1_macro" in summary
    (tmp_path / "mine.txt").write_text("Patients were scanned twice.\nThe method is accurate.\n")
    run_bundle_in_process(BUNDLE, ["inference.json", "smoke.json"], input=str(tmp_path / "mine.txt"),
                          model_path=str(models / "model.pt"), tokenizer_dir=str(models / "tokenizer"),
                          output_dir=str(tmp_path / "eval"), dataset_dir=data)
    rows = list(csv.DictReader((tmp_path / "eval" / "probabilities.csv").open()))
    assert [r["case"] for r in rows] == ["mine_00000", "mine_00001"]
    assert all(r["predicted"] in ROLES for r in rows)
