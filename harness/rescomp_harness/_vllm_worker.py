"""Runs inside vLLM's own environment (never imported by rescomp_modifiers).

    <vllm python> _vllm_worker.py SPEC.json RESULTS.json

SPEC names the checkpoints and the measurements (see ``serving.serve_and_measure``). All
checkpoints are loaded in this one process (engine in-process, no executor
subprocesses), so the throughput rounds can interleave them: every model sees the same
machine load. RESULTS is written atomically and carries ``"complete": true`` last; the
parent judges by it, not by the exit code (vLLM sometimes aborts at interpreter exit).
"""

import json
import math
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# In-process engine: one vLLM import instead of three, and several LLMs in one process.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _write(path, results):
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def _linear_kernels(model):
    """{kernel or method class: number of layers} over the model's quantized layers; the
    vLLM log names each kernel only once per process, this attributes it per model."""
    counts = {}
    for module in model.modules():
        scheme = getattr(module, "scheme", None)
        if scheme is None:
            continue
        kernel = getattr(scheme, "kernel", None)
        label = f"{type(scheme).__name__}/{type(kernel).__name__ if kernel else '-'}"
        counts[label] = counts.get(label, 0) + 1
    return counts


def _generate(llm, prompts, max_tokens):
    from vllm import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [o.outputs[0].text for o in outputs]


def _windows(tokenizer, texts, window, max_windows):
    """Non-overlapping token windows, each inside one text (document), BOS first when
    the tokenizer has one, so every window is scored from the same kind of start."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = window - len(bos)
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - body + 1, body):
            out.append(bos + ids[start : start + body])
            if len(out) == max_windows:
                return out
    return out


def _token_logprobs(llm, sequences, use_tqdm=True):
    """Per token sequence, the log-probability of each of its tokens after the first
    (prompt_logprobs=0 returns the actual prompt tokens' values; the first has none)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params,
                           use_tqdm=use_tqdm)
    return [[entry[token].logprob for token, entry in zip(ids[1:], out.prompt_logprobs[1:])]
            for ids, out in zip(sequences, outputs)]


def _perplexity(llm, windows):
    """Token perplexity from prompt log-probabilities over the windows."""
    logprobs = [value for window in _token_logprobs(llm, windows) for value in window]
    total = sum(logprobs)
    return {"perplexity": math.exp(-total / len(logprobs)), "nll_sum": -total,
            "tokens": len(logprobs), "windows": len(windows)}


def _score_choices(llm, items):
    """Log-probability of each candidate continuation given its prompt (a cloze test:
    the model ranks answers it is given, so one flipped greedy token does not decide).
    ``items`` is ``[[prompt, [candidate, ...]], ...]``; returns one list of sums per item."""
    tokenizer = llm.get_tokenizer()
    sequences, spans = [], []
    for prompt, candidates in items:
        prefix = tokenizer(prompt)["input_ids"]
        for candidate in candidates:
            ids = tokenizer(prompt + candidate)["input_ids"]
            if ids[: len(prefix)] != prefix:  # the candidate merged into the prompt's last token
                raise ValueError(f"{candidate!r} does not tokenize apart from {prompt!r}")
            sequences.append(ids)
            spans.append(len(prefix))
    # entry k of a sequence's log-probabilities belongs to its token k + 1
    sums = iter(sum(values[start - 1:]) for values, start
                in zip(_token_logprobs(llm, sequences, use_tqdm=False), spans))
    return [[next(sums) for _ in candidates] for _, candidates in items]


def _throughput_prompts(llm, batch_size, prompt_len, seed):
    """Distinct random token prompts (no shared prefix), identical for every model."""
    import random

    from vllm import TokensPrompt

    rng = random.Random(seed)
    vocab = llm.get_tokenizer().vocab_size
    return [TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab) for _ in range(prompt_len)])
            for _ in range(batch_size)]


def _time_generation(llm, prompts, output_len):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return tokens / seconds


def _lm_eval(llm, path, spec):
    """lm-eval's vLLM backend on the local task the parent wrote (``task_dir``)."""
    import importlib.metadata as metadata

    real_version = metadata.version

    def version(dist):
        # lm-eval asks for the distribution `vllm`; the CPU build is named `vllm-cpu`.
        try:
            return real_version(dist)
        except metadata.PackageNotFoundError:
            if dist == "vllm":
                return real_version("vllm-cpu")
            raise

    metadata.version = version  # before lm_eval.models.vllm_causallms binds it
    import lm_eval
    import lm_eval.models.vllm_causallms as vllm_lm
    from lm_eval.tasks import TaskManager

    task, task_dir = spec["task"], spec["task_dir"]
    # Hand lm-eval the engine this process already loaded instead of a second copy.
    real_llm = vllm_lm.LLM
    vllm_lm.LLM = lambda **kwargs: llm if kwargs.get("model") == path else real_llm(**kwargs)
    try:
        results = lm_eval.simple_evaluate(
            model="vllm",
            model_args={"pretrained": path, "dtype": "bfloat16",
                        "max_model_len": spec.get("max_model_len", 2048)},
            tasks=[task],
            task_manager=TaskManager(include_path=task_dir),
            limit=spec.get("limit"),
        )
    finally:
        vllm_lm.LLM = real_llm
    metrics = results["results"][task]
    return {k.split(",")[0]: v for k, v in metrics.items()
            if k.split(",")[0] in ("word_perplexity", "byte_perplexity", "bits_per_byte")}


def main(spec_path, results_path):
    with open(spec_path) as f:
        spec = json.load(f)
    results = {"complete": False, "models": {}, "errors": {}}
    from vllm import LLM

    import torch

    kwargs = dict(spec["llm_kwargs"])
    if torch.cuda.is_available():  # the engines share one GPU
        kwargs.setdefault("gpu_memory_utilization", 0.8 / len(spec["checkpoints"]))
    llms = {}
    for name, path in spec["checkpoints"].items():
        start = time.perf_counter()
        llms[name] = LLM(model=path, **kwargs)
        results["models"][name] = {"path": path, "load_seconds": time.perf_counter() - start}
        try:  # in-process engine: the function runs here, nothing is serialized
            results["models"][name]["linear_kernels"] = llms[name].apply_model(_linear_kernels)[0]
        except Exception as exc:
            results["errors"][f"{name}/linear_kernels"] = f"{type(exc).__name__}: {exc}"
    models = results["models"]

    if spec.get("prompts"):
        for name, llm in llms.items():
            models[name]["generations"] = _generate(llm, spec["prompts"], spec["max_tokens"])

    if spec.get("choices"):
        for name, llm in llms.items():
            models[name]["choices"] = _score_choices(llm, spec["choices"])

    ppl = spec.get("perplexity")
    if ppl and ppl.get("texts"):
        for name, llm in llms.items():
            windows = _windows(llm.get_tokenizer(), ppl["texts"], ppl["window"], ppl["max_windows"])
            models[name]["perplexity"] = _perplexity(llm, windows)

    for config in spec.get("throughput", []):
        key = "b{batch_size}_p{prompt_len}_o{output_len}".format(**config)
        names = config.get("models") or list(llms)
        prompts = {name: _throughput_prompts(llms[name], config["batch_size"],
                                             config["prompt_len"], config.get("seed", 0))
                   for name in names}
        for name in names:  # warm-up, not timed
            _time_generation(llms[name], prompts[name][:1], 2)
        rounds = {name: [] for name in names}
        for r in range(config["rounds"]):
            # rotate the order so no model always runs first (or right after another)
            for name in names[r % len(names):] + names[: r % len(names)]:
                rounds[name].append(_time_generation(llms[name], prompts[name],
                                                     config["output_len"]))
        for name in names:
            models[name].setdefault("throughput", {})[key] = {**config, "tokens_per_s": rounds[name]}

    if spec.get("lm_eval"):
        for name in spec["lm_eval"]["models"]:
            llm = llms[name]
            try:
                models[name]["lm_eval"] = _lm_eval(llm, spec["checkpoints"][name],
                                                   spec["lm_eval"])
            except Exception as exc:  # reported, so the other results still count
                results["errors"][f"{name}/lm_eval"] = f"{type(exc).__name__}: {exc}"

    import vllm

    results["vllm_version"] = vllm.__version__
    results["complete"] = True
    _write(results_path, results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: it is slow (~20 s) and is where vLLM sometimes aborts.
    os._exit(0)
