"""Calibration / evaluation splits and calibration datasets."""

import json
import random

import pytest

from rescomp_harness.assets import AssetUnavailable, Document
from rescomp_harness.data import (
    DocumentError,
    calibration_dataset,
    comparison_documents,
    is_evaluation_document,
    load_documents,
    split_documents,
)

from helpers import make_tokenizer

NUM_DOCUMENTS = 90  # the tokenizer has words w0..w91: document i is "w{i}" repeated


def tagged_documents():
    return [Document(f"doc-{i}", " ".join([f"w{i}"] * (20 + i)), "test") for i in range(NUM_DOCUMENTS)]


def test_split_is_disjoint_complete_and_independent_of_order():
    documents = [Document(f"id{i}", "x", "test") for i in range(2000)]
    split = split_documents(documents)
    calibration = {d.id for d in split.calibration}
    evaluation = {d.id for d in split.evaluation}
    assert not calibration & evaluation
    assert calibration | evaluation == {d.id for d in documents}
    assert 0.17 < len(evaluation) / len(documents) < 0.23

    shuffled = documents[:]
    random.Random(1).shuffle(shuffled)
    assert {d.id for d in split_documents(shuffled).evaluation} == evaluation
    assert all(is_evaluation_document(i) for i in evaluation)


def test_split_rejects_duplicate_ids():
    with pytest.raises(ValueError, match="unique"):
        split_documents([Document("a", "x", "t"), Document("a", "y", "t")])


def test_calibration_windows_come_from_calibration_documents_only():
    tokenizer = make_tokenizer()
    documents = tagged_documents()
    evaluation_ids = {d.id for d in split_documents(documents).evaluation}
    assert evaluation_ids  # the check below means something

    dataset = calibration_dataset(tokenizer, documents, num_samples=12, seq_len=64, seed=3)
    assert dataset.column_names == ["input_ids", "attention_mask"]
    assert len(dataset) == 12
    assert all(len(row) == 64 for row in dataset["input_ids"])
    assert all(set(row) == {1} for row in dataset["attention_mask"])

    word_ids = {tokenizer.convert_tokens_to_ids(f"w{i}"): f"doc-{i}" for i in range(NUM_DOCUMENTS)}
    tokens = [t for row in dataset["input_ids"] for t in row]
    used = {word_ids[t] for t in tokens if t in word_ids}
    assert used and not used & evaluation_ids
    assert tokenizer.eos_token_id in tokens  # documents are separated by EOS


def test_calibration_dataset_is_deterministic_per_seed():
    tokenizer = make_tokenizer()
    documents = tagged_documents()
    first = calibration_dataset(tokenizer, documents, 8, 32, seed=0)["input_ids"]
    again = calibration_dataset(tokenizer, list(reversed(documents)), 8, 32, seed=0)["input_ids"]
    other = calibration_dataset(tokenizer, documents, 8, 32, seed=1)["input_ids"]
    assert first == again
    assert first != other


def test_calibration_dataset_says_when_text_runs_out():
    with pytest.raises(ValueError, match="needed"):
        calibration_dataset(make_tokenizer(), tagged_documents()[:3], 100, 64, seed=0)


def test_calibration_dataset_is_what_oneshot_calibrates_on():
    """oneshot's own loader takes the dataset as already tokenized, windows unchanged."""
    from llmcompressor.args import DatasetArguments
    from llmcompressor.datasets.utils import get_calibration_dataloader

    tokenizer = make_tokenizer()
    dataset = calibration_dataset(tokenizer, tagged_documents(), 4, 32, seed=0)
    arguments = DatasetArguments(dataset=dataset, max_seq_length=32, num_calibration_samples=4,
                                 shuffle_calibration_samples=False)
    batches = list(get_calibration_dataloader(arguments, tokenizer))
    assert [b["input_ids"][0].tolist() for b in batches] == dataset["input_ids"]


def test_load_documents_from_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document")
    with open(tmp_path / "b.jsonl", "w") as handle:
        handle.write(json.dumps({"id": "first", "text": "one"}) + "\n\n")
        handle.write(json.dumps({"text": "two"}) + "\n")
    assert [d.id for d in load_documents(tmp_path / "a.txt")] == ["a.txt"]
    assert [(d.id, d.text) for d in load_documents(str(tmp_path / "b.jsonl"))] == [
        ("first", "one"), ("b.jsonl:3", "two")]
    assert [d.id for d in load_documents(tmp_path)] == ["a.txt", "first", "b.jsonl:3"]
    with pytest.raises(FileNotFoundError):
        load_documents(tmp_path / "missing.txt")


def test_load_documents_hub_id_fails_clearly_offline(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(AssetUnavailable, match="'brown', 'sotu', or a local"):
        load_documents("EleutherAI/wikitext_document_level:wikitext-2-raw-v1@test")


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"id": f"{path.stem}-{i}", "text": t}) + "\n"
                            for i, t in enumerate(texts)))
    return str(path)


def test_an_evaluation_source_of_its_own_is_scored_whole(tmp_path):
    calibration = _jsonl(tmp_path / "calibration.jsonl", [f"c{i}" for i in range(30)])
    evaluation = _jsonl(tmp_path / "evaluation.jsonl", [f"e{i}" for i in range(60)])
    documents = comparison_documents(calibration, [evaluation])
    assert [d.text for d in documents.evaluation[evaluation]] == [f"e{i}" for i in range(60)]
    assert [d.text for d in documents.calibration] == [f"c{i}" for i in range(30)]
    assert "all of its documents are scored" in documents.evaluation_rules[evaluation]
    assert "all of its documents calibrate" in documents.calibration_rule


def test_a_source_serving_both_sides_is_split_by_id(tmp_path):
    shared = _jsonl(tmp_path / "shared.jsonl", [f"s{i}" for i in range(200)])
    other = _jsonl(tmp_path / "other.jsonl", ["o"])
    split = split_documents(load_documents(shared))
    # the same file spelled another way is the same source
    spelled = str(tmp_path / "." / "shared.jsonl")
    documents = comparison_documents(shared, [spelled, other])
    assert documents.calibration == split.calibration
    assert documents.evaluation[spelled] == split.evaluation
    assert split.evaluation and split.calibration
    assert [d.text for d in documents.evaluation[other]] == ["o"]
    assert "split by document id" in documents.calibration_rule
    assert "held-out side" in documents.evaluation_rules[spelled]
    assert "all of its documents are scored" in documents.evaluation_rules[other]


def test_evaluation_text_that_also_calibrates_is_refused(tmp_path):
    calibration = _jsonl(tmp_path / "calibration.jsonl", ["a", "b", "c"])
    evaluation = _jsonl(tmp_path / "evaluation.jsonl", ["x", "b"])
    with pytest.raises(DocumentError, match=r"1 documents \(e.g. 'evaluation-1'\) have the same text"):
        comparison_documents(calibration, [evaluation])


def test_an_empty_evaluation_side_is_refused(tmp_path):
    (tmp_path / "one.txt").write_text("w1 w2")  # one document, on the calibration side
    assert not is_evaluation_document("one.txt")
    with pytest.raises(DocumentError, match="no documents to score after the split"):
        comparison_documents(str(tmp_path / "one.txt"), [str(tmp_path / "one.txt")])


@pytest.mark.parametrize("content, message", [
    ('{"text": "one"}\n{"text": "two"\n', r"bad.jsonl:2: not valid JSON \(Expecting ',' delimiter"),
    ('{"text": "one"}\n\n{"body": "two"}\n', r'bad.jsonl:3: no "text" string'),
    ('{"text": 3}\n', r'bad.jsonl:1: no "text" string'),
    ('["one"]\n', r'bad.jsonl:1: no "text" string'),
])
def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DocumentError, match=message):
        load_documents(tmp_path / "bad.jsonl")


def test_a_directory_without_documents_is_refused(tmp_path):
    (tmp_path / "notes.md").write_text("not a document")
    with pytest.raises(DocumentError, match="no .txt or .jsonl files"):
        load_documents(tmp_path)
