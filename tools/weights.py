"""Published encoders by name: list the weights catalogue, fetch (download, check, convert, cache) an entry.

Usage:
    python tools/weights.py list [--catalogue FILE] [--cache_dir DIR]
    python tools/weights.py fetch NAME [--cache_dir DIR] [--sha256 HEX] [--catalogue FILE] [--force]

Subcommands:
    list    one line per entry of ``common/medssl/weights/catalogue.json``: name, family, architecture, licence and
            whether it is cached.
    fetch   downloads NAME's checkpoint from its official URL, checks its sha256, converts it with the family's
            converter (``tools/convert_weights.py``) and caches ``<cache>/catalogue/NAME/encoder.pt`` + ``encoder.json``
            (a second fetch reuses them); prints the encoder path. Any downstream bundle then takes
            ``--pretrained_path NAME`` (or that path).

The authors publish no sha256 for these files: the first fetch prints the hash it computed and records it in
``<cache>/catalogue/NAME/source.sha256`` (a warning says it was not checked against a published hash); a later
download must match it. ``--sha256 HEX`` pins the hash (a mismatch is a one-line error naming the URL and both
hashes; the file is deleted). ``<cache>`` is ``--cache_dir``, else ``$MEDSSL_CACHE/weights``, else
``~/.cache/medssl/weights``; the catalogue is ``--catalogue``, else ``$MEDSSL_WEIGHTS_CATALOGUE``, else the shipped one.
Without internet a fetch fails with one line naming the URL.
"""

from __future__ import annotations

import json

from medssl.cli import run


def list_encoders(catalogue: str | None = None, cache_dir: str | None = None) -> None:
    """Print the catalogue: name, family, architecture, licence, cached or not.

    Args:
        catalogue: a catalogue JSON file (default: $MEDSSL_WEIGHTS_CATALOGUE, else the shipped one).
        cache_dir: the weights cache to look in (default: $MEDSSL_CACHE/weights or ~/.cache/medssl/weights).
    """
    from medssl.weights.catalogue import cached_encoder, catalogue_path, load_catalogue

    entries = load_catalogue(catalogue)
    rows = [("name", "family", "arch", "licence", "cached")]
    for name, entry in entries.items():
        cached = "yes" if cached_encoder(name, cache_dir).is_file() else ("by hand" if entry["url"] is None else "no")
        rows.append((name, entry["family"], str(entry.get("arch", "")), str(entry["licence"]), cached))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"({len(entries)} encoders in {catalogue_path(catalogue)}; `python tools/weights.py fetch NAME`, or "
          "--pretrained_path NAME in a downstream bundle)")


def fetch(
    name: str,
    cache_dir: str | None = None,
    sha256: str | int | None = None,
    catalogue: str | None = None,
    force: bool = False,
) -> None:
    """Download, check, convert and cache a catalogue entry; print the encoder file's path.

    Args:
        name: the entry's name (`python tools/weights.py list`).
        cache_dir: the weights cache (default: $MEDSSL_CACHE/weights or ~/.cache/medssl/weights).
        sha256: the expected sha256 of the downloaded checkpoint (default: the catalogue's, else the one recorded by
            the first fetch).
        catalogue: a catalogue JSON file (default: $MEDSSL_WEIGHTS_CATALOGUE, else the shipped one).
        force: download and convert again even when cached.
    """
    from medssl.weights.catalogue import fetch_encoder

    encoder = fetch_encoder(str(name), cache_dir=cache_dir, sha256=sha256, catalogue=catalogue, force=force)
    record = json.loads(encoder.with_suffix(".json").read_text(encoding="utf-8")).get("catalogue") or {}
    print(f"{name}: source sha256 {record.get('source_sha256')}; licence {record.get('licence')}")
    print(encoder)


COMMANDS = {"list": list_encoders, "fetch": fetch}


def main(argv: list[str] | None = None) -> None:
    run(COMMANDS, argv, name="weights")


if __name__ == "__main__":
    main()
