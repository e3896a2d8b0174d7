"""lm-eval tasks on local files, and running lm-eval on an in-memory model.

lm-eval ships no benchmark data and our machines reach no dataset hub, so the tasks read
JSONL files we write (``dataset_path: json``), found through ``TaskManager(include_path=)``:

- ``rescomp_ppl_<corpus>`` (``brown``, ``sotu``): ``loglikelihood_rolling`` word / byte
  perplexity and bits per byte on the corpus' held-out documents (the evaluation side of
  :func:`rescomp_harness.data.split_documents`), one row per document, shaped like
  lm-eval's ``wikitext`` task. Its token-level scoring equals
  ``perplexity(..., windowing="lm_eval", seq_len=max_length)`` per document.
- ``rescomp_bigbench_<task>``: zero-shot multiple choice (``acc``, ``acc_norm``) on a
  BIG-bench JSON task with ``target_scores`` (e.g. ``social_iqa``, ``strategyqa``,
  ``winowhy``), prompts built as BIG-bench builds them.

Any other name is passed to lm-eval as it is (its built-in tasks need their datasets, so
they fail offline).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Sequence

import yaml

from rescomp_harness.assets import Document, bigbench_task_definition
from rescomp_harness.data import load_documents, split_documents

__all__ = [
    "PERPLEXITY_TASK_PREFIX",
    "BIGBENCH_TASK_PREFIX",
    "write_perplexity_task",
    "write_bigbench_task",
    "prepare_tasks",
    "run_lm_eval",
    "bigbench_accuracy",
]

PERPLEXITY_TASK_PREFIX = "rescomp_ppl_"
BIGBENCH_TASK_PREFIX = "rescomp_bigbench_"

# BIG-bench's defaults for JSON tasks (bigbench/api/json_task.py).
_BIGBENCH_DEFAULTS = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
}


def _write_task(task_dir: Path, name: str, rows: list[dict], config: dict) -> str:
    task_dir.mkdir(parents=True, exist_ok=True)
    data = (task_dir / f"{name}.jsonl").resolve()
    with open(data, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    header = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
    }
    with open(task_dir / f"{name}.yaml", "w") as handle:
        yaml.safe_dump({**header, **config, "metadata": {"version": 1.0}}, handle, sort_keys=False)
    return name


def write_perplexity_task(task_dir: str | Path, name: str, documents: Sequence[Document]) -> str:
    """A ``loglikelihood_rolling`` task named ``name`` over ``documents`` (all of them:
    pass held-out documents only). Returns the task name."""
    rows = [{"id": d.id, "text": d.text} for d in documents]
    return _write_task(Path(task_dir), name, rows, {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "should_decontaminate": True,
        "doc_to_decontamination_query": "text",
        "metric_list": [
            {"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
            {"metric": "bits_per_byte"},
        ],
    })


def bigbench_prompt(example: dict, definition: dict) -> str:
    """BIG-bench's zero-shot prompt for a multiple-choice example, up to the answer."""
    settings = {key: definition.get(key, default) for key, default in _BIGBENCH_DEFAULTS.items()}
    prompt = settings["task_prefix"] + settings["example_input_prefix"] + example["input"]
    if settings["append_choices_to_input"]:
        prompt += "".join(settings["choice_prefix"] + c for c in example["target_scores"])
    return (prompt + settings["example_output_prefix"]).strip()


def write_bigbench_task(task_dir: str | Path, bigbench_name: str) -> str:
    """A ``multiple_choice`` task ``rescomp_bigbench_<name>`` from a BIG-bench JSON task;
    the gold choice is the one with the highest target score. Returns the task name."""
    definition = bigbench_task_definition(bigbench_name)
    rows = []
    for example in definition["examples"]:
        scores = example.get("target_scores")
        if not scores:
            continue
        choices = list(scores)
        rows.append({
            "query": bigbench_prompt(example, definition),
            "choices": choices,
            "gold": max(range(len(choices)), key=lambda i: scores[choices[i]]),
        })
    if not rows:
        raise ValueError(f"BIG-bench task {bigbench_name!r} has no multiple-choice examples")
    name = BIGBENCH_TASK_PREFIX + bigbench_name.replace("/", "__")
    return _write_task(Path(task_dir), name, rows, {
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    })


def prepare_tasks(task_dir: str | Path, tasks: Sequence[str]) -> list[str]:
    """Write the files of the ``rescomp_*`` tasks among ``tasks`` into ``task_dir``
    (``rescomp_ppl_<spec>`` takes the held-out side of ``load_documents(spec)``); tasks
    whose YAML is already in ``task_dir`` and other names (lm-eval built-ins) pass through."""
    names = []
    for task in tasks:
        if (Path(task_dir) / f"{task}.yaml").exists():
            names.append(task)
        elif task.startswith(PERPLEXITY_TASK_PREFIX):
            corpus = task[len(PERPLEXITY_TASK_PREFIX):]
            heldout = split_documents(load_documents(corpus)).evaluation
            names.append(write_perplexity_task(task_dir, task, heldout))
        elif task.startswith(BIGBENCH_TASK_PREFIX):
            names.append(write_bigbench_task(task_dir, task[len(BIGBENCH_TASK_PREFIX):]))
        else:
            names.append(task)
    return names


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    task_dir: str | Path | None = None,
    batch_size: int = 4,
    max_length: int | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    **simple_evaluate_kwargs,
) -> dict:
    """``lm_eval.simple_evaluate`` of an in-memory model (``HFLM(pretrained=model,
    tokenizer=tokenizer)``) on ``tasks``; returns lm-eval's results dict (per-task
    metrics under ``"results"``).

    ``rescomp_*`` tasks are written into ``task_dir`` (a temporary directory by default)
    first. ``max_length`` is lm-eval's context window, also its rolling-window length
    for perplexity tasks (default: the model's). ``limit`` caps the documents per task.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="rescomp-lm-eval-") as scratch:
        task_dir = Path(task_dir) if task_dir is not None else Path(scratch)
        names = prepare_tasks(task_dir, tasks)
        # Indexing lm-eval's ~14k built-in YAMLs takes ~30 s: only when one is asked for.
        builtin_wanted = any(not (task_dir / f"{name}.yaml").exists() for name in names)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  max_length=max_length)
        simple_evaluate_kwargs.setdefault("bootstrap_iters", 1000)
        return simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=log_samples,
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=builtin_wanted),
            **simple_evaluate_kwargs,
        )


def bigbench_accuracy(
    model, tokenizer, tasks: Sequence[str], *, limit: int | None = None, batch_size: int = 4
) -> dict[str, float]:
    """Zero-shot accuracy on BIG-bench multiple-choice tasks (plain names such as
    ``social_iqa``), keyed ``bigbench_<name>``; ``limit`` takes the first examples."""
    names = {task: BIGBENCH_TASK_PREFIX + task.replace("/", "__") for task in tasks}
    results = run_lm_eval(model, tokenizer, [BIGBENCH_TASK_PREFIX + t for t in tasks],
                          limit=limit, batch_size=batch_size)["results"]
    return {f"bigbench_{task}": results[name]["acc,none"] for task, name in names.items()}
