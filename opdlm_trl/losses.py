"""Divergences between the teacher's and the student's token distributions, and OPDLM's loss reduction.

Two paths compute the same per-token divergences:

- `chunked_divergence`: from both models' hidden states and LM heads, through TRL's
  `ChunkedDivergenceFunction`, which projects to the vocabulary tile by tile so that neither model's `[N, V]` logits
  exist in full (forward and backward).
- `dense_divergence`: from logits; needed for `teacher_top_k` (a sum restricted to the teacher's top-k tokens, without
  renormalisation; such a partial sum is no longer a divergence and can be negative, e.g. for the reverse KL).
  `dense_divergence_from_hidden` projects the hidden states first.

Divergences (`p_t` teacher, `p_s` student, both softmaxes at temperature `temperature` over the compared vocabulary):

- `"forward_kl"`: `sum_v p_t(v) (log p_t(v) - log p_s(v))`, i.e. KL(teacher || student) (the paper's);
- `"reverse_kl"`: `sum_v p_s(v) (log p_s(v) - log p_t(v))`;
- `"jsd"`: with `m = (1 - beta) p_s + beta p_t`, `sum_v beta p_t (log p_t - log m) + (1 - beta) p_s (log p_s - log m)`
  (TRL's generalized JSD; `beta = 0.5` is the standard JSD).

`opdlm_loss` reduces per-token divergences the paper's way: per row, sum over its loss positions divided by their
count; then the mean over the rows that have at least one loss position (rows without any contribute nothing and are
not counted), with weight w(t) = 1.
"""

from __future__ import annotations

import math

import torch
from transformers import PretrainedConfig
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction


def divergence_beta(divergence: str, beta: float = 0.5) -> float:
    """Maps a divergence name to the `beta` of TRL's generalized JSD kernel.

    Args:
        divergence: `"forward_kl"`, `"reverse_kl"` or `"jsd"`.
        beta: JSD mixture coefficient (only for `"jsd"`).

    Returns:
        `0.0` (forward KL), `1.0` (reverse KL) or `beta`.
    """
    if divergence == "forward_kl":
        return 0.0
    if divergence == "reverse_kl":
        return 1.0
    if divergence == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"divergence='jsd' needs 0 < beta < 1, got {beta}.")
        return float(beta)
    raise ValueError(f"Unknown divergence {divergence!r}: use 'forward_kl', 'reverse_kl' or 'jsd'.")


def logit_postprocessing(config: PretrainedConfig) -> tuple[float, float | None]:
    """The multiplier and final soft-capping a model applies to its LM-head output (read as TRL does).

    Args:
        config: The model config.

    Returns:
        `(logit_scale, final_logit_softcapping)`; `(1.0, None)` for a plain head.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(config, "final_logit_softcapping", None)


def postprocess_logits(logits: torch.Tensor, scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """Applies a head's multiplier and soft-capping (`softcap * tanh(logits / softcap)`) to raw projections."""
    logits = logits * scale if scale != 1.0 else logits
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def dense_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    teacher_top_k: int | None = None,
) -> torch.Tensor:
    """Per-token divergence from `[N, V]` logits.

    Args:
        student_logits: `(N, V)` student logits (post-processed, before temperature).
        teacher_logits: `(N, V)` teacher logits over the same vocabulary.
        divergence: `"forward_kl"`, `"reverse_kl"` or `"jsd"`.
        beta: JSD mixture coefficient.
        temperature: Softmax temperature of both distributions.
        teacher_top_k: If set, sum only over the teacher's `k` most likely tokens of each position (no renormalisation:
            both distributions stay the full-vocabulary softmaxes).

    Returns:
        `(N,)` float32 divergences.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ."
        )
    kernel_beta = divergence_beta(divergence, beta)
    log_ps = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kernel_beta == 0.0:
        pt = log_pt.exp()
        terms = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt))
    elif kernel_beta == 1.0:
        terms = log_ps.exp() * (log_ps - log_pt)
    else:
        log_m = torch.logaddexp(log_ps + math.log(1 - kernel_beta), log_pt + math.log(kernel_beta))
        pt = log_pt.exp()
        teacher_terms = torch.where(pt > 0, pt * (log_pt - log_m), torch.zeros_like(pt))
        terms = kernel_beta * teacher_terms + (1 - kernel_beta) * log_ps.exp() * (log_ps - log_m)
    if teacher_top_k is not None:
        k = min(int(teacher_top_k), teacher_logits.shape[-1])
        top = teacher_logits.topk(k, dim=-1).indices
        return terms.gather(-1, top).sum(-1)
    return terms.sum(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token entropy (nats) of `softmax(logits / temperature)`, without gradient."""
    with torch.no_grad():
        log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
        return -(log_p.exp() * log_p).sum(-1)


def _head(weight: torch.Tensor, bias: torch.Tensor | None, vocab_size: int | None):
    if vocab_size is not None and vocab_size < weight.shape[0]:
        weight = weight[:vocab_size]
        bias = bias[:vocab_size] if bias is not None else None
    return weight, bias


def chunked_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence and student entropy from hidden states, without materialising `[N, V]` logits.

    Wraps TRL's `ChunkedDivergenceFunction` (gradients flow to the student's hidden states and head only).

    Args:
        student_hidden: `(N, H_s)` student hidden states of the loss positions.
        student_weight: `(V_s, H_s)` student LM-head weight.
        teacher_hidden: `(N, H_t)` teacher hidden states aligned to the same targets.
        teacher_weight: `(V_t, H_t)` teacher LM-head weight.
        student_bias: Optional student head bias.
        teacher_bias: Optional teacher head bias.
        divergence: `"forward_kl"`, `"reverse_kl"` or `"jsd"`.
        beta: JSD mixture coefficient.
        temperature: Softmax temperature.
        student_logit_scale: Student head multiplier.
        student_softcap: Student final logit soft-capping.
        teacher_logit_scale: Teacher head multiplier.
        teacher_softcap: Teacher final logit soft-capping.
        vocab_size: Compare only the first `vocab_size` tokens (e.g. the teacher's vocabulary when the student got an
            extra mask token). Default: both heads must have the same number of rows.

    Returns:
        `(divergence, entropy)`, both `(N,)` float32.
    """
    student_weight, student_bias = _head(student_weight, student_bias, vocab_size)
    teacher_weight, teacher_bias = _head(teacher_weight, teacher_bias, vocab_size)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"The student head has {student_weight.shape[0]} rows and the teacher head {teacher_weight.shape[0]}; pass "
            "`vocab_size` to compare a common vocabulary."
        )
    if student_hidden.shape[0] == 0:
        zero = student_hidden.sum(-1).float() * 0.0
        return zero, zero.detach()
    return ChunkedDivergenceFunction.apply(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        divergence_beta(divergence, beta),
        temperature,
        student_logit_scale,
        student_softcap,
        teacher_logit_scale,
        teacher_softcap,
    )


def dense_divergence_from_hidden(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    teacher_top_k: int | None = None,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `chunked_divergence`, but materialises the `(N, V)` logits of the loss positions (needed for top-k).

    Args:
        student_hidden: `(N, H_s)` student hidden states of the loss positions.
        student_weight: `(V_s, H_s)` student LM-head weight.
        teacher_hidden: `(N, H_t)` teacher hidden states.
        teacher_weight: `(V_t, H_t)` teacher LM-head weight.
        student_bias: Optional student head bias.
        teacher_bias: Optional teacher head bias.
        divergence: `"forward_kl"`, `"reverse_kl"` or `"jsd"`.
        beta: JSD mixture coefficient.
        temperature: Softmax temperature.
        teacher_top_k: Restrict the sum to the teacher's top-k tokens (no renormalisation).
        student_logit_scale: Student head multiplier.
        student_softcap: Student final logit soft-capping.
        teacher_logit_scale: Teacher head multiplier.
        teacher_softcap: Teacher final logit soft-capping.
        vocab_size: Compare only the first `vocab_size` tokens.

    Returns:
        `(divergence, entropy)`, both `(N,)` float32.
    """
    student_weight, student_bias = _head(student_weight, student_bias, vocab_size)
    teacher_weight, teacher_bias = _head(teacher_weight, teacher_bias, vocab_size)
    student_logits = torch.nn.functional.linear(student_hidden, student_weight.to(student_hidden.dtype), student_bias)
    with torch.no_grad():
        teacher_logits = torch.nn.functional.linear(
            teacher_hidden, teacher_weight.to(teacher_hidden.dtype), teacher_bias
        )
        teacher_logits = postprocess_logits(teacher_logits.float(), teacher_logit_scale, teacher_softcap)
    student_logits = postprocess_logits(student_logits.float(), student_logit_scale, student_softcap)
    per_token = dense_divergence(student_logits, teacher_logits, divergence, beta, temperature, teacher_top_k)
    return per_token, entropy_from_logits(student_logits, temperature)


def opdlm_loss(
    per_token: torch.Tensor,
    row_index: torch.LongTensor,
    num_rows: int,
    denominator: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean of the per-token divergences, then the mean over rows that have at least one loss position.

    Args:
        per_token: `(N,)` divergences of the loss positions.
        row_index: `(N,)` row of each loss position, in `[0, num_rows)`.
        num_rows: Number of rows of the (micro-)batch.
        denominator: Number of rows the mean is taken over. Default: the number of rows of this batch with at least
            one loss position. Pass the count over the whole generation batch (across gradient-accumulation
            micro-batches and processes) to make accumulated gradients equal to the full-batch gradient.

    Returns:
        `(loss, row_means)`: the scalar loss and the `(num_rows,)` per-row means (0 for rows without loss positions).
    """
    per_token = per_token.float()
    sums = torch.zeros(num_rows, dtype=per_token.dtype, device=per_token.device).index_add(0, row_index, per_token)
    counts = torch.zeros(num_rows, dtype=per_token.dtype, device=per_token.device).index_add(
        0, row_index, torch.ones_like(per_token)
    )
    row_means = sums / counts.clamp(min=1.0)
    if denominator is None:
        denominator = (counts > 0).sum()
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(per_token.device, per_token.dtype).clamp(min=1.0)
    else:
        denominator = max(float(denominator), 1.0)
    return row_means.sum() / denominator, row_means
