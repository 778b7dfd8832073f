"""Block diffusion sampling with an exact block KV cache.

For each response block: append `block_size` mask tokens and denoise until no mask is left. Each denoising step runs
one forward of the block (attending to the cached prompt and committed blocks, and to itself bidirectionally), samples
a token at every masked position, and commits the most confident ones:

- static rule (`threshold=None`): the top `ceil(block_size / steps_per_block)` positions per step;
- dynamic rule (`threshold=t`): every position whose confidence exceeds `t`, and at least the static quota.

With the cache, the clean forward of a finished block is fused into the first step of the next block: the forward
input is `[previous block (clean) | current block (noisy)]`, after which the cache is cropped back so that it holds
exactly the clean prefix. A block therefore costs one forward per denoising step and nothing more.

This module depends only on torch and transformers (and `attention.py`, likewise): it is also the code that a
published model folder runs as its `custom_generate/generate.py`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput

from .attention import BIDIRECTIONAL, position_ids_from_mask


CONFIDENCE_MEASURES = ("probability", "margin", "entropy")
# Generation-config fields specific to diffusion decoding (the rest are standard `GenerationConfig` fields).
DIFFUSION_GENERATION_FIELDS = ("block_size", "steps_per_block", "threshold", "confidence", "mask_token_id")


@dataclass
class DiffusionOutput(ModelOutput):
    """Output of `diffusion_generate`.

    Attributes:
        sequences: `(batch, prompt_length + max_new_tokens)` prompt (as given, left-padded) followed by the generated
            tokens; positions after the first EOS hold the pad token.
        trajectory: `(batch, max_new_tokens)` for every generated position, the 0-based index, within its block, of the
            denoising step at which it was committed; `-1` where nothing was generated (after EOS).
        nfe: Number of model forwards.
        tokens_per_forward: Tokens committed per denoising forward, per sequence: generated tokens (up to and including
            EOS) summed over rows, divided by the summed number of forwards in which each row still had masks. Static
            decoding with one token per step gives exactly 1.0.
    """

    sequences: torch.LongTensor | None = None
    trajectory: torch.LongTensor | None = None
    nfe: int | None = None
    tokens_per_forward: float | None = None


def _text_config(model: PreTrainedModel):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _as_list(token_ids) -> list[int]:
    if token_ids is None:
        return []
    if isinstance(token_ids, int):
        return [token_ids]
    return [int(t) for t in token_ids]


def _validate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    block_size: int,
    steps_per_block: int,
    threshold: float | None,
    confidence: str,
    temperature: float,
    top_p: float,
    mask_token_id: int | None,
) -> None:
    if mask_token_id is None:
        raise ValueError(
            "No mask token: the model is not a diffusion LM. Convert it first with "
            "`model, tokenizer = opdlm_trl.convert_to_dlm(model, tokenizer)`, or pass `mask_token_id=`."
        )
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, prompt_length), got {tuple(input_ids.shape)}.")
    if input_ids.size(1) == 0 or bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("Empty prompt: every row needs at least one non-padding prompt token (e.g. a BOS token).")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}."
        )
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("Prompts must be left-padded (tokenizer.padding_side = 'left'): found padding at the end.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
    if not isinstance(steps_per_block, int) or not 1 <= steps_per_block <= block_size:
        raise ValueError(
            f"steps_per_block must be an integer in [1, block_size={block_size}], got {steps_per_block!r}."
        )
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1] (paper: 0.9), or None for static decoding; got {threshold!r}.")
    if confidence not in CONFIDENCE_MEASURES:
        raise ValueError(f"confidence must be one of {CONFIDENCE_MEASURES}, got {confidence!r}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")
    total = input_ids.size(1) + math.ceil(max_new_tokens / block_size) * block_size
    max_positions = getattr(_text_config(model), "max_position_embeddings", None)
    if max_positions is not None and total > max_positions:
        raise ValueError(
            f"prompt length {input_ids.size(1)} + max_new_tokens {max_new_tokens} (rounded up to a multiple of "
            f"block_size={block_size}) = {total} exceeds the model's max_position_embeddings={max_positions}. Shorten "
            "the prompt or lower max_new_tokens."
        )


def _confidence(probs: torch.Tensor, tokens: torch.Tensor, measure: str) -> torch.Tensor:
    """Confidence in (0, 1] of each sampled token; `probs` is (..., V), `tokens` (...)."""
    if measure == "probability":
        return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if measure == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    return torch.exp(-entropy)


@torch.no_grad()
def diffusion_generate(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    block_size: int | None = None,
    steps_per_block: int | None = None,
    threshold: float | None = None,
    confidence: str = "probability",
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    mask_token_id: int | None = None,
    use_cache: bool | None = None,
    generator: torch.Generator | None = None,
) -> DiffusionOutput:
    """Samples completions block by block from a converted (diffusion) model.

    Args:
        model: A model converted with `convert_to_dlm` (or any causal LM plus `block_size`/`mask_token_id`).
        input_ids: `(batch, prompt_length)` left-padded prompts.
        attention_mask: `(batch, prompt_length)` 1 for tokens, 0 for left padding. Default: all ones.
        max_new_tokens: Tokens to generate per row. Rounded up to a multiple of `block_size` for decoding, and the
            output trimmed back to `max_new_tokens`.
        block_size: Block size b. Default: the model's `config.dlm_block_size`.
        steps_per_block: Denoising steps per block for the static rule; the static quota per step is
            `ceil(b / steps_per_block)`. Default: b (one token per step).
        threshold: Dynamic rule: commit every position whose confidence exceeds it (at least the static quota).
            None = static decoding.
        confidence: `"probability"` (of the sampled token), `"margin"` (top-1 minus top-2 probability) or
            `"entropy"` (`exp(-entropy)`); all lie in (0, 1] and are computed from the model's distribution
            before temperature and top-k/top-p.
        temperature: 0 = greedy; else sampling temperature.
        top_k: Top-k filter for sampling (0 = off).
        top_p: Nucleus filter for sampling (1.0 = off).
        eos_token_id: Token id(s) that end a row. Default: the model's generation config.
        pad_token_id: Written after EOS. Default: the model's generation config / config.
        mask_token_id: The mask token. Default: `config.mask_token_id`.
        use_cache: Use the exact block KV cache. Default: True for block-causal models, False for bidirectional
            ones (whose cache would not be exact).
        generator: Optional torch generator for sampling.

    Returns:
        A `DiffusionOutput` with `sequences`, `trajectory`, `nfe` and `tokens_per_forward`.
    """
    config = _text_config(model)
    block_size = int(block_size or getattr(config, "dlm_block_size", None) or 4)
    steps_per_block = int(steps_per_block or block_size)
    mask_token_id = mask_token_id if mask_token_id is not None else getattr(config, "mask_token_id", None)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _validate(
        model,
        input_ids,
        attention_mask,
        max_new_tokens,
        block_size,
        steps_per_block,
        threshold,
        confidence,
        temperature,
        top_p,
        mask_token_id,
    )
    bidirectional = getattr(config, "dlm_attention", None) == BIDIRECTIONAL
    if use_cache is None:
        use_cache = not bidirectional
    elif use_cache and bidirectional:
        raise ValueError("use_cache=True needs block-causal attention: a bidirectional model's cache is not exact.")
    eos_ids = _as_list(eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0

    device = input_ids.device
    batch, prompt_len = input_ids.shape
    num_blocks = math.ceil(max_new_tokens / block_size)
    gen_len = num_blocks * block_size
    quota = math.ceil(block_size / steps_per_block)
    greedy = temperature == 0
    warpers = LogitsProcessorList()
    if not greedy:
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k and top_k > 0:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
    eos_tensor = torch.tensor(eos_ids, device=device, dtype=torch.long)

    x = torch.full((batch, gen_len), mask_token_id, dtype=torch.long, device=device)
    trajectory = torch.full((batch, gen_len), -1, dtype=torch.long, device=device)
    full_mask = torch.cat([attention_mask.long(), attention_mask.new_ones((batch, gen_len)).long()], dim=1)
    positions = position_ids_from_mask(full_mask)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    row_steps = torch.zeros(batch, dtype=torch.long, device=device)  # forwards in which the row still had masks
    cache = DynamicCache(config=model.config) if use_cache else None
    pending = input_ids  # tokens not yet in the cache: the prompt, then each finished block
    nfe = 0

    for k in range(num_blocks):
        start, end = k * block_size, (k + 1) * block_size
        x[finished, start:end] = pad_token_id
        if bool(finished.all()):
            x[:, start:] = pad_token_id
            break
        step = 0
        while True:
            masked = x[:, start:end] == mask_token_id
            if not bool(masked.any()):
                break
            if use_cache:
                fresh = torch.cat([pending, x[:, start:end]], dim=1) if step == 0 else x[:, start:end]
                first = prompt_len + end - fresh.size(1)
                logits = model(
                    input_ids=fresh,
                    attention_mask=full_mask[:, : prompt_len + end],
                    position_ids=positions[:, first : prompt_len + end],
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=block_size,
                ).logits
                cache.crop(-block_size)  # drop the noisy block: the cache holds exactly the clean prefix
            else:
                logits = model(
                    input_ids=torch.cat([input_ids, x[:, :end]], dim=1),
                    attention_mask=full_mask[:, : prompt_len + end],
                    position_ids=positions[:, : prompt_len + end],
                    use_cache=False,
                    logits_to_keep=block_size,
                ).logits
            nfe += 1
            row_steps += masked.any(1)
            logits = logits[:, -block_size:].float()
            logits[..., mask_token_id] = float("-inf")
            # Confidence is always read off the model's own distribution (no temperature, no top-k/top-p
            # truncation, which would renormalise the mass and inflate it), so greedy and top_k=1 sampling agree.
            probs = logits.softmax(-1)
            if greedy:
                tokens = logits.argmax(-1)
            else:
                sampling = warpers(None, logits.reshape(-1, logits.size(-1))).softmax(-1)
                tokens = torch.multinomial(sampling, 1, generator=generator).view(batch, block_size)
            conf = _confidence(probs, tokens, confidence).masked_fill(~masked, float("-inf"))
            order = torch.argsort(conf, dim=1, descending=True, stable=True)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(block_size, device=device).expand(batch, -1))
            commit = masked & (rank < quota)
            if threshold is not None:
                commit |= masked & (conf > threshold)
            block = x[:, start:end]
            block[commit] = tokens[commit]
            trajectory[:, start:end][commit] = step
            # A committed EOS ends its row: still-masked positions after it become padding, never denoised.
            is_eos = torch.isin(block, eos_tensor)
            if bool(is_eos.any()):
                after_eos = is_eos.long().cumsum(1) - is_eos.long() > 0
                block[after_eos & (block == mask_token_id)] = pad_token_id
                # ... and, as in the training rows, nothing after an EOS is attended.
                full_mask[:, prompt_len + start : prompt_len + end][after_eos] = 0
            step += 1
        finished |= torch.isin(x[:, start:end], eos_tensor).any(1)
        pending = x[:, start:end]

    # Everything after the first EOS is padding and was not generated.
    is_eos = torch.isin(x, eos_tensor)
    after_eos = is_eos.long().cumsum(1) - is_eos.long() > 0
    x[after_eos] = pad_token_id
    trajectory[after_eos] = -1
    generated = int((trajectory >= 0).sum())
    x, trajectory = x[:, :max_new_tokens], trajectory[:, :max_new_tokens]
    return DiffusionOutput(
        sequences=torch.cat([input_ids, x], dim=1),
        trajectory=trajectory,
        nfe=nfe,
        tokens_per_forward=generated / max(int(row_steps.sum()), 1),
    )


def generate(
    inputs: torch.LongTensor | None = None,
    *,
    model: PreTrainedModel,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    **kwargs,
) -> torch.LongTensor | DiffusionOutput:
    """`model.generate`-compatible entry point (transformers' `custom_generate` signature).

    Standard `GenerationConfig` fields are honoured: `max_new_tokens` (or `max_length`), `do_sample`, `temperature`,
    `top_k`, `top_p`, `eos_token_id`, `pad_token_id`, `return_dict_in_generate`. Diffusion fields (`block_size`,
    `steps_per_block`, `threshold`, `confidence`, `mask_token_id`) are read from the keyword arguments, then from the
    generation config, then from the model config.

    Returns:
        The sequences `(batch, prompt + new tokens)`, or a `DiffusionOutput` with `return_dict_in_generate=True`.
    """
    input_ids = inputs if inputs is not None else input_ids
    if input_ids is None:
        raise ValueError("generate() needs `input_ids` (the tokenized, left-padded prompts).")
    diffusion = {k: kwargs.pop(k) for k in DIFFUSION_GENERATION_FIELDS if k in kwargs}
    generator = kwargs.pop("generator", None)
    use_cache = kwargs.pop("use_cache", None)
    kwargs.pop("tokenizer", None)
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    unused = config.update(**kwargs)
    unused = {k: v for k, v in unused.items() if v is not None}
    if unused:
        raise TypeError(f"Unexpected generate() arguments for a diffusion LM: {sorted(unused)}.")
    for key in DIFFUSION_GENERATION_FIELDS:
        if key not in diffusion and getattr(config, key, None) is not None:
            diffusion[key] = getattr(config, key)
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = (config.max_length or input_ids.size(1) + 20) - input_ids.size(1)
    do_sample = bool(config.do_sample)
    output = diffusion_generate(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        temperature=(config.temperature if config.temperature is not None else 1.0) if do_sample else 0.0,
        top_k=(config.top_k or 0) if do_sample else 0,
        top_p=(config.top_p if config.top_p is not None else 1.0) if do_sample else 1.0,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        use_cache=use_cache,
        generator=generator,
        **diffusion,
    )
    return output if config.return_dict_in_generate else output.sequences
