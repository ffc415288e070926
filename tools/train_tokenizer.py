"""Train a WordPiece vocabulary on your own reports (offline, no model hub) and save it as a tokenizer folder.

Usage:
    python tools/train_tokenizer.py --reports FILE|DIR --out DIR [--vocab-size 30522] [--min-frequency 2] \\
        [--max-length 112] [--cased] [--force]

--reports: a .txt file (one report per line), a .jsonl file (a "text" field per line), a .csv file (a "text"
column) or a folder of .txt files (one report per file, read recursively). Files must be UTF-8.

Writes DIR/tokenizer.json (HuggingFace ``tokenizers`` format) and DIR/medssl_tokenizer.json (max_length, the
vocabulary size, the special-token ids) and prints one line: reports read, vocabulary size, output folder. BERT's
special tokens [PAD] [UNK] [CLS] [SEP] [MASK] take ids 0-4; text is lowercased (and accents stripped) unless
--cased. The vocabulary holds at most --vocab-size entries (unless the corpus has more distinct characters, which
are all kept): a small corpus gives fewer, and the model's ``vocab_size`` must be the size printed (also in
medssl_tokenizer.json). Load the folder with ``medssl.text.load_tokenizer(DIR)``, which also reads a HuggingFace
tokenizer.json or a BERT vocab.txt folder. The same reports give the same vocabulary and ids on every run. An
existing tokenizer in DIR is kept unless --force. Bad input is one line ``error: PATH: ...`` with exit status 2.
"""

from __future__ import annotations

import time
from pathlib import Path

from medssl.cli import run
from medssl.text import MAX_LENGTH, MEDSSL_FILE, TOKENIZER_FILE, read_reports, train_wordpiece


def main(
    reports: str,
    out: str,
    vocab_size: int = 30522,
    min_frequency: int = 2,
    max_length: int = MAX_LENGTH,
    cased: bool = False,
    force: bool = False,
) -> None:
    """Train a WordPiece vocabulary on ``reports`` and save it in ``out`` (see the module docstring).

    Args:
        reports: a .txt (one report a line), .jsonl ("text" field) or .csv ("text" column) file, or a folder of
            .txt files (one report each).
        out: the tokenizer folder to write (created if needed).
        vocab_size: the most entries the vocabulary may have, special tokens included (BERT: 30522).
        min_frequency: pieces seen fewer times are left out.
        max_length: tokens per encoded text, [CLS] and [SEP] included (MedCoSS: 112).
        cased: keep upper case and accents (default: lowercase, as uncased BERT).
        force: overwrite a tokenizer already in ``out``.
    """
    started = time.perf_counter()
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder; --out names the tokenizer folder to write")
    if (folder / TOKENIZER_FILE).exists() and not force:
        raise FileExistsError(f"{folder}: already holds {TOKENIZER_FILE}; pass --force to overwrite it")
    texts = read_reports(reports)
    tokenizer = train_wordpiece(
        texts, vocab_size=vocab_size, min_frequency=min_frequency, max_length=max_length, lowercase=not cased
    )
    tokenizer.save(folder)
    print(
        f"read {len(texts)} reports from {reports}; WordPiece vocabulary of {tokenizer.vocab_size} tokens "
        f"(requested at most {int(vocab_size)}, max_length {tokenizer.max_length}) -> {folder} "
        f"({TOKENIZER_FILE}, {MEDSSL_FILE}) in {time.perf_counter() - started:.1f} s",
        flush=True,
    )


if __name__ == "__main__":
    run(main)
