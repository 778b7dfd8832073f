"""Tiny offline models and tokenizers for tests, benchmarks and examples.

Nothing here touches the network: tokenizers are built with the `tokenizers` library and models from configs.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast


EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
RESERVED_TOKEN = "<|reserved_special_token_0|>"

# Architectures the library is tested against, as `model_type` -> extra config kwargs.
TINY_ARCHITECTURES: dict[str, dict] = {
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "llama": {},
    "mistral": {"sliding_window": None},
    "gemma": {"head_dim": 16},
}


def make_tokenizer(with_pad: bool = True, with_reserved: bool = True) -> PreTrainedTokenizerFast:
    """Builds a character-level tokenizer with a few special tokens.

    Args:
        with_pad: Whether to define a dedicated pad token.
        with_reserved: Whether to include an unused reserved special token (which `convert_to_dlm` reuses as the mask
            token).

    Returns:
        A left-padding `PreTrainedTokenizerFast`.
    """
    chars = list(string.ascii_lowercase + string.digits + " +-*=,.:?")
    specials = [EOS_TOKEN] + ([PAD_TOKEN] if with_pad else []) + ([RESERVED_TOKEN] if with_reserved else [])
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    vocab["[UNK]"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN if with_pad else None,
        unk_token="[UNK]",
        extra_special_tokens=[RESERVED_TOKEN] if with_reserved else None,
        padding_side="left",
    )
    return tokenizer


def make_model(
    model_type: str = "qwen3",
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    max_position_embeddings: int = 512,
    **overrides,
) -> PreTrainedModel:
    """Builds a tiny randomly initialised causal LM from a config.

    Args:
        model_type: A key of `TINY_ARCHITECTURES` (or any causal `model_type` transformers knows).
        vocab_size: Vocabulary size (match the tokenizer's `len(tokenizer)`).
        hidden_size: Hidden width.
        num_hidden_layers: Number of decoder layers.
        attn_implementation: `"sdpa"` or `"eager"`.
        seed: Seed for the weight initialisation.
        max_position_embeddings: Maximum sequence length.
        **overrides: Extra config fields.

    Returns:
        The model in eval mode, float32, on CPU.
    """
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=1,
    )
    kwargs.update(TINY_ARCHITECTURES.get(model_type, {}))
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    # Random tiny models have near-uniform logits; scale the output head so that greedy decoding is decisive and
    # tests on token equality are not decided by float noise.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()
