"""Perplexity against a plain re-computation, and lm-eval's tasks against our scorer."""

import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from rescomp_harness.assets import Document
from rescomp_harness.evaluation import lm_eval_tasks
from rescomp_harness.evaluation.perplexity import (
    joined_text,
    perplexity,
    token_windows,
    tokenize_text,
)

from helpers import VOCAB, make_model, make_tokenizer

SEQ_LEN = 32


def random_documents(count=3, words=150, seed=0):
    rng = random.Random(seed)
    return [
        Document(f"doc{i}", " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(words)), "test")
        for i in range(count)
    ]


def naive_disjoint_nll(model, token_ids, seq_len):
    """The papers' loop: one window at a time, summed next-token cross-entropy."""
    ids = torch.tensor(token_ids)
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(len(ids) // seq_len):
            window = ids[k * seq_len:(k + 1) * seq_len]
            logits = model(window[None]).logits[0]
            total += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
            count += seq_len - 1
    return total, count


@pytest.fixture(scope="module")
def tiny():
    model = make_model("llama").eval()
    return model, make_tokenizer()


def test_perplexity_matches_naive_loop(tiny):
    model, tokenizer = tiny
    documents = random_documents()
    token_ids = tokenizer(joined_text(documents), add_special_tokens=False)["input_ids"]
    assert len(token_ids) == 450  # whitespace words, "\n\n" adds no token

    result = perplexity(model, documents, tokenizer, seq_len=SEQ_LEN, batch_size=3, progress=False)
    total, count = naive_disjoint_nll(model, token_ids, SEQ_LEN)
    assert result.num_windows == 450 // SEQ_LEN
    assert result.num_predicted_tokens == count == 14 * (SEQ_LEN - 1)
    assert result.total_nll == pytest.approx(total, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)

    # a text tokenized once scores the same (compare scores many models on one text)
    assert tokenize_text(tokenizer, documents) == token_ids
    again = perplexity(model, documents, tokenizer, seq_len=SEQ_LEN, batch_size=3,
                       progress=False, token_ids=token_ids[:SEQ_LEN * 2])
    assert again.num_windows == 2 and again.total_nll < result.total_nll  # the ids, not the text

    # max_windows=3 of 14 takes windows 0, 6 (round(6.5), to even) and 13
    capped = perplexity(model, documents, tokenizer, seq_len=SEQ_LEN, max_windows=3, progress=False)
    chosen = [token_ids[k * SEQ_LEN:(k + 1) * SEQ_LEN] for k in (0, 6, 13)]
    total3 = sum(naive_disjoint_nll(model, window, SEQ_LEN)[0] for window in chosen)
    assert capped.num_windows == 3 and capped.total_nll == pytest.approx(total3, rel=1e-5)


def test_perplexity_is_deterministic_in_eval_mode_and_restores_training(tiny):
    model, tokenizer = tiny
    for module in model.modules():  # dropout that would make train-mode scores random
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    model.train()
    try:
        first = perplexity(model, random_documents(), tokenizer, seq_len=SEQ_LEN, progress=False)
        second = perplexity(model, random_documents(), tokenizer, seq_len=SEQ_LEN, batch_size=1,
                            progress=False)
        assert model.training
    finally:
        model.eval()
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.0
    assert first.total_nll == pytest.approx(second.total_nll, rel=1e-6)


def test_perplexity_loads_a_checkpoint_path(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    in_memory = perplexity(model, random_documents(), tokenizer, seq_len=SEQ_LEN, progress=False)
    from_path = perplexity(str(tmp_path), random_documents(), seq_len=SEQ_LEN, progress=False)
    assert from_path.total_nll == pytest.approx(in_memory.total_nll, rel=1e-5)


def test_lm_eval_windowing_is_lm_evals():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for length in (1, 5, 32, 33, 64, 100):
        tokens = list(range(10, 10 + length))
        ours = token_windows(tokens, SEQ_LEN, "lm_eval", prefix_token_id=1)
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 1, SEQ_LEN, 1)]
        assert len(ours) == len(theirs)
        for (inputs, labels), (context, continuation) in zip(ours, theirs):
            # lm-eval feeds (context + continuation)[:-1] and scores the continuation
            assert inputs == (context + continuation)[:-1]
            assert [t for t in labels if t != -100] == continuation
            assert labels[-len(continuation):] == continuation


def test_lm_eval_perplexity_and_multiple_choice_tasks(tiny, tmp_path, monkeypatch):
    """One lm-eval run: the rolling perplexity task's total log-likelihood equals ours
    with lm-eval's windowing; the BIG-bench-shaped multiple-choice task runs."""
    model, tokenizer = tiny
    text = joined_text(random_documents())
    lm_eval_tasks.write_perplexity_task(tmp_path, "rescomp_ppl_unit", [Document("all", text, "t")])
    definition = {
        "name": "unit_mc",
        "task_prefix": "Pick one.\n",
        "examples": [
            {"input": "w1 w2 w3", "target_scores": {"w4": 0, "w5": 1}},
            {"input": "w6 w7", "target_scores": {"w8": 1, "w9": 0, "w10": 0}},
            {"input": "no choices here"},
        ],
    }
    monkeypatch.setattr(lm_eval_tasks, "bigbench_task_definition", lambda name: definition)

    results = lm_eval_tasks.run_lm_eval(
        model, tokenizer, ["rescomp_ppl_unit", "rescomp_bigbench_unit_mc"], task_dir=tmp_path,
        max_length=SEQ_LEN, batch_size=4,
    )["results"]

    words = len(re.split(r"\s+", text))
    lm_eval_nll = math.log(results["rescomp_ppl_unit"]["word_perplexity,none"]) * words
    ours = perplexity(model, text, tokenizer, seq_len=SEQ_LEN, windowing="lm_eval", progress=False)
    assert ours.num_predicted_tokens == 450  # lm-eval predicts every token
    assert ours.total_nll == pytest.approx(lm_eval_nll, rel=1e-4)
    # the papers' windowing scores 14 windows x 31 tokens of the same stream
    disjoint = perplexity(model, text, tokenizer, seq_len=SEQ_LEN, progress=False)
    assert disjoint.num_predicted_tokens == 14 * 31

    accuracy = results["rescomp_bigbench_unit_mc"]["acc,none"]
    assert accuracy in (0.0, 0.5, 1.0)  # two examples with choices; the third is skipped
    rows = (tmp_path / "rescomp_bigbench_unit_mc.jsonl").read_text().splitlines()
    assert len(rows) == 2
    assert '"query": "Pick one.\\n\\nQ: w1 w2 w3\\n  choice: w4\\n  choice: w5\\nA:"' in rows[0]
    assert '"gold": 1' in rows[0] and '"gold": 0' in rows[1]


def test_builtin_task_names_pass_through(tmp_path):
    assert lm_eval_tasks.prepare_tasks(tmp_path, ["wikitext", "hellaswag"]) == ["wikitext", "hellaswag"]
