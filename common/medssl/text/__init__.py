"""Report text for MedCoSS's 1D path, without a model hub.

- :mod:`medssl.text.tokenizer`: a WordPiece vocabulary trained on local reports (HuggingFace ``tokenizers``), or a
  local tokenizer folder (ours, a HuggingFace ``tokenizer.json``, a BERT ``vocab.txt``); fixed-length encoding
  ``[CLS] ... [SEP] [PAD]...`` of 112 tokens with the ids :func:`medssl.losses.mlm_mask` needs.
- :mod:`medssl.text.reports`: reading reports from a ``.txt`` (one a line), ``.jsonl`` (a ``"text"`` field),
  ``.csv`` (a ``text`` column) or a folder of ``.txt`` files (one report each), with one-line errors; labelled
  reports / sentences (a ``label`` of names or indices) for classification.
- :mod:`medssl.text.transforms`: :class:`TokenizeTextd`, the dictionary transform that adds ``input_ids`` /
  ``attention_mask`` to an item's ``text`` in a bundle's pipeline.

``tools/train_tokenizer.py`` trains and saves a vocabulary from the command line. Importing this package does not
import ``tokenizers`` or torch; the functions that need them do.
"""

from .reports import REPORT_SUFFIXES, read_labelled_reports, read_report_records, read_reports
from .tokenizer import (
    CLS,
    MASK,
    MAX_LENGTH,
    MEDSSL_FILE,
    PAD,
    SEP,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    UNK,
    VOCAB_FILE,
    TextTokenizer,
    load_tokenizer,
    train_wordpiece,
)
from .transforms import TokenizeTextd, pack_text

__all__ = [
    "CLS",
    "MASK",
    "MAX_LENGTH",
    "MEDSSL_FILE",
    "PAD",
    "SEP",
    "SPECIAL_TOKENS",
    "TOKENIZER_FILE",
    "UNK",
    "VOCAB_FILE",
    "REPORT_SUFFIXES",
    "TextTokenizer",
    "load_tokenizer",
    "train_wordpiece",
    "read_reports",
    "read_report_records",
    "read_labelled_reports",
    "pack_text",
    "TokenizeTextd",
]
