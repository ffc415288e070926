"""medssl.text: WordPiece training on the demo report corpus, fixed-length encoding with the ids mlm_mask needs,
local tokenizer folders (ours, a HuggingFace tokenizer.json, a BERT vocab.txt), report reading with one-line errors,
and tools/train_tokenizer.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import TOOLS, subprocess_env

from medssl.data.reports import report_records, sentence_records
from medssl.losses import IGNORE_LABEL, mlm_mask
from medssl.text import (  # tokenizers is a dependency (pyproject.toml): no importorskip, a missing one fails here
    MAX_LENGTH,
    MEDSSL_FILE,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    TokenizeTextd,
    load_tokenizer,
    read_labelled_reports,
    read_report_records,
    read_reports,
    train_wordpiece,
)

# MedCoSS's text length (spec: Tokenizers, "max 112 tokens")
assert MAX_LENGTH == 112


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [r["text"] for r in report_records(0, per_class=(20, 4, 4))] + [
        r["text"] for r in sentence_records(0, abstracts=(12, 2, 2))
    ]


@pytest.fixture(scope="module")
def trained(corpus):
    return train_wordpiece(corpus, vocab_size=600, min_frequency=2)


def test_special_ids_and_vocab(trained):
    assert [trained.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (trained.pad_id, trained.unk_id, trained.cls_id, trained.sep_id, trained.mask_id) == (0, 1, 2, 3, 4)
    assert 100 < trained.vocab_size <= 600
    assert trained.mlm_kwargs() == {"vocab_size": trained.vocab_size, "mask_token_id": 4, "special_ids": (0, 2, 3, 4)}


def test_fixed_length_cls_sep_padding_and_round_trip(trained, corpus):
    texts = [corpus[0], "The lungs are CLEAR.", " ".join(corpus[:5])]
    batch = trained.encode(texts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (3, 112) and ids.dtype == mask.dtype == torch.int64
    assert (ids[:, 0] == trained.cls_id).all()
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # real tokens first, then padding
        assert row[n - 1] == trained.sep_id and (row[n:] == trained.pad_id).all()
        assert not ((row[1 : n - 1] == trained.cls_id) | (row[1 : n - 1] == trained.sep_id)).any()
    assert int(mask[2].sum()) == 112  # truncated: [CLS] + 110 pieces + [SEP]
    assert int(mask[1].sum()) == 2 + len(trained.tokenize("The lungs are CLEAR."))
    # lowercased, and a report of in-vocabulary words decodes back to its lowercased words
    assert trained.decode(ids[1]) == "the lungs are clear."
    words = "no pleural effusion. the lungs are clear."
    assert trained.decode(trained.encode([words])["input_ids"][0]) == words
    assert trained.encode(texts, return_tensors="list") == {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}
    with pytest.raises(TypeError):
        trained.encode("one string")


def test_mlm_mask_never_picks_special_tokens_or_padding(trained, corpus):
    batch = trained.encode(corpus[:8])
    inputs, labels = mlm_mask(
        batch["input_ids"], batch["attention_mask"], generator=torch.Generator().manual_seed(0), **trained.mlm_kwargs()
    )
    chosen = labels != IGNORE_LABEL
    assert chosen.any(dim=1).all()
    ids = batch["input_ids"]
    assert not chosen[(ids == trained.cls_id) | (ids == trained.sep_id) | (batch["attention_mask"] == 0)].any()
    assert (inputs[chosen] == trained.mask_id).float().mean() > 0.5
    assert int(inputs.max()) < trained.vocab_size


def test_training_is_deterministic(corpus, trained, tmp_path):
    again = train_wordpiece(corpus, vocab_size=600, min_frequency=2)
    assert again.tokenizer.to_str() == trained.tokenizer.to_str()


def test_save_and_load_our_folder(trained, corpus, tmp_path):
    folder = trained.save(tmp_path / "tok")
    info = json.loads((folder / MEDSSL_FILE).read_text())
    assert info["max_length"] == 112 and info["vocab_size"] == trained.vocab_size
    assert info["special_tokens"] == {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    loaded = load_tokenizer(folder)
    assert loaded.vocab_size == trained.vocab_size and loaded.max_length == 112
    a, b = trained.encode(corpus[:4]), loaded.encode(corpus[:4])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert load_tokenizer(folder, max_length=32).encode(corpus[:1])["input_ids"].shape == (1, 32)
    # a HuggingFace tokenizer.json alone, with its own padding / truncation settings: ignored, same ids
    hf = tmp_path / "hf"
    hf.mkdir()
    raw = json.loads((folder / TOKENIZER_FILE).read_text())
    raw["truncation"] = {"direction": "Right", "max_length": 7, "strategy": "LongestFirst", "stride": 0}
    (hf / TOKENIZER_FILE).write_text(json.dumps(raw))
    assert torch.equal(load_tokenizer(hf).encode(corpus[:4])["input_ids"], a["input_ids"])
    # a medssl file whose vocab_size disagrees with the tokenizer
    info["vocab_size"] += 1
    (folder / MEDSSL_FILE).write_text(json.dumps(info))
    with pytest.raises(ValueError, match="vocab_size"):
        load_tokenizer(folder)


def test_bert_vocab_txt_folder(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    tokens = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "lungs", "are", "clear", "pleural",
              "effusion", "no", ".", "##s", "nodule", ","]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    tok = load_tokenizer(folder)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4, 5)
    assert tok.vocab_size == len(tokens)
    ids = tok.encode(["No pleural Nodules, the lungs are CLEAR. Opacity"])["input_ids"][0]
    expected = [3, 12, 10, 15, 14, 16, 6, 7, 8, 9, 13, 2, 4]  # [CLS] no pleural nodule ##s , ... . [UNK] [SEP]
    assert ids[: len(expected)].tolist() == expected and (ids[len(expected) :] == 0).all()
    # cased when the folder's tokenizer_config.json says so
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert load_tokenizer(folder).encode(["No"])["input_ids"][0, 1] == 2  # "No" is not in the vocabulary


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message
    return message


def test_folder_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(tmp_path / "missing")
    assert str(tmp_path / "missing") in _one_line(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(empty)
    assert str(empty) in _one_line(e.value) and "tokenizer.json" in str(e.value) and "vocab.txt" in str(e.value)
    no_mask = tmp_path / "no_mask"
    no_mask.mkdir()
    (no_mask / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nlung\n")
    with pytest.raises(ValueError) as e:
        load_tokenizer(no_mask)
    assert "vocab.txt" in _one_line(e.value) and "[MASK]" in str(e.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError) as e:
        load_tokenizer(bad)
    assert str(bad / "tokenizer.json") in _one_line(e.value)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError) as e:
        load_tokenizer(a_file)
    assert str(a_file) in _one_line(e.value)


def test_read_reports_formats(tmp_path):
    (tmp_path / "r.txt").write_text("First report.\n\n  Second report.  \n")
    assert read_reports(tmp_path / "r.txt") == ["First report.", "Second report."]
    (tmp_path / "r.jsonl").write_text('{"text": "One.", "label": 2}\n\n{"text": "Two."}\n')
    assert read_reports(tmp_path / "r.jsonl") == ["One.", "Two."]
    assert read_report_records(tmp_path / "r.jsonl")[0] == {"text": "One.", "label": 2}
    (tmp_path / "r.csv").write_bytes('\ufeffid,text,label\n1,"Lungs clear, no effusion.",0\n2,Nodules.,1\n'.encode())
    assert read_reports(tmp_path / "r.csv") == ["Lungs clear, no effusion.", "Nodules."]
    assert read_report_records(tmp_path / "r.csv")[1] == {"id": "2", "text": "Nodules.", "label": "1"}
    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("Report b\nsecond line of b\n")
    (folder / "sub" / "a.txt").write_text("Report a")
    (folder / "ignored.md").write_text("not a report")
    assert read_reports(folder) == ["Report b\nsecond line of b", "Report a"]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.txt", b"\n\n", "no reports"),
        ("empty.csv", b"", "no reports"),
        ("cols.csv", b"id,report\n1,x\n", "no 'text' column"),
        ("cell.csv", b"id,text\n1,\n", "line 2 has an empty 'text'"),
        ("field.jsonl", b'{"report": "x"}\n', "line 1 has no 'text' field"),
        ("notjson.jsonl", b'{"text": "x"}\n{oops\n', "line 2 is not JSON"),
        ("latin1.txt", "Lungs clear\nPleural effusion \u00e9\n".encode("latin-1"), "not UTF-8"),
        ("report.docx", b"PK", "unsupported report file type '.docx'"),
    ],
)
def test_read_reports_errors_name_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_reports(path)
    assert _one_line(e.value).startswith(f"{path}: ") and expected in str(e.value)


def test_read_reports_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such report"):
        read_reports(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="no .txt files"):
        read_reports(tmp_path)
    (tmp_path / "a.txt").write_text("Report a")
    (tmp_path / "b.txt").write_text("  \n")
    with pytest.raises(ValueError) as e:
        read_reports(tmp_path)
    assert _one_line(e.value) == f"{tmp_path / 'b.txt'}: empty report"


def _tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOLS / "train_tokenizer.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )


def test_train_tokenizer_tool(tmp_path):
    reports = tmp_path / "reports.jsonl"
    reports.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in report_records(0, (10, 2, 2))))
    out = tmp_path / "tok"
    done = _tool("--reports", reports, "--out", out, "--vocab-size", 400, "--min-frequency", 1)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    vocab = load_tokenizer(out).vocab_size
    assert lines[0].startswith(f"read 42 reports from {reports}; WordPiece vocabulary of {vocab} tokens")
    assert str(out) in lines[0]
    # another process, the same reports: the same file (the merges are learned with a fixed tie-break)
    other = _tool("--reports", reports, "--out", tmp_path / "tok_b", "--vocab-size", 400, "--min-frequency", 1)
    assert other.returncode == 0, other.stderr
    assert (tmp_path / "tok_b" / TOKENIZER_FILE).read_bytes() == (out / TOKENIZER_FILE).read_bytes()
    again = _tool("--reports", reports, "--out", out)  # an existing tokenizer is kept without --force
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "--force" in again.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("id,report\n1,x\n")
    failed = _tool("--reports", bad, "--out", tmp_path / "tok2")
    assert failed.returncode == 2 and failed.stderr.startswith(f"error: {bad}: no 'text' column")
    assert not (tmp_path / "tok2").exists()
    into_file = _tool("--reports", reports, "--out", reports)
    assert into_file.returncode == 2 and into_file.stderr.startswith(f"error: {reports}: not a folder")
    helped = _tool("--help")
    text = (helped.stdout + helped.stderr).replace("--vocab_size", "--vocab-size")  # fire writes help to stderr
    assert helped.returncode == 0 and "--vocab-size" in text and "--min-frequency" in text.replace("_", "-")


def test_read_labelled_reports(tmp_path):
    names = tmp_path / "names.csv"
    names.write_text(
        "text,label\nWe aimed to assess CT.,objective\nSensitivity was 90%.,results\nCT is common.,background\n"
    )
    records, classes = read_labelled_reports(names)
    assert classes == ["background", "objective", "results"] and [r["label"] for r in records] == [1, 2, 0]
    records, classes = read_labelled_reports(names, classes=["background", "objective", "methods", "results"])
    assert [r["label"] for r in records] == [1, 3, 0]
    indices = tmp_path / "indices.jsonl"
    indices.write_text('{"text": "a", "label": 2}\n{"text": "b", "label": "0"}\n')
    records, classes = read_labelled_reports(indices)
    assert classes == ["0", "1", "2"] and [r["label"] for r in records] == [2, 0]
    for content, expected in (
        ('{"text": "a"}\n', "report 1 has no 'label'"),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": 1}\n', "mix class names and class indices"),
        ('{"text": "a", "label": 1.5}\n', "use a class name or a class index"),
    ):
        indices.write_text(content)
        with pytest.raises(ValueError) as e:
            read_labelled_reports(indices)
        assert _one_line(e.value).startswith(f"{indices}: ") and expected in str(e.value)
    with pytest.raises(ValueError, match="report 2 has label 'results', not one of background, objective"):
        read_labelled_reports(names, classes=["background", "objective"])
    indices.write_text('{"text": "a", "label": 3}\n')
    with pytest.raises(ValueError, match=r"label 3, outside 0..1"):
        read_labelled_reports(indices, classes=["a", "b"])


def test_tokenize_transform_pickles_and_collates(trained, corpus, tmp_path):
    import pickle

    folder = trained.save(tmp_path / "tok")
    transform = TokenizeTextd(str(folder))
    item = transform({"text": corpus[0], "label": 1})
    assert item["input_ids"].shape == item["attention_mask"].shape == (112,) and item["label"] == 1
    assert torch.equal(item["input_ids"], trained.encode([corpus[0]])["input_ids"][0])
    clone = pickle.loads(pickle.dumps(transform))
    assert clone._tokenizer is None and torch.equal(clone({"text": corpus[0]})["input_ids"], item["input_ids"])
    short = TokenizeTextd(trained, max_length=16, drop_text=True)({"text": corpus[0]})
    assert short["input_ids"].shape == (16,) and "text" not in short and trained.max_length == 112
    batch = torch.utils.data.default_collate([transform({"text": t}) for t in corpus[:3]])
    assert batch["input_ids"].shape == (3, 112)
    with pytest.raises(KeyError, match="no 'text' field"):
        transform({"report": "x"})


def test_encoded_reports_train_the_medcoss_text_path(trained, corpus):
    """The tokenizer's output fits MultiModalViT's text tokenizer and the MLM objective (a tiny model)."""
    from medssl.losses import mlm_loss
    from medssl.networks import MLMHead, MultiModalViT

    torch.manual_seed(0)
    model = MultiModalViT(vocab_size=trained.vocab_size, dim=32, depth=1, heads=2, drop_path_rate=0.0,
                          img_size_2d=16, patch_2d=16, img_size_3d=16, patch_3d=16)
    head = MLMHead(32, trained.vocab_size)
    batch = trained.encode(corpus[:4])
    g = torch.Generator().manual_seed(0)
    inputs, labels = mlm_mask(batch["input_ids"], batch["attention_mask"], generator=g, **trained.mlm_kwargs())
    feats = model(inputs, "text", attention_mask=batch["attention_mask"])
    assert feats.shape == (4, 112, 32)
    loss = mlm_loss(head(feats), labels)
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(float(trained.vocab_size)))) < 1.5
