"""Reading checkpoints released in the dLLM "a2d" format (the paper authors' OPDLM / `*-a2d-init` checkpoints).

An a2d folder is a stock decoder (Qwen3, Qwen2, Llama) saved under a new `model_type` (`"a2d-qwen3"`, ...), with
`architectures = ["A2DQwen3LMHeadModel"]`, an `auto_map` pointing at remote modeling code, and the decoder's own
state-dict keys (`model.layers.N...`, `lm_head.weight`). The remote code only swaps the causal mask for a
bidirectional one. Its mask token (`<|MASK|>`, id 151669 for Qwen3) is in the vocabulary but is not registered as
`tokenizer.mask_token`, and the config has no block size.

Nothing here runs the remote code: the config is mapped back to the base architecture's config class, the weights are
loaded into the stock `...ForCausalLM`, and `opdlm_trl.hub.load_dlm` then converts the model with `convert_to_dlm`.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


A2D_MODEL_TYPE_PATTERN = re.compile(r"^a2d[-_](?P<base>.+)$")
# Mask tokens used by released diffusion checkpoints, tried in this order when the tokenizer registers none.
A2D_MASK_TOKENS = ("<|MASK|>", "<|mask|>", "[MASK]", "<mask>")
# Keys of an a2d config.json that describe the remote code rather than the architecture.
_REMOTE_CODE_KEYS = ("model_type", "architectures", "auto_map", "transformers_version")


def is_a2d_config(config_dict: dict[str, Any]) -> bool:
    """Whether a `config.json` dictionary is in the dLLM a2d format (`model_type` like `"a2d-qwen3"`)."""
    return bool(A2D_MODEL_TYPE_PATTERN.match(str(config_dict.get("model_type", ""))))


def a2d_base_model_type(config_dict: dict[str, Any]) -> str:
    """The base `model_type` of an a2d config (`"a2d-qwen3"` -> `"qwen3"`).

    Raises:
        ValueError: The config is not an a2d config, or its base architecture is not a causal LM transformers knows.
    """
    match = A2D_MODEL_TYPE_PATTERN.match(str(config_dict.get("model_type", "")))
    if match is None:
        raise ValueError(f"Not an a2d config: model_type={config_dict.get('model_type')!r}.")
    base = match.group("base").replace("-", "_")
    if base not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"a2d checkpoint of base architecture {base!r}, which transformers has no causal LM for. Supported: the "
            "a2d variants of any `AutoModelForCausalLM` architecture (a2d-qwen3, a2d-qwen2, a2d-llama, ...)."
        )
    return base


def a2d_to_causal_config(config_dict: dict[str, Any]) -> PretrainedConfig:
    """Maps an a2d `config.json` dictionary to the config of its stock causal architecture.

    Args:
        config_dict: The parsed `config.json` of an a2d checkpoint.

    Returns:
        A config of the base architecture (e.g. `Qwen3Config`), with `architectures` set to its `...ForCausalLM` and no
        `auto_map`, so that loading never runs remote code.
    """
    base = a2d_base_model_type(config_dict)
    kwargs = {k: v for k, v in config_dict.items() if k not in _REMOTE_CODE_KEYS}
    config = AutoConfig.for_model(base, **kwargs)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base]]
    return config


def find_mask_token(tokenizer, config_dict: dict[str, Any] | None = None) -> str | None:
    """The mask token of a released diffusion checkpoint whose tokenizer may not register it.

    Order: `tokenizer.mask_token`; the token of `config.mask_token_id` when the config has one; the first of
    `A2D_MASK_TOKENS` present in the vocabulary. None when nothing matches (then `convert_to_dlm` picks or adds one).

    Args:
        tokenizer: The checkpoint's tokenizer.
        config_dict: The parsed `config.json`, if available.
    """
    if tokenizer.mask_token is not None:
        return tokenizer.mask_token
    vocab = tokenizer.get_vocab()
    mask_token_id = (config_dict or {}).get("mask_token_id")
    if isinstance(mask_token_id, int):
        token = tokenizer.convert_ids_to_tokens(mask_token_id)
        if token is not None and vocab.get(token) == mask_token_id:
            return token
    for token in A2D_MASK_TOKENS:
        if token in vocab:
            return token
    return None
