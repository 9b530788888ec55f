"""Build the offline lm-eval task ``nirvana_brown_cloze`` from the shipped Brown corpus.

Usage (no network; deterministic for a given seed)::

    python scripts/build_lm_eval_task.py            # writes nirvana_lightning/eval/tasks/*.jsonl

Each item is a sentence prefix (the previous sentence plus the first words of the current one)
and four continuations: the true rest of the sentence and three sentence endings of similar
length taken from three OTHER documents. The model scores each continuation by log-likelihood.

Test items come from the documents that ``NirvanaDataModule`` holds out for validation with its
defaults (``val_fraction=0.05``, ``split_seed=0``: 13 of the 254 documents of ``brown.jsonl``), so
recovery training on ``brown`` with those defaults never sees them. The few-shot examples
(``train`` split) come from training-side documents. Note that calibration and training with a
different split seed may see the test documents.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from nirvana_lightning.data.sources import BUILTIN_SOURCES, read_records
from nirvana_lightning.data.text import split_documents

TASK = "nirvana_brown_cloze"
OUT_DIR = Path(__file__).resolve().parents[1] / "nirvana_lightning" / "eval" / "tasks"
# The datamodule's defaults: keep in sync with NirvanaDataModule(val_fraction=..., split_seed=...).
VAL_FRACTION, SPLIT_SEED = 0.05, 0

_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=["(]?[A-Z])|(?<=[.!?]")\s+(?=["(]?[A-Z])')
_ABBREVIATION = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Gen|Gov|Sen|Rep|Rev|Prof|Col|Capt|Lt|No|Mt|Ft)|\b[A-Z])\.$")
_CLEAN = re.compile(r"^[A-Za-z0-9 ,.;:!?'\"()\-$%&]+$")


def split_sentences(text: str) -> list[str]:
    """Split running text into sentences (a heuristic that keeps "Mr. Smith" and "J. Smith" whole)."""
    sentences: list[str] = []
    for piece in _SENTENCE_END.split(text):
        piece = piece.strip()
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] += " " + piece
        elif piece:
            sentences.append(piece)
    return sentences


def candidates(doc: dict, rng: random.Random) -> list[dict]:
    """Every usable (prefix, continuation) cut of one document, one per sentence."""
    sentences = split_sentences(doc["text"])
    out = []
    for i in range(1, len(sentences)):
        prev, words = sentences[i - 1], sentences[i].split()
        if not (10 <= len(words) <= 30 and 6 <= len(prev.split()) <= 35):
            continue
        if not (_CLEAN.match(prev) and _CLEAN.match(sentences[i])) or "??" in prev + sentences[i]:
            continue
        cut = rng.randint(max(4, len(words) // 3), len(words) - 4)  # >= 4 words on each side
        out.append({"doc_id": doc["id"], "category": doc["category"],
                    "prefix": prev + " " + " ".join(words[:cut]), "ending": " ".join(words[cut:])})
    return out


def build_items(docs: list[dict], n_item: int, rng: random.Random, id_prefix: str) -> list[dict]:
    """``n_item`` four-way items drawn evenly from ``docs``, distractors from other documents."""
    pools = {d["id"]: candidates(d, rng) for d in docs}
    for pool in pools.values():
        rng.shuffle(pool)
    # round-robin over documents so every document (and genre) contributes evenly
    chosen, depth = [], 0
    while len(chosen) < n_item:
        layer = [pool[depth] for pool in pools.values() if depth < len(pool)]
        if not layer:
            raise ValueError(f"only {len(chosen)} usable sentences in {len(docs)} documents; asked for {n_item}")
        chosen += layer[: n_item - len(chosen)]
        depth += 1
    items = []
    for k, item in enumerate(chosen):
        n_word = len(item["ending"].split())
        others = [doc_id for doc_id in pools if doc_id != item["doc_id"]]
        rng.shuffle(others)
        distractors = []
        for doc_id in others:  # one ending per other document, the closest in length
            pool = [c["ending"] for c in pools[doc_id] if c["ending"] != item["ending"]]
            if pool:
                best = min(abs(len(e.split()) - n_word) for e in pool)
                distractors.append(rng.choice([e for e in pool if abs(len(e.split()) - n_word) == best]))
            if len(distractors) == 3:
                break
        label = rng.randrange(4)
        choices = distractors[:label] + [item["ending"]] + distractors[label:]
        items.append({"id": f"{id_prefix}-{k:03d}", "doc_id": item["doc_id"], "category": item["category"],
                      "prefix": item["prefix"], "choices": choices, "label": label})
    rng.shuffle(items)  # lm-eval's `limit` takes the first items: mix documents and genres
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--n-fewshot", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    records = read_records("brown")
    train_idx, val_idx = split_documents(len(records), VAL_FRACTION, SPLIT_SEED)
    rng = random.Random(args.seed)
    test = build_items([records[i] for i in val_idx], args.n_test, rng, "test")
    fewshot_docs = [records[i] for i in sorted(random.Random(args.seed).sample(train_idx, 8))]
    fewshot = build_items(fewshot_docs, args.n_fewshot, rng, "fewshot")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, items in (("test", test), ("fewshot", fewshot)):
        path = args.out_dir / f"{TASK}_{split}.jsonl"
        path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
        print(f"wrote {len(items)} items ({path.stat().st_size / 1024:.0f} KB) to {path}")
    print(f"source: {BUILTIN_SOURCES['brown']}; test documents: {', '.join(records[i]['id'] for i in val_idx)}")


if __name__ == "__main__":
    main()
