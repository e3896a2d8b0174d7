"""Quality measurement on local data: perplexity with the papers' protocol and lm-eval
tasks on files we write (lm-eval itself is imported only when it runs)."""

from rescomp_harness.evaluation.lm_eval_tasks import (
    bigbench_accuracy,
    prepare_tasks,
    run_lm_eval,
    write_bigbench_task,
    write_perplexity_task,
)
from rescomp_harness.evaluation.perplexity import (
    PerplexityResult,
    joined_text,
    perplexity,
    token_windows,
)

__all__ = [
    "PerplexityResult",
    "perplexity",
    "joined_text",
    "token_windows",
    "bigbench_accuracy",
    "prepare_tasks",
    "run_lm_eval",
    "write_bigbench_task",
    "write_perplexity_task",
]
