"""Divergences between the teacher's and the student's token distributions, and OPDLM's loss reduction.

Two paths compute the same per-token divergences:

- `chunked_divergence`: from both models' hidden states and LM heads, through TRL's
  `ChunkedDivergenceFunction`, which projects to the vocabulary tile by tile so that neither model's `[N, V]` logits
  exist in full (forward and backward).
- `dense_divergence`: from logits; needed for `teacher_top_k` (a sum restricted to the teacher's top-k tokens, without
  renormalisation; such a partial sum is no longer a divergence and can be negative, e.g. for the reverse KL).
  `dense_divergence_from_hidden` projects the hidden states first (all `[N, V]` logits at once: the reference).
- `chunked_dense_divergence`: the same values as `dense_divergence_from_hidden`, a few hundred positions at a time
  (forward and backward), so `teacher_top_k` with a ~150k vocabulary never holds more than one chunk's logits. It also
  serves the full vocabulary when `vocab_size` cuts the heads and their weights are DeepSpeed ZeRO-3 partitions (TRL's
  kernel can only gather whole parameters).

Under DeepSpeed ZeRO-3 both chunked paths gather the (partitioned) LM-head weights for the duration of their forward and
backward, as TRL's kernel does; the caller must run them inside the model's forward (`_ForwardRedirection`).

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
from trl.trainer.utils import maybe_gather_lm_head_ctx


# Positions per chunk of `chunked_dense_divergence`: as many as keep one `[chunk, V]` fp32 tile at about this many
# elements (2**25 = 128 MiB; with ~150k tokens, about 220 positions).
DENSE_CHUNK_ELEMENTS = 1 << 25


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
    zero3 = _is_zero3_param(student_weight) or _is_zero3_param(teacher_weight)
    if zero3 and vocab_size is not None and vocab_size < max(_rows(student_weight), _rows(teacher_weight)):
        # A slice of a ZeRO-3 partition cannot be gathered: project a few positions at a time instead.
        return chunked_dense_divergence(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            divergence=divergence,
            beta=beta,
            temperature=temperature,
            student_logit_scale=student_logit_scale,
            student_softcap=student_softcap,
            teacher_logit_scale=teacher_logit_scale,
            teacher_softcap=teacher_softcap,
            vocab_size=vocab_size,
        )
    if not zero3:  # (ZeRO-3 partitions are whole here: the kernel gathers them)
        student_weight, student_bias = _head(student_weight, student_bias, vocab_size)
        teacher_weight, teacher_bias = _head(teacher_weight, teacher_bias, vocab_size)
    if _rows(student_weight) != _rows(teacher_weight):
        raise ValueError(
            f"The student head has {_rows(student_weight)} rows and the teacher head {_rows(teacher_weight)}; pass "
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


def _is_zero3_param(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and hasattr(tensor, "ds_id")


def _rows(tensor: torch.Tensor) -> int:
    """First dimension of a (possibly DeepSpeed ZeRO-3 partitioned, i.e. locally empty) parameter."""
    return int(tensor.ds_shape[0]) if hasattr(tensor, "ds_shape") else int(tensor.shape[0])


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def _half_on_cuda(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cuda" and tensor.dtype in (torch.float16, torch.bfloat16)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` with an fp32 result (on CUDA, half inputs are multiplied as they are, without an fp32 copy)."""
    if _half_on_cuda(a) and _half_on_cuda(b):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch < 2.8
            pass
    return torch.mm(a.float(), b.float())


def _project(hidden, weight, bias, vocab, dtype, scale, softcap):
    """fp32 logits of the first `vocab` tokens: `hidden @ weight[:vocab].T (+ bias)`, then the head's post-processing."""
    logits = _mm_fp32(hidden.to(dtype), weight[:vocab].to(device=hidden.device, dtype=dtype).t())
    if bias is not None:
        logits = logits + bias[:vocab].to(logits.device).float()
    return postprocess_logits(logits, scale, softcap)


class _ChunkedDenseDivergence(torch.autograd.Function):
    """`dense_divergence_from_hidden`, a chunk of positions at a time: only one chunk's `[n, V]` logits are alive, in the
    forward and in the backward (which recomputes them). Gradients flow to the student's hidden states, head weight and
    bias (the rows beyond `vocab` get zeros); the entropy has none."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, opts):
        ctx.set_materialize_grads(False)
        n_rows = student_hidden.shape[0]
        s_dtype, t_dtype = _compute_dtype(student_hidden), _compute_dtype(teacher_hidden)
        per_token = torch.zeros(n_rows, device=student_hidden.device, dtype=torch.float32)
        entropy = torch.zeros_like(per_token)
        with (
            maybe_gather_lm_head_ctx(student_weight, student_bias),
            maybe_gather_lm_head_ctx(teacher_weight, teacher_bias),
        ):
            vocab = opts["vocab"] or student_weight.shape[0]
            if student_weight.shape[0] < vocab or teacher_weight.shape[0] < vocab:
                raise ValueError(
                    f"The student head has {student_weight.shape[0]} rows and the teacher head "
                    f"{teacher_weight.shape[0]}; pass `vocab_size` to compare a common vocabulary."
                )
            chunk = opts["chunk"] or max(1, DENSE_CHUNK_ELEMENTS // vocab)
            for start in range(0, n_rows, chunk):
                sl = slice(start, min(start + chunk, n_rows))
                s_logits = _project(
                    student_hidden[sl], student_weight, student_bias, vocab, s_dtype, *opts["student_post"]
                )
                t_logits = _project(
                    teacher_hidden[sl], teacher_weight, teacher_bias, vocab, t_dtype, *opts["teacher_post"]
                )
                per_token[sl] = dense_divergence(s_logits, t_logits, *opts["divergence"])
                entropy[sl] = entropy_from_logits(s_logits, opts["divergence"][2])
                del s_logits, t_logits
        ctx.save_for_backward(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias
        )
        ctx.dtypes, ctx.opts, ctx.vocab, ctx.chunk = (s_dtype, t_dtype), opts, vocab, chunk
        ctx.mark_non_differentiable(entropy)
        return per_token, entropy

    @staticmethod
    def backward(ctx, grad_per_token, _grad_entropy):
        if grad_per_token is None:
            return (None,) * 7
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        (s_dtype, t_dtype), opts, vocab, chunk = ctx.dtypes, ctx.opts, ctx.vocab, ctx.chunk
        grad_per_token = grad_per_token.float()
        grad_hidden = grad_weight = grad_bias = None
        with (
            maybe_gather_lm_head_ctx(student_weight, student_bias),
            maybe_gather_lm_head_ctx(teacher_weight, teacher_bias),
        ):
            device = student_hidden.device
            if need_hidden:
                grad_hidden = torch.zeros(student_hidden.shape, device=device, dtype=torch.float32)
            if need_weight:
                grad_weight = torch.zeros(student_weight.shape, device=student_weight.device, dtype=torch.float32)
            if need_bias:
                grad_bias = torch.zeros(student_bias.shape, device=student_bias.device, dtype=torch.float32)
            w_s = student_weight[:vocab].to(device=device, dtype=s_dtype)
            for start in range(0, student_hidden.shape[0], chunk):
                sl = slice(start, min(start + chunk, student_hidden.shape[0]))
                h_s = student_hidden[sl].detach().to(s_dtype)
                with torch.no_grad():
                    raw = _mm_fp32(h_s, w_s.t())
                    if student_bias is not None:
                        raw += student_bias[:vocab].to(device).float()
                    t_logits = _project(
                        teacher_hidden[sl], teacher_weight, teacher_bias, vocab, t_dtype, *opts["teacher_post"]
                    )
                with torch.enable_grad():
                    raw.requires_grad_(True)
                    per_token = dense_divergence(
                        postprocess_logits(raw, *opts["student_post"]), t_logits, *opts["divergence"]
                    )
                    (grad_raw,) = torch.autograd.grad(per_token, raw, grad_per_token[sl])
                del raw, t_logits, per_token
                if need_hidden:
                    grad_hidden[sl] += _mm_fp32(grad_raw.to(s_dtype) if _half_on_cuda(h_s) else grad_raw, w_s)
                if need_weight:
                    grad_weight[:vocab] += _mm_fp32(
                        grad_raw.t().to(s_dtype) if _half_on_cuda(h_s) else grad_raw.t(), h_s
                    )
                if need_bias:
                    grad_bias[:vocab] += grad_raw.sum(0)
        return (
            grad_hidden.to(student_hidden.dtype) if grad_hidden is not None else None,
            grad_weight.to(student_weight.dtype) if grad_weight is not None else None,
            grad_bias.to(student_bias.dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
        )


def chunked_dense_divergence(
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
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dense_divergence_from_hidden` (same arguments, same values), computed `chunk_size` positions at a time.

    Peak memory is that of one chunk's `[chunk_size, V]` logits instead of all `[N, V]`, in the forward and in the
    backward (which recomputes each chunk's logits). Needed for `teacher_top_k` with large vocabularies.

    Args:
        chunk_size: Positions per chunk. Default: `DENSE_CHUNK_ELEMENTS // V` (about 220 for a 150k vocabulary).
        Others: as in `dense_divergence_from_hidden`.

    Returns:
        `(divergence, entropy)`, both `(N,)` float32.
    """
    if student_hidden.shape[0] == 0:
        zero = student_hidden.sum(-1).float() * 0.0
        return zero, zero.detach()
    if vocab_size is None and _rows(student_weight) != _rows(teacher_weight):
        raise ValueError(
            f"The student head has {_rows(student_weight)} rows and the teacher head {_rows(teacher_weight)}; pass "
            "`vocab_size` to compare a common vocabulary."
        )
    opts = {
        "vocab": vocab_size,
        "chunk": chunk_size,
        "divergence": (divergence, beta, temperature, teacher_top_k),
        "student_post": (student_logit_scale, student_softcap),
        "teacher_post": (teacher_logit_scale, teacher_softcap),
    }
    divergence_beta(divergence, beta)  # validates the name (and beta) before any work
    return _ChunkedDenseDivergence.apply(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, opts
    )


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
