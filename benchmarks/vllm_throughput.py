"""vLLM generation throughput of dense, GPTQ and CAE W4A16 checkpoints, as a markdown table.

    python benchmarks/vllm_throughput.py [--model DIR] [--out DIR] [--rounds 5]
        [--batch-sizes 1 8 32] [--prompt-lens 64 512] [--output-lens 64 256]

Quantizes the model (default: the embedded SmolLM2-135M-Instruct) W4A16 group 64 with
llm-compressor's GPTQModifier and with CAEModifier (reusing checkpoints already in
--out), loads all three in one vLLM worker (vLLM's own environment, see
rescomp_harness.serving) and times greedy generation with random-token prompts for
every batch size x prompt length x output length, the three models interleaved within
each round. Prints medians (tokens generated per second) and the min-max spread, the
ratio of each quantized model to dense, and perplexity from prompt log-probabilities on
held-out Brown documents. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

GROUP_SIZE = 64


def quantize(model_dir: Path, method: str, out: Path, samples: int, seq_len: int) -> Path:
    if (out / "config.json").exists():
        return out
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rescomp_modifiers import CAEModifier
    from rescomp_harness.assets import brown_documents
    from rescomp_harness.data import calibration_dataset

    scheme = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
        "group_size": GROUP_SIZE}}}
    modifier = {"gptq": GPTQModifier, "cae": CAEModifier}[method](
        config_groups=scheme, ignore=["lm_head"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = calibration_dataset(tokenizer, brown_documents(), samples, seq_len, seed=0)
    oneshot(model=model, recipe=[modifier], dataset=dataset, processor=tokenizer,
            num_calibration_samples=samples, max_seq_length=seq_len, batch_size=8)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="dense model directory")
    parser.add_argument("--out", type=Path, default=Path("outputs/vllm_throughput"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--output-lens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--max-windows", type=int, default=64,
                        help="512-token held-out windows scored for perplexity")
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--calibration-len", type=int, default=512)
    args = parser.parse_args(argv)

    from rescomp_harness.assets import brown_documents, default_model_path
    from rescomp_harness.data import split_documents
    from rescomp_harness.serving import serve_and_measure

    model_dir = args.model or default_model_path()
    checkpoints = {"dense": str(model_dir)}
    for method in ("gptq", "cae"):
        checkpoints[method] = str(quantize(model_dir, method, args.out / method,
                                           args.calibration_samples, args.calibration_len))
    configs = [
        {"batch_size": b, "prompt_len": p, "output_len": o, "rounds": args.rounds}
        for b, p, o in itertools.product(args.batch_sizes, args.prompt_lens, args.output_lens)
    ]
    held_out = [d.text for d in split_documents(brown_documents()).evaluation]
    args.out.mkdir(parents=True, exist_ok=True)
    results = serve_and_measure(checkpoints, logprob_texts=held_out, window=512,
                                max_windows=args.max_windows, throughput=configs,
                                log_file=args.out / "vllm_worker.log")
    models = results["models"]

    print(f"vLLM {results['vllm_version']}; kernels: {'; '.join(results['kernel_log'])}\n")
    print("| model | perplexity (prompt log-probs, held-out Brown) |")
    print("|---|---|")
    for name, model in models.items():
        print(f"| {name} | {model['perplexity']['perplexity']:.2f} |")
    print()
    print("| batch | prompt | output | dense tok/s | GPTQ tok/s | CAE tok/s "
          "| GPTQ/dense | CAE/dense | CAE/GPTQ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for config in configs:
        key = "b{batch_size}_p{prompt_len}_o{output_len}".format(**config)
        cells, medians = [], {}
        for name in ("dense", "gptq", "cae"):
            values = models[name]["throughput"][key]["tokens_per_s"]
            medians[name] = statistics.median(values)
            cells.append(f"{medians[name]:.1f} ({min(values):.1f}-{max(values):.1f})")
        print(f"| {config['batch_size']} | {config['prompt_len']} | {config['output_len']} | "
              + " | ".join(cells)
              + f" | {medians['gptq'] / medians['dense']:.2f} | {medians['cae'] / medians['dense']:.2f}"
              f" | {medians['cae'] / medians['gptq']:.2f} |")


if __name__ == "__main__":
    main()
