"""Tiny random models built in code, saved locally (no hub), and calibration data."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 96


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for i in range(VOCAB - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )


def make_model(kind: str = "llama", seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
    elif kind == "qwen3":
        config = transformers.Qwen3Config(head_dim=16, **common)
    elif kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
            decoder_sparse_step=1, mlp_only_layers=[], **common,
        )
    else:
        raise ValueError(kind)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init is tiny; scale up so quantization error is visible
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.2)
    return model


def calibration_dataset(num_samples: int = 8, seq_len: int = 32, seed: int = 0):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (num_samples, seq_len), generator=generator)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )


@pytest.fixture
def tiny_model_dir(tmp_path_factory, request):
    kind = getattr(request, "param", "llama")
    path = tmp_path_factory.mktemp(f"tiny_{kind}")
    make_model(kind).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path
