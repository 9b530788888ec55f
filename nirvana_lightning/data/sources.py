"""Where text comes from: shipped corpora, local files, Hugging Face datasets."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError

_CORPUS_DIR = Path(__file__).resolve().parent / "corpus"

#: Corpora shipped inside the package (see corpus/SOURCES.md for provenance and licence).
BUILTIN_SOURCES: dict[str, Path] = {
    "brown": _CORPUS_DIR / "brown.jsonl",
    "brown-alpaca": _CORPUS_DIR / "brown_alpaca.jsonl",
}
_SUFFIXES = (".txt", ".jsonl", ".json")


def validate_source_spec(spec: str, key: str) -> None:
    """Check a source spec without reading it: a builtin name, an existing file, or ``hf:<dataset>``."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(key, spec, "a non-empty string")
    if spec in BUILTIN_SOURCES or spec.startswith("hf:"):
        return
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(
            key, spec,
            f"an existing file ({', '.join(_SUFFIXES)}), a builtin corpus ({', '.join(BUILTIN_SOURCES)}) "
            "or 'hf:<dataset name or save_to_disk directory>'",
        )
    if path.suffix not in _SUFFIXES:
        raise ConfigError(key, spec, f"a file ending in one of {', '.join(_SUFFIXES)}")


def read_records(spec: str, *, hf_split: str = "train") -> list[dict]:
    """Read a source into a list of records (dicts).

    ``.txt`` files give one record ``{"text": ...}`` per blank-line-separated paragraph block
    (the whole file when it has no blank lines); ``.jsonl``/``.json`` give their objects;
    ``hf:<name>`` loads a Hugging Face dataset (a directory written by ``save_to_disk`` or a
    dataset name available offline) and gives its rows.
    """
    if spec.startswith("hf:"):
        import datasets

        name = spec[3:]
        ds = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name, split=hf_split)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[hf_split]
        return [dict(row) for row in ds]
    path = BUILTIN_SOURCES.get(spec) or Path(spec).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); a binary file?") from None
    if "\x00" in text:
        raise ValueError(f"{path}: holds NUL bytes; a binary file, not text")
    if path.suffix == ".txt":
        blocks = [b.strip() for b in text.split("\n\n")]
        records = [{"text": b} for b in blocks if b]
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path}: a .json source must hold a list of objects")
        records = data
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{number}: invalid JSON line ({err})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: each line must be a JSON object, got {type(record).__name__}")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no text (the file is empty or holds only whitespace)")
    return records
