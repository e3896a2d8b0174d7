"""Documents, calibration/evaluation splits, and tokenized calibration sets.

Calibration text must never overlap evaluation text, whatever the seed. A source named for
evaluation only is evaluation in whole; a source that serves both sides is split by a hash
of each document's id alone (:func:`split_documents`, :func:`comparison_documents`), and the
seed only chooses *which* calibration documents feed the calibration windows.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from loguru import logger

from rescomp_harness.assets import AssetUnavailable, Document, brown_documents, sotu_documents

__all__ = [
    "Document",
    "DocumentSplit",
    "DocumentError",
    "ComparisonDocuments",
    "comparison_documents",
    "same_source",
    "EVALUATION_FRACTION",
    "is_evaluation_document",
    "split_documents",
    "calibration_dataset",
    "check_calibration_text",
    "load_documents",
]

EVALUATION_FRACTION = 0.2


class DocumentError(ValueError):
    """A documents source that cannot be read as documents; the message names the file
    and line."""


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


@dataclass(frozen=True)
class ComparisonDocuments:
    """Which documents calibrate and which are scored in a comparison, and why."""

    #: the pool calibration windows are drawn from (every seed draws from this pool)
    calibration: list[Document]
    #: evaluation source spec -> its scored documents
    evaluation: dict[str, list[Document]]
    #: how the calibration source's documents were assigned, for the log
    calibration_rule: str
    #: evaluation source spec -> how its documents were assigned, for the log
    evaluation_rules: dict[str, str]


def same_source(a: str | Path, b: str | Path) -> bool:
    """Whether two document specs name the same source (equal, or the same local path
    spelled differently)."""
    if str(a) == str(b):
        return True
    path_a, path_b = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    return path_a.exists() and path_b.exists() and path_a.resolve() == path_b.resolve()


def comparison_documents(calibration: str, evaluation: Sequence[str]) -> ComparisonDocuments:
    """The calibration pool and the scored documents of each evaluation source.

    A source named only for evaluation is evaluation in whole, and one named only for
    calibration is calibration in whole. Only a source that serves both (the default:
    Brown calibrates and is also scored) is split, by :func:`split_documents`'s hash of
    each document's id. Raises :class:`DocumentError` when an evaluation source is left
    empty or shares document text with the calibration pool.
    """
    if len(set(map(str, evaluation))) != len(evaluation):
        raise DocumentError(f"evaluation sources named twice: {list(evaluation)}")
    calibration_documents = load_documents(calibration)
    shared = [name for name in evaluation if same_source(name, calibration)]
    evaluation_rules = {}
    scored: dict[str, list[Document]] = {}
    if shared:
        split = split_documents(calibration_documents)
        calibration_documents = split.calibration
        calibration_rule = (
            f"it is also an evaluation source, so it is split by document id: a document is "
            f"held out when the first 8 bytes of sha256(id) fall below {EVALUATION_FRACTION:.0%} "
            "of their range (rescomp_harness.data.is_evaluation_document), else it calibrates"
        )
        for name in shared:
            scored[name] = split.evaluation
            evaluation_rules[name] = "the held-out side of the calibration source's split by id"
    else:
        calibration_rule = "calibration only: all of its documents calibrate"
    for name in evaluation:
        if name not in scored:
            scored[name] = load_documents(name)
            evaluation_rules[name] = "evaluation only: all of its documents are scored"

    calibration_texts = {_text_key(d.text) for d in calibration_documents}
    for name in evaluation:
        if not scored[name]:
            raise DocumentError(f"evaluation {name!r}: no documents to score"
                                + (" after the split; name a separate evaluation source"
                                   if name in shared else ""))
        overlap = [d.id for d in scored[name] if _text_key(d.text) in calibration_texts]
        if overlap:
            raise DocumentError(
                f"evaluation {name!r}: {len(overlap)} documents (e.g. {overlap[0]!r}) have the "
                f"same text as calibration documents of {calibration!r}; scoring text the model "
                "was calibrated on is not a held-out result"
            )
    return ComparisonDocuments(calibration_documents, {n: scored[n] for n in evaluation},
                               calibration_rule, evaluation_rules)


def check_calibration_text(documents: Sequence[Document], spec: str) -> None:
    """Refuse calibration documents of which none holds any text, and warn with counts
    where some do not: :func:`calibration_dataset` adds an end-of-sequence token after
    each document, so empty documents alone would fill the windows with that one token
    and calibrate on nothing. Counts are per source file (a directory has several)."""
    blank = [d for d in documents if not d.text.strip()]
    if not blank:
        return
    totals: dict[str, list[int]] = {}
    for document in documents:
        counts = totals.setdefault(Path(document.source).name or str(document.source), [0, 0])
        counts[1] += 1
        counts[0] += not document.text.strip()
    where = ", ".join(f"{source}: {empty} of {total}" for source, (empty, total)
                      in totals.items() if empty)
    if len(blank) == len(documents):
        raise DocumentError(
            f"calibration {spec!r}: all {len(documents)} documents are empty or "
            f"whitespace-only ({where}): there is no text to calibrate on. Give "
            "--calibration documents with text (a .jsonl line's \"text\", a .txt file's "
            "content)")
    logger.warning(
        f"calibration {spec!r}: {len(blank)} of {len(documents)} documents are empty or "
        f"whitespace-only ({where}); they add nothing but an end-of-sequence token each "
        "to the calibration windows. Remove them from the source to silence this")


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


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
        if not files:
            raise DocumentError(f"{path}: no .txt or .jsonl files in this directory")
        return [document for file in files for document in _file_documents(file)]
    if path.is_file():
        return _file_documents(path)
    if path.suffix in (".txt", ".jsonl"):
        raise FileNotFoundError(f"no such file: {path}")
    return _hub_documents(spec_text)


def _file_documents(path: Path) -> list[Document]:
    if path.suffix == ".txt":
        try:
            return [Document(path.name, path.read_text(encoding="utf-8"), str(path))]
        except UnicodeDecodeError as error:
            raise DocumentError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if path.suffix != ".jsonl":
        raise DocumentError(f"expected a .txt or .jsonl file, got {path}")
    documents = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DocumentError(f"{path}:{line_number}: not valid JSON ({error.msg}, column "
                                    f"{error.colno}); each line is one JSON object") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DocumentError(f'{path}:{line_number}: no "text" string; each line is a JSON '
                                    'object with the document in "text" ("id" optional)')
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
