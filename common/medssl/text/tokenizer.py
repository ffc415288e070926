"""Report text to fixed-length token ids without a model hub: a WordPiece vocabulary trained on local reports with
HuggingFace's ``tokenizers`` package, or a local tokenizer folder.

- :func:`train_wordpiece`: BERT-style WordPiece (``BertNormalizer`` with lowercasing and accent stripping, BERT's
  pre-tokenizer: whitespace and punctuation splits) trained on a list of strings, deterministically (the same text
  gives the same ids; see the function for why the merges are not left to ``tokenizers``' own trainer); the special
  tokens :data:`SPECIAL_TOKENS` take the first ids, ``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4.
- :func:`load_tokenizer`: a folder holding one of

  1. ``tokenizer.json`` + ``medssl_tokenizer.json`` (what :meth:`TextTokenizer.save` and ``tools/train_tokenizer.py``
     write; the latter records ``max_length`` and ``vocab_size``);
  2. a HuggingFace ``tokenizer.json`` alone (e.g. a BERT checkpoint's folder);
  3. a BERT ``vocab.txt`` (one token per line, id = line number), lowercased unless the folder's
     ``tokenizer_config.json`` says ``"do_lower_case": false``.

  Every vocabulary must hold the five BERT special tokens; the ids are looked up, not assumed.
- :meth:`TextTokenizer.encode`: a list of strings -> ``{"input_ids", "attention_mask"}``, int64 tensors (B, 112):
  ``[CLS] tokens [SEP]`` then ``[PAD]``; a longer text keeps its first 110 tokens. ``attention_mask`` is 1 on
  ``[CLS]``, the tokens and ``[SEP]``, 0 on padding. The special tokens are added here, not by the folder's own
  post-processor, padding or truncation settings (which are ignored), so all three folder kinds encode alike.
- :meth:`TextTokenizer.mlm_kwargs`: ``vocab_size``, ``mask_token_id`` and ``special_ids`` ([PAD], [CLS], [SEP],
  [MASK]) for :func:`medssl.losses.mlm_mask`: ``mlm_mask(ids, attention_mask, **tok.mlm_kwargs(), generator=g)``.
  ``[UNK]`` stays a possible target, as in BERT.

The vocabulary size a model needs (``MultiModalViT(vocab_size=...)``) is :attr:`TextTokenizer.vocab_size`: the
trained size, which is at most the requested one (a small corpus has fewer distinct pieces).
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_LENGTH",
    "SPECIAL_TOKENS",
    "PAD",
    "UNK",
    "CLS",
    "SEP",
    "MASK",
    "TOKENIZER_FILE",
    "MEDSSL_FILE",
    "VOCAB_FILE",
    "TextTokenizer",
    "train_wordpiece",
    "load_tokenizer",
]

#: MedCoSS's text length: [CLS] + up to 110 tokens + [SEP], padded.
MAX_LENGTH = 112
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
#: BERT's special tokens, in the order of their ids in a vocabulary trained here (0-4).
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
TOKENIZER_FILE = "tokenizer.json"
MEDSSL_FILE = "medssl_tokenizer.json"
VOCAB_FILE = "vocab.txt"
_FORMAT = "medssl-tokenizer"


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as error:  # a one-line user error through medssl.cli
        raise ImportError(
            "medssl.text needs the 'tokenizers' package (HuggingFace): pip install tokenizers"
        ) from error
    return tokenizers


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with BERT's special tokens and a fixed output length (see the module docstring).

    Attributes: ``tokenizer`` (the wrapped ``tokenizers.Tokenizer``), ``max_length``, ``vocab_size``, ``pad_id``,
    ``unk_id``, ``cls_id``, ``sep_id``, ``mask_id``, ``source`` (the folder it was loaded from, or None)."""

    def __init__(self, tokenizer: Any, max_length: int = MAX_LENGTH, source: str | None = None) -> None:
        if int(max_length) < 3:
            raise ValueError(f"TextTokenizer: max_length must be at least 3 ([CLS] token [SEP]), got {max_length}")
        where = source or "the tokenizer"
        ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{where}: the vocabulary has no {', '.join(missing)} (BERT's special tokens are needed)")
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.source = source
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (int(ids[t]) for t in SPECIAL_TOKENS)
        # the embedding rows a model needs: the largest id + 1 (a vocab.txt with blank lines leaves gaps)
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids that masked language modelling never chooses: [PAD], [CLS], [SEP], [MASK]."""
        return (self.pad_id, self.cls_id, self.sep_id, self.mask_id)

    def mlm_kwargs(self) -> dict[str, Any]:
        """``vocab_size``, ``mask_token_id`` and ``special_ids`` for :func:`medssl.losses.mlm_mask`."""
        return {"vocab_size": self.vocab_size, "mask_token_id": self.mask_id, "special_ids": self.special_ids}

    def tokenize(self, text: str) -> list[str]:
        """The word pieces of ``text`` (no special tokens, no truncation)."""
        return list(self.tokenizer.encode(str(text), add_special_tokens=False).tokens)

    def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Unpadded ids ``[CLS] ... [SEP]`` of each text, truncated to ``max_length``."""
        if isinstance(texts, str):
            raise TypeError("TextTokenizer.encode: pass a list of strings, not one string")
        body = self.max_length - 2
        # one text at a time: encode_batch's thread pool makes tokenizers warn and turn parallelism off in every
        # forked DataLoader worker; reports are short, the loop costs little
        encodings = [self.tokenizer.encode(str(t), add_special_tokens=False) for t in texts]
        return [[self.cls_id, *e.ids[:body], self.sep_id] for e in encodings]

    def encode(self, texts: Sequence[str], return_tensors: str = "pt") -> dict[str, Any]:
        """``{"input_ids", "attention_mask"}`` of shape (len(texts), max_length): torch int64 tensors
        (``return_tensors="pt"``) or lists of lists (``"list"``)."""
        rows = self.encode_ids(texts)
        ids = [row + [self.pad_id] * (self.max_length - len(row)) for row in rows]
        mask = [[1] * len(row) + [0] * (self.max_length - len(row)) for row in rows]
        if return_tensors == "list":
            return {"input_ids": ids, "attention_mask": mask}
        if return_tensors != "pt":
            raise ValueError(f"TextTokenizer.encode: return_tensors must be 'pt' or 'list', got {return_tensors!r}")
        import torch

        shape = (len(ids), self.max_length)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.int64).reshape(shape),
            "attention_mask": torch.tensor(mask, dtype=torch.int64).reshape(shape),
        }

    __call__ = encode

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` (a list or a 1-D tensor); special tokens and padding left out by default."""
        values = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        return self.tokenizer.decode(values, skip_special_tokens=skip_special_tokens)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and ``medssl_tokenizer.json`` into ``folder`` (created); returns the folder."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out / TOKENIZER_FILE), pretty=True)
        info = {
            "format": _FORMAT,
            "version": 1,
            "max_length": self.max_length,
            "vocab_size": self.vocab_size,
            "special_tokens": {token: getattr(self, f"{name}_id") for token, name in zip(SPECIAL_TOKENS, _NAMES)},
            "model": "WordPiece",
            "lowercase": _lowercases(self.tokenizer),
            "note": "medssl.text.load_tokenizer(folder); input ids [CLS] ... [SEP] + [PAD] to max_length",
        }
        (out / MEDSSL_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        return out

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, source={self.source!r})"


_NAMES = ("pad", "unk", "cls", "sep", "mask")


def _lowercases(tokenizer: Any) -> bool | None:
    try:
        normalizer = json.loads(tokenizer.to_str()).get("normalizer") or {}
    except ValueError:
        return None
    return normalizer.get("lowercase")


def _bert_pipeline(tokenizer: Any, lowercase: bool) -> None:
    tk = _import_tokenizers()
    tokenizer.normalizer = tk.normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tokenizer.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = tk.decoders.WordPiece(prefix="##")


def _learn_pieces(
    word_counts: dict[str, int], vocab_size: int, min_frequency: int, prefix: str = "##"
) -> list[str]:
    """WordPiece vocabulary learning as ``tokenizers``' ``WordPieceTrainer`` does it (BPE merges over words split
    into a first character and ``##``-continuations), with a deterministic tie-break: the most frequent pair, then
    the alphabetically first. Returns the pieces in the order they were learned (alphabet first)."""
    alphabet = sorted({ch for word in word_counts for ch in word})
    pieces = list(dict.fromkeys([*alphabet, *(prefix + ch for ch in alphabet)]))
    known = set(pieces)
    words = [[w[0], *(prefix + ch for ch in w[1:])] for w in sorted(word_counts)]
    counts = [word_counts[w] for w in sorted(word_counts)]
    pair_counts: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + counts[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    budget = vocab_size - len(SPECIAL_TOKENS)
    while heap and len(pieces) < budget:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative:
            continue  # stale entry: the count changed after it was pushed
        if -negative < min_frequency:
            break
        a, b = pair
        merged = a + b[len(prefix):]
        if merged not in known:
            known.add(merged)
            pieces.append(merged)
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            old = words[i]
            if not any(x == a and y == b for x, y in zip(old, old[1:])):
                continue
            new, j = [], 0
            while j < len(old):
                if j + 1 < len(old) and old[j] == a and old[j + 1] == b:
                    new.append(merged)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            for p in zip(old, old[1:]):
                pair_counts[p] -= counts[i]
                changed.add(p)
            for p in zip(new, new[1:]):
                pair_counts[p] = pair_counts.get(p, 0) + counts[i]
                where.setdefault(p, set()).add(i)
                changed.add(p)
            words[i] = new
        pair_counts.pop(pair, None)
        for p in sorted(changed):
            c = pair_counts.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            elif p in pair_counts:
                del pair_counts[p]
    return pieces


def train_wordpiece(
    texts: Iterable[str],
    vocab_size: int = 30522,
    min_frequency: int = 2,
    max_length: int = MAX_LENGTH,
    lowercase: bool = True,
) -> TextTokenizer:
    """A BERT-style WordPiece vocabulary of at most ``vocab_size`` entries (special tokens included) learned from
    ``texts``; pairs seen fewer than ``min_frequency`` times are not merged. Every character of the corpus is in the
    vocabulary, word-initial and as a ``##`` continuation (as in BERT's), however rare.

    Text is normalised and split into words by ``tokenizers``' BERT normaliser and pre-tokenizer, and the result is a
    ``tokenizers`` WordPiece model (greedy longest-match-first encoding). The merges themselves are learned here,
    with the algorithm of ``tokenizers.trainers.WordPieceTrainer`` but a fixed tie-break: that trainer can give a
    different vocabulary from run to run on the same text (huggingface/tokenizers issue #1794: ids follow hash-map
    order and break ties between equally frequent pairs), and the same reports must give the same ids."""
    if int(vocab_size) <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"train_wordpiece: vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}"
        )
    if int(min_frequency) < 1:
        raise ValueError(f"train_wordpiece: min_frequency must be at least 1, got {min_frequency}")
    tk = _import_tokenizers()
    tokenizer = tk.Tokenizer(tk.models.WordPiece({UNK: 0}, unk_token=UNK))
    _bert_pipeline(tokenizer, lowercase)
    word_counts: dict[str, int] = {}
    for text in texts:
        normalized = tokenizer.normalizer.normalize_str(str(text))
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized):
            word_counts[word] = word_counts.get(word, 0) + 1
    if not word_counts:
        raise ValueError("train_wordpiece: no text to learn a vocabulary from")
    pieces = _learn_pieces(word_counts, int(vocab_size), int(min_frequency))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *pieces])}
    tokenizer = tk.Tokenizer(tk.models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##"))
    _bert_pipeline(tokenizer, lowercase)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return TextTokenizer(tokenizer, max_length=max_length)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON (line {error.lineno}: {error.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def load_tokenizer(folder: str | os.PathLike, max_length: int | None = None) -> TextTokenizer:
    """The tokenizer of a local folder (see the module docstring for the three layouts).

    ``max_length``: the fixed output length; default the folder's ``medssl_tokenizer.json`` value, else 112.

    Raises:
        FileNotFoundError / NotADirectoryError / ValueError: one line naming the folder and what is missing or wrong.
    """
    path = Path(folder)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such tokenizer folder")
    if not path.is_dir():
        raise NotADirectoryError(
            f"{path}: not a folder; pass the tokenizer folder (with {TOKENIZER_FILE} or {VOCAB_FILE})"
        )
    tk = _import_tokenizers()
    info = _read_json(path / MEDSSL_FILE) if (path / MEDSSL_FILE).is_file() else {}
    length = int(max_length if max_length is not None else info.get("max_length", MAX_LENGTH))
    if (path / TOKENIZER_FILE).is_file():
        file = path / TOKENIZER_FILE
        try:
            tokenizer = tk.Tokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises a bare Exception for a bad file
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{file}: not a HuggingFace tokenizer file ({message})") from None
    elif (path / VOCAB_FILE).is_file():
        file = path / VOCAB_FILE
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise ValueError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        vocab: dict[str, int] = {}
        for index, token in enumerate(lines):  # id = line number, as BERT's vocab.txt
            if token:
                vocab.setdefault(token, index)
        if not vocab:
            raise ValueError(f"{file}: empty vocabulary")
        config = path / "tokenizer_config.json"
        lowercase = bool(_read_json(config).get("do_lower_case", True)) if config.is_file() else True
        tokenizer = tk.Tokenizer(tk.models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##"))
        _bert_pipeline(tokenizer, lowercase)
        tokenizer.add_special_tokens([t for t in SPECIAL_TOKENS if t in vocab])
    else:
        raise FileNotFoundError(
            f"{path}: no {TOKENIZER_FILE} or {VOCAB_FILE} in the tokenizer folder "
            f"(train one with tools/train_tokenizer.py --reports FILE --out {path})"
        )
    result = TextTokenizer(tokenizer, max_length=length, source=str(file))
    expected = info.get("vocab_size")
    if expected is not None and int(expected) != result.vocab_size:
        raise ValueError(
            f"{path / MEDSSL_FILE}: vocab_size {expected} but {file.name} holds {result.vocab_size} entries"
        )
    return result
