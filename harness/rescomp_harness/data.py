"""Documents, calibration/evaluation splits, and tokenized calibration sets.

Calibration text must never overlap evaluation text, whatever the seed: documents are
assigned to a side by a hash of their id alone (:func:`split_documents`), and the seed only
chooses *which* calibration documents feed the calibration windows.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rescomp_harness.assets import AssetUnavailable, Document, brown_documents, sotu_documents

__all__ = [
    "Document",
    "DocumentSplit",
    "EVALUATION_FRACTION",
    "is_evaluation_document",
    "split_documents",
    "calibration_dataset",
    "load_documents",
]

EVALUATION_FRACTION = 0.2


@dataclass(frozen=True)
class DocumentSplit:
    calibration: list[Document]
    evaluation: list[Document]


def is_evaluation_document(document_id: str, evaluation_fraction: float = EVALUATION_FRACTION) -> bool:
    """Whether a document belongs to the held-out side: the first 8 bytes of
    sha256(id) as a fraction in [0, 1) fall below ``evaluation_fraction``. Stable across
    runs, machines and Python versions (unlike ``hash``), and independent of any seed."""
    position = int.from_bytes(hashlib.sha256(document_id.encode("utf-8")).digest()[:8], "big")
    return position / 2**64 < evaluation_fraction


def split_documents(
    documents: Sequence[Document], evaluation_fraction: float = EVALUATION_FRACTION
) -> DocumentSplit:
    """Calibration and evaluation documents (input order kept); ids must be unique."""
    ids = [d.id for d in documents]
    if len(set(ids)) != len(ids):
        raise ValueError("document ids must be unique to split by id")
    calibration, evaluation = [], []
    for document in documents:
        side = evaluation if is_evaluation_document(document.id, evaluation_fraction) else calibration
        side.append(document)
    return DocumentSplit(calibration, evaluation)


def calibration_dataset(
    tokenizer,
    documents: Sequence[Document],
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    evaluation_fraction: float = EVALUATION_FRACTION,
):
    """A tokenized ``datasets.Dataset`` (``input_ids``, ``attention_mask``; ``num_samples``
    rows of exactly ``seq_len`` tokens) for ``oneshot(dataset=...)``.

    Only the calibration side of ``documents`` is used (``evaluation_fraction=0`` uses them
    all, e.g. for a file that holds calibration text only). Those whole documents are
    shuffled with ``seed``, tokenized without special tokens, concatenated with an EOS
    token after each, and cut into consecutive non-overlapping windows; only as many
    documents are tokenized as the windows need.
    """
    from datasets import Dataset

    if num_samples <= 0 or seq_len <= 0:
        raise ValueError("num_samples and seq_len must be positive")
    pool = sorted(split_documents(documents, evaluation_fraction).calibration, key=lambda d: d.id)
    random.Random(seed).shuffle(pool)
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    needed = num_samples * seq_len
    stream: list[int] = []
    for document in pool:
        stream += tokenizer(document.text, add_special_tokens=False, verbose=False)["input_ids"]
        stream += separator
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise ValueError(
            f"{len(pool)} calibration documents give {len(stream)} tokens; "
            f"{num_samples} x {seq_len} = {needed} needed"
        )
    windows = [stream[i * seq_len:(i + 1) * seq_len] for i in range(num_samples)]
    return Dataset.from_dict(
        {"input_ids": windows, "attention_mask": [[1] * seq_len for _ in windows]}
    )


def load_documents(spec: str | Path) -> list[Document]:
    """Documents named by ``spec``:

    - ``"brown"`` / ``"sotu"``: the cached corpora (:mod:`rescomp_harness.assets`);
    - a ``.txt`` file: one document, id = file name;
    - a ``.jsonl`` file: one document per line, field ``text`` (``id`` optional);
    - a directory: every ``.txt`` and ``.jsonl`` in it, sorted by name;
    - anything else: a Hugging Face dataset id, ``ID[:CONFIG][@SPLIT]`` (split default
      ``test``, else the first one), text from the ``text`` or ``page`` column. Needs the
      hub or its local cache.
    """
    spec_text = str(spec)
    if spec_text == "brown":
        return brown_documents()
    if spec_text == "sotu":
        return sotu_documents()
    path = Path(spec_text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl"))
        return [document for file in files for document in _file_documents(file)]
    if path.is_file():
        return _file_documents(path)
    if path.suffix in (".txt", ".jsonl"):
        raise FileNotFoundError(f"no such file: {path}")
    return _hub_documents(spec_text)


def _file_documents(path: Path) -> list[Document]:
    if path.suffix == ".txt":
        return [Document(path.name, path.read_text(encoding="utf-8"), str(path))]
    if path.suffix != ".jsonl":
        raise ValueError(f"expected a .txt or .jsonl file, got {path}")
    documents = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if line.strip():
                record = json.loads(line)
                document_id = str(record.get("id", f"{path.name}:{line_number}"))
                documents.append(Document(document_id, record["text"], str(path)))
    return documents


def _hub_documents(spec: str) -> list[Document]:
    import datasets

    name, _, split = spec.partition("@")
    dataset_id, _, config = name.partition(":")
    try:
        loaded = datasets.load_dataset(dataset_id, config or None)
    except Exception as error:  # offline, unknown id, gated: one clear message
        raise AssetUnavailable(
            f"could not load the dataset {dataset_id!r} (config {config or None!r}) with "
            f"datasets.load_dataset: {type(error).__name__}: {error}\n"
            "Without access to the Hugging Face hub, use 'brown', 'sotu', or a local "
            ".txt / .jsonl file or directory."
        ) from error
    split = split or ("test" if "test" in loaded else next(iter(loaded)))
    rows = loaded[split]
    column = next((c for c in ("text", "page", "content", "document") if c in rows.column_names), None)
    if column is None:
        raise ValueError(f"{spec}: no text column among {rows.column_names}")
    return [
        Document(f"{dataset_id}/{split}/{index}", text, spec)
        for index, text in enumerate(rows[column]) if text and text.strip()
    ]
