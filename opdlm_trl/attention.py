"""Block-causal attention for converted models, built on transformers' own masking interface.

A converted model keeps its architecture, weights and attention kernel (`sdpa`, `eager` or `flex_attention`). Only the
attention *mask* changes, through the public registry `AttentionMaskInterface` of `transformers.masking_utils`: the
mask builders of those three implementations are wrapped once (at import) so that, for a config marked by
`convert_to_dlm` (`config.dlm_attention == "block_causal"`), the model's own mask function (causal, or causal with a
sliding window) is ORed with a "same block" overlay. For every other config the wrapper is a pass-through. Padding is
still applied by transformers.

Blocks are aligned to the END of the current input (`q_offset + q_length`): a plain forward on a prompt splits it
into blocks ending at its last token, a forward on `[prompt | b masks]` (with the prompt cached) sees the new block as
exactly one block, and a forward on `[prompt | complete blocks]` has every response block on a block boundary. One rule
therefore covers prefill, cached block decoding and uncached decoding; earlier blocks never see later ones, so the KV
cache of committed blocks is exact.

Every architecture whose modeling code builds its mask with `create_causal_mask` / `create_sliding_window_causal_mask`
(Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi3, OLMo, ...) is converted without any model-specific code. The fully
bidirectional variant uses transformers' own `config.is_causal = False` switch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, or_masks


logger = logging.getLogger(__name__)

DEFAULT_MASK_TOKEN = "<|mask|>"
BLOCK_CAUSAL = "block_causal"
BIDIRECTIONAL = "bidirectional"
CAUSAL = "causal"  # temporary state of a converted model inside `causal_attention`
# Attention implementations whose kernels take arbitrary masks.
SUPPORTED_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


def same_block_overlay(block_size: int, end: int | torch.Tensor) -> Callable:
    """Mask function that is True where query and key lie in the same block, blocks aligned to `end`.

    Block index of absolute position `i`, counted from the end: `(end - 1 - i) // block_size`. Written with tensor ops
    only, so that transformers can evaluate it by broadcasting.

    Args:
        block_size: Block size b.
        end: One past the last position of the current input (`q_offset + q_length`).
    """

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        q_block = torch.div(end - 1 - q_idx, block_size, rounding_mode="floor")
        kv_block = torch.div(end - 1 - kv_idx, block_size, rounding_mode="floor")
        return q_block == kv_block

    return inner


def active_block_size(config: PretrainedConfig | None) -> int | None:
    """Block size if `config` belongs to a converted model currently in block-causal mode, else None."""
    if config is None or getattr(config, "dlm_attention", None) != BLOCK_CAUSAL:
        return None
    return int(config.dlm_block_size)


def _wrap_mask_builder(base_builder: Callable) -> Callable:
    def builder(
        batch_size: int,
        q_length: int,
        kv_length: int,
        q_offset: int = 0,
        kv_offset: int = 0,
        mask_function: Callable | None = None,
        config: PretrainedConfig | None = None,
        **kwargs: Any,
    ):
        block_size = active_block_size(config)
        if block_size is not None and mask_function is not None:
            mask_function = or_masks(mask_function, same_block_overlay(block_size, q_offset + q_length))
            # A block-causal mask is never plain causal: it must always be materialised.
            kwargs["allow_is_causal_skip"] = False
        return base_builder(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            config=config,
            **kwargs,
        )

    builder.opdlm_base_builder = base_builder
    return builder


def register_dlm_masks() -> None:
    """Wraps the sdpa / eager / flex mask builders of transformers with the block-causal overlay (idempotent)."""
    for name in SUPPORTED_ATTN_IMPLEMENTATIONS:
        current = ALL_MASK_ATTENTION_FUNCTIONS[name]
        if not hasattr(current, "opdlm_base_builder"):
            AttentionMaskInterface.register(name, _wrap_mask_builder(current))


register_dlm_masks()


def is_dlm(model: PreTrainedModel | PretrainedConfig) -> bool:
    """Whether `model` (or its config) was converted by `convert_to_dlm`."""
    config = model if isinstance(model, PretrainedConfig) else getattr(model, "config", None)
    return config is not None and getattr(config, "dlm_block_size", None) is not None


def _text_config(model_or_config: PreTrainedModel | PretrainedConfig) -> PretrainedConfig:
    config = model_or_config if isinstance(model_or_config, PretrainedConfig) else model_or_config.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _unwrap(model: Any) -> PreTrainedModel:
    # PeftModel -> LoraModel -> PreTrainedModel; accelerate/DDP wrappers expose `.module`.
    while not isinstance(model, PreTrainedModel):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module"):
            model = model.module
        else:
            raise TypeError(
                f"Expected a transformers `PreTrainedModel` (or a PEFT/DDP wrapper of one), got {type(model)}."
            )
    return model


def _validate_model(model: Any) -> PreTrainedModel:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"`model` must be a transformers causal LM (a `PreTrainedModel`), got {type(model).__name__}. Load it with "
            "`AutoModelForCausalLM.from_pretrained(...)` first."
        )
    model = _unwrap(model)
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or not hasattr(model, "get_output_embeddings"):
        raise TypeError(
            f"`{type(model).__name__}` is not a decoder-only causal LM. OPDLM converts causal decoders "
            "(`AutoModelForCausalLM`), e.g. Llama, Mistral, Qwen2/3, Gemma."
        )
    if model.get_output_embeddings() is None or not type(model).__name__.endswith("ForCausalLM"):
        raise TypeError(
            f"`{type(model).__name__}` has no language-model head. Load the model with `AutoModelForCausalLM` "
            "(not `AutoModel`) so that it returns next-token logits."
        )
    return model


def _check_attn_implementation(model: PreTrainedModel) -> str:
    impl = model.config._attn_implementation or "eager"
    if impl.startswith("flash_attention") or "paged" in impl:
        raise ValueError(
            f"attn_implementation={impl!r} cannot take block-causal masks (flash-attention kernels only support "
            f"causal or full attention). Load the model with one of {SUPPORTED_ATTN_IMPLEMENTATIONS}, e.g. "
            "`AutoModelForCausalLM.from_pretrained(..., attn_implementation='sdpa')`."
        )
    if impl not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={impl!r} is not supported for diffusion LMs; load the model with one of "
            f"{SUPPORTED_ATTN_IMPLEMENTATIONS}."
        )
    return impl


def select_attn_implementation(model: PreTrainedModel) -> str:
    """Picks the attention kernel for block masks, and logs why.

    Flex attention evaluates the block mask sparsely (whole blocks skipped) and is the fast path on CUDA. Elsewhere
    (CPU, MPS) its compiled kernels are not dependable for the sampler's cached decoding, so the model keeps its sdpa
    (boolean mask) or eager kernel. An explicit `eager` choice is always kept (some models need it, e.g. for logit
    soft-capping).
    """
    current = model.config._attn_implementation or "eager"
    device = next(model.parameters()).device
    if current == "eager":
        choice, reason = "eager", "the model was loaded with eager attention"
    elif device.type == "cuda" and _flex_attention_available():
        choice, reason = "flex_attention", "CUDA device and torch flex attention available"
    else:
        choice = "sdpa"
        reason = f"device {device.type}: sdpa with a boolean block mask (flex attention is used on CUDA only)"
    logger.info("Block-causal attention kernel: %s (%s).", choice, reason)
    return choice


def _flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _setup_mask_token(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, mask_token: str | None
) -> tuple[int, bool]:
    """Picks or adds the mask token. Returns (mask_token_id, whether embeddings were resized)."""
    if mask_token is None and tokenizer.mask_token is not None:
        return tokenizer.mask_token_id, False
    if mask_token is None:
        # Reuse an unused reserved special token when the vocabulary has one (Llama-3 style
        # `<|reserved_special_token_N|>`, or a token literally named like a mask).
        candidates = [t for t in tokenizer.all_special_tokens if "mask" in t.lower()]
        candidates += sorted(t for t in tokenizer.all_special_tokens if "reserved" in t.lower())
        candidates += sorted(t for t in tokenizer.get_vocab() if t.startswith("<|reserved_special_token_"))
        used = {tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token, tokenizer.unk_token}
        candidates = [t for t in candidates if t not in used]
        mask_token = candidates[0] if candidates else DEFAULT_MASK_TOKEN
    resized = False
    if mask_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"mask_token": mask_token})
    else:
        tokenizer.mask_token = mask_token
    mask_token_id = tokenizer.convert_tokens_to_ids(mask_token)
    weight = model.get_input_embeddings().weight
    vocab_size = weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]  # DeepSpeed ZeRO-3 partitions
    if mask_token_id >= vocab_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        resized = True
    return mask_token_id, resized


def convert_to_dlm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int = 4,
    bidirectional: bool = False,
    mask_token: str | None = None,
    attn_implementation: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Turns a causal LM into a block-diffusion LM, in place: same weights, a mask token, block-causal attention.

    Shaped like TRL's `setup_chat_format`: `model, tokenizer = convert_to_dlm(model, tokenizer)`.

    Args:
        model: A decoder-only `...ForCausalLM` loaded with `attn_implementation` in `("sdpa", "eager",
            "flex_attention")`.
        tokenizer: Its tokenizer. Without a pad token, EOS is used as pad (as TRL does) and a warning says so.
        block_size: Block size b (paper: 4). Prompts are split into blocks aligned to their end.
        bidirectional: Full bidirectional attention (MDLM/LLaDA style) instead of block-causal. Uses transformers'
            own `config.is_causal = False` switch; the KV cache is then not exact and the sampler runs uncached.
        mask_token: The mask token. Default: the tokenizer's mask token, else an unused reserved special token of the
            vocabulary, else a new `<|mask|>` (embeddings are resized).
        attn_implementation: Kernel for the block masks. `"auto"` (default) picks it with
            `select_attn_implementation` and logs the choice: flex attention with a block mask on CUDA, else the
            model's own sdpa/eager kernel with a materialised mask. Or one of `SUPPORTED_ATTN_IMPLEMENTATIONS`.

    Returns:
        The converted model and tokenizer (the same objects, modified).

    Raises:
        TypeError: `model` is not a decoder-only causal LM, or `tokenizer` is not a tokenizer.
        ValueError: `block_size < 1`, or an attention implementation that cannot take block masks.
    """
    model = _validate_model(model)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"`tokenizer` must be a transformers tokenizer, got {type(tokenizer).__name__}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer (paper: 4), got {block_size!r}.")
    _check_attn_implementation(model)
    chosen = select_attn_implementation(model) if attn_implementation == "auto" else attn_implementation
    if chosen not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation must be 'auto' or one of {SUPPORTED_ATTN_IMPLEMENTATIONS}, got {chosen!r}."
        )
    if chosen != model.config._attn_implementation:
        model.set_attn_implementation(chosen)
    if tokenizer.pad_token is None:
        logger.warning(
            "The tokenizer has no pad token; using its EOS token %r as pad token, as TRL does.", tokenizer.eos_token
        )
        tokenizer.pad_token = tokenizer.eos_token

    mask_token_id, resized = _setup_mask_token(model, tokenizer, mask_token)
    if resized:
        logger.warning("Added mask token %r (id %d) and resized the embeddings.", tokenizer.mask_token, mask_token_id)

    for config in _configs(model):
        if resized:
            # The original model has no row for the added mask token: distillation compares this many tokens.
            config.dlm_original_vocab_size = mask_token_id
        config.dlm_block_size = block_size
        config.mask_token_id = mask_token_id
        config.dlm_attention = BIDIRECTIONAL if bidirectional else BLOCK_CAUSAL
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        if bidirectional:
            config.is_causal = False
    model.generation_config.mask_token_id = mask_token_id
    model.generation_config.block_size = block_size
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    # `model.generate()` runs the diffusion sampler. This is the same mechanism transformers uses for a model folder
    # that ships `custom_generate/generate.py` (`from_pretrained(..., trust_remote_code=True)`).
    from .sampler import generate

    model.generate = functools.partial(generate, model=model)
    return model, tokenizer


def _configs(model: PreTrainedModel) -> list[PretrainedConfig]:
    configs = [model.config]
    text_config = _text_config(model)
    if text_config is not model.config:
        configs.append(text_config)
    return configs


@contextlib.contextmanager
def causal_attention(model: Any) -> Iterator[Any]:
    """Runs a converted model with plain causal attention inside the block (the self-teacher's view).

    Same weights, same kernel; only the mask goes back to the original causal one. No-op for a model that was never
    converted. Accepts PEFT / DDP wrappers.
    """
    inner = _unwrap(model)
    if not is_dlm(inner):
        yield model
        return
    saved = [(c, c.dlm_attention, getattr(c, "is_causal", True)) for c in _configs(inner)]
    for config, _, _ in saved:
        config.dlm_attention = CAUSAL
        config.is_causal = True
    try:
        yield model
    finally:
        for config, attention, is_causal in saved:
            config.dlm_attention = attention
            config.is_causal = is_causal


def attention_mask_format(model_or_config: PreTrainedModel | PretrainedConfig) -> str:
    """The base attention implementation (`sdpa`, `eager`, `flex_attention`) whose mask format the model expects."""
    config = _text_config(
        model_or_config if isinstance(model_or_config, PretrainedConfig) else _unwrap(model_or_config)
    )
    return config._attn_implementation or "eager"


def make_4d_mask(
    model_or_config: PreTrainedModel | PretrainedConfig,
    mask_function: Callable,
    batch_size: int,
    q_length: int,
    kv_length: int,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Builds a ready 4-D attention mask for a custom layout, in the format the model's attention kernel wants.

    The layout is a transformers mask function `f(batch_idx, head_idx, q_idx, kv_idx) -> bool` written with
    broadcasting tensor ops; padding (`attention_mask`, 2-D, 1 = keep) is ANDed in by transformers. The result is
    passed to the model as `attention_mask=`, which every model returns as-is from `create_causal_mask`.

    Args:
        model_or_config: The model (or its config) that will consume the mask.
        mask_function: Layout of allowed (query, key) pairs.
        batch_size: Batch size.
        q_length: Number of query positions.
        kv_length: Number of key positions.
        attention_mask: Optional 2-D padding mask of shape (batch_size, kv_length).
        device: Device of the mask.
        dtype: Compute dtype (used by the eager format, whose mask is additive).

    Returns:
        A boolean `(B, 1, Q, K)` tensor (sdpa), an additive float tensor (eager) or a `BlockMask` (flex attention).
    """
    fmt = attention_mask_format(model_or_config)
    builder = ALL_MASK_ATTENTION_FUNCTIONS[fmt]
    builder = getattr(builder, "opdlm_base_builder", builder)  # the layout is explicit: no block overlay on top
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
    return builder(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=0,
        kv_offset=0,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        device=device,
        dtype=dtype,
        config=_text_config(
            model_or_config if isinstance(model_or_config, PretrainedConfig) else _unwrap(model_or_config)
        ),
    )


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: `cumsum(mask) - 1`, clamped at 0 (as transformers' generate does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
