"""Training rows of OPDLM (BD3LM layout), as pure tensor functions.

One training row holds, in a single forward of the student,

    [ prompt (L0, left-padded) | clean response x0 (L1) | noisy response x_t (L1) ]

with the position ids of x_t repeating those of x0, and a 4-D attention mask (besides padding):

- prompt rows: block-causal, blocks aligned to the prompt END (so the response starts on a block boundary);
- x0 block j rows: everything up to the end of x0 block j;
- x_t block j rows: the prompt, x0 blocks < j, and x_t block j itself.

The x_t logits of such a row equal those of the sampler's forward on `[prompt | x0 blocks < j | x_t block j]` for every
block j at once. `L1` is always a multiple of the block size (completions are right-padded to one), so every region
boundary is a block boundary.

Padding (left padding of the prompt, everything after a completion's first EOS) is never attended by a real token. A
padding query attends to itself only (its output is never used), so no softmax row is empty on any kernel.

The noisy state x_t of each block is chosen from the rollout's own trajectory (`"one_state_per_block"`) or by random
masking (`"random_mask"`, the paper's OPDLM_off); see `select_noise`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from opdlm_trl.attention import make_4d_mask, position_ids_from_mask


@dataclass
class TrainingRows:
    """A batch of OPDLM training rows.

    Attributes:
        input_ids: `(B, L0 + 2 * L1)` ids of `[prompt | x0 | x_t]`.
        position_ids: `(B, L0 + 2 * L1)` position ids; those of x_t repeat those of x0.
        valid: `(B, L0 + 2 * L1)` bool, True on real (non-padding) tokens.
        prompt_length: L0.
        completion_length: L1 (a multiple of the block size).
        block_size: Block size b.
    """

    input_ids: torch.LongTensor
    position_ids: torch.LongTensor
    valid: torch.BoolTensor
    prompt_length: int
    completion_length: int
    block_size: int

    @property
    def noisy_slice(self) -> slice:
        """Slice of the x_t part along the sequence dimension."""
        start = self.prompt_length + self.completion_length
        return slice(start, start + self.completion_length)

    def mask_function(self) -> Callable:
        """The row's layout as a transformers mask function (see `row_mask_function`)."""
        return row_mask_function(self.prompt_length, self.completion_length, self.block_size, self.valid)

    def attention_mask(self, model: torch.nn.Module) -> torch.Tensor | object:
        """The row's layout materialised for `model`'s attention kernel (`attention.make_4d_mask`), in the dtype of its
        input embeddings (float32 for a quantized model), on the rows' device."""
        dtype = model.get_input_embeddings().weight.dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        batch, total = self.input_ids.shape
        return make_4d_mask(
            model, self.mask_function(), batch, total, total, device=self.input_ids.device, dtype=dtype
        )


def pad_to_block_multiple(tensor: torch.Tensor, block_size: int, value: int | bool) -> torch.Tensor:
    """Right-pads the last dimension of `tensor` to a multiple of `block_size` with `value`.

    Args:
        tensor: A `(B, L)` tensor.
        block_size: Block size b.
        value: Fill value.

    Returns:
        A `(B, ceil(L / b) * b)` tensor (the input itself when `L` is already a multiple).
    """
    extra = (-tensor.shape[-1]) % block_size
    if extra == 0:
        return tensor
    fill = torch.full((*tensor.shape[:-1], extra), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, fill], dim=-1)


def _uniform(shape: Sequence[int], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    # Draw on the generator's device (the global CPU RNG by default, restored by Trainer checkpoints), then move.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(tuple(shape), generator=generator, device=gen_device).to(device)


def select_noise_one_state_per_block(
    trajectory: torch.LongTensor, block_size: int, generator: torch.Generator | None = None
) -> torch.BoolTensor:
    """OPDLM's noisy states: per block, a uniformly chosen denoising step of the block's own trajectory.

    For every block, the set of steps that committed at least one (valid) position of the block is collected, one of
    them, `s`, is picked uniformly, and the positions committed at step `s` or later are masked. At least one position
    is therefore masked in every block that has a valid position.

    Args:
        trajectory: `(B, L1)`, for each completion position the 0-based step (within its block) at which it was
            committed; negative where nothing was generated. `L1` must be a multiple of `block_size`.
        block_size: Block size b.
        generator: Optional RNG (default: the global torch RNG).

    Returns:
        `(B, L1)` bool, True where x_t holds the mask token.
    """
    batch, length = trajectory.shape
    if length % block_size:
        raise ValueError(f"The completion length {length} is not a multiple of block_size={block_size}.")
    if length == 0:
        return torch.zeros_like(trajectory, dtype=torch.bool)
    valid = trajectory >= 0
    blocks = trajectory.view(batch, length // block_size, block_size)
    num_steps = int(trajectory.max().clamp(min=0).item()) + 1
    # present[b, j, s]: step s committed at least one valid position of block j.
    one_hot = torch.nn.functional.one_hot(blocks.clamp(min=0), num_steps).bool()
    present = (one_hot & valid.view_as(blocks).unsqueeze(-1)).any(dim=2)
    # The argmax of i.i.d. uniforms over the present steps is a uniform pick among them.
    scores = _uniform(present.shape, trajectory.device, generator).masked_fill(~present, -1.0)
    chosen = scores.argmax(dim=-1, keepdim=True)  # (B, num_blocks, 1)
    noise = (blocks >= chosen) & valid.view_as(blocks)
    return noise.view(batch, length)


def select_noise_random(
    valid: torch.BoolTensor,
    block_size: int,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
) -> torch.BoolTensor:
    """Random masking of the on-policy sequence (the paper's OPDLM_off ablation; also the BD3LM baseline's masking).

    Per block, `t ~ U(0, 1)` and each valid position is masked with probability `t`; a block with valid positions but no
    mask gets one uniformly chosen valid position masked.

    Args:
        valid: `(B, L1)` bool, True on generated positions. `L1` must be a multiple of `block_size`.
        block_size: Block size b.
        generator: Optional RNG (default: the global torch RNG).
        t: Optional `(B, L1 // block_size)` masking probabilities of the blocks (default: drawn from U(0, 1)). Pass them
            when the caller needs them, e.g. for a 1/t loss weight.

    Returns:
        `(B, L1)` bool, True where x_t holds the mask token.
    """
    batch, length = valid.shape
    if length % block_size:
        raise ValueError(f"The completion length {length} is not a multiple of block_size={block_size}.")
    num_blocks = length // block_size
    valid_blocks = valid.view(batch, num_blocks, block_size)
    if t is None:
        t = _uniform((batch, num_blocks, 1), valid.device, generator)
    else:
        if tuple(t.shape) != (batch, num_blocks):
            raise ValueError(f"t must have shape {(batch, num_blocks)} (one value per block), got {tuple(t.shape)}.")
        t = t.to(valid.device).unsqueeze(-1)
    noise = (_uniform((batch, num_blocks, block_size), valid.device, generator) < t) & valid_blocks
    # Blocks left without a mask: mask one uniformly chosen valid position.
    pick = _uniform((batch, num_blocks, block_size), valid.device, generator).masked_fill(~valid_blocks, -1.0)
    forced = torch.zeros_like(noise).scatter_(2, pick.argmax(-1, keepdim=True), True) & valid_blocks
    needs_one = ~noise.any(-1, keepdim=True)
    noise = torch.where(needs_one, forced, noise)
    return noise.view(batch, length)


def select_noise(
    state_selection: str,
    trajectory: torch.LongTensor,
    block_size: int,
    generator: torch.Generator | None = None,
) -> torch.BoolTensor:
    """Dispatches to `select_noise_one_state_per_block` or `select_noise_random`.

    Args:
        state_selection: `"one_state_per_block"` or `"random_mask"`.
        trajectory: `(B, L1)` commit steps, negative where nothing was generated.
        block_size: Block size b.
        generator: Optional RNG.

    Returns:
        `(B, L1)` bool noise mask.
    """
    if state_selection == "one_state_per_block":
        return select_noise_one_state_per_block(trajectory, block_size, generator)
    if state_selection == "random_mask":
        return select_noise_random(trajectory >= 0, block_size, generator)
    raise ValueError(f"Unknown state_selection {state_selection!r}: use 'one_state_per_block' or 'random_mask'.")


def loss_mask(
    noise_mask: torch.BoolTensor,
    completion_ids: torch.LongTensor,
    completion_mask: torch.Tensor,
    eos_token_ids: Sequence[int] | int | None,
    loss_on_eos: bool = True,
) -> torch.BoolTensor:
    """Positions of x_t that carry the loss: masked, not padding, not after the first EOS (nor the EOS itself unless
    `loss_on_eos`).

    Args:
        noise_mask: `(B, L1)` bool, True where x_t is masked.
        completion_ids: `(B, L1)` clean completion x0.
        completion_mask: `(B, L1)`, 1 on generated tokens up to and including the first EOS, 0 after it.
        eos_token_ids: EOS id(s).
        loss_on_eos: Whether the first EOS is a loss position.

    Returns:
        `(B, L1)` bool.
    """
    valid = completion_mask.bool()
    mask = noise_mask & valid
    if not loss_on_eos and eos_token_ids is not None:
        eos = torch.as_tensor(eos_token_ids, device=completion_ids.device).reshape(-1)
        is_eos = torch.isin(completion_ids, eos) & valid
        # Everything after the first EOS is already invalid; still, only the first EOS is excluded.
        first = is_eos & (is_eos.long().cumsum(-1) == 1)
        mask = mask & ~first
    return mask


def row_mask_function(
    prompt_length: int, completion_length: int, block_size: int, valid: torch.BoolTensor | None = None
) -> Callable:
    """The training row's attention layout as a transformers mask function `f(batch, head, q, kv) -> bool`.

    Written with broadcasting tensor ops (usable by `make_4d_mask` / transformers' `sdpa_mask`). Padding is part of the
    function (keys with `valid == False` are never attended, a padding query attends to itself only), so do not AND a
    2-D padding mask on top of it.

    Args:
        prompt_length: L0.
        completion_length: L1, a multiple of `block_size`.
        block_size: Block size b.
        valid: Optional `(B, L0 + 2 * L1)` bool of real tokens. `None` means no padding.

    Returns:
        The mask function.
    """
    if completion_length % block_size:
        raise ValueError(f"completion_length={completion_length} is not a multiple of block_size={block_size}.")
    p0 = prompt_length
    c0 = prompt_length + completion_length  # start of x_t

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        q_ctx = q_idx < c0  # query in [prompt | x0]
        kv_ctx = kv_idx < c0
        # Block ids of [prompt | x0], aligned to the prompt end (prompt blocks are negative).
        q_blk_ctx = torch.div(q_idx - p0, block_size, rounding_mode="floor")
        kv_blk_ctx = torch.div(kv_idx - p0, block_size, rounding_mode="floor")
        # Block ids of x_t.
        q_blk_xt = torch.div(q_idx - c0, block_size, rounding_mode="floor")
        kv_blk_xt = torch.div(kv_idx - c0, block_size, rounding_mode="floor")
        ctx_rows = q_ctx & kv_ctx & (kv_blk_ctx <= q_blk_ctx)
        xt_rows = ~q_ctx & ((kv_ctx & (kv_blk_ctx < q_blk_xt)) | (~kv_ctx & (kv_blk_xt == q_blk_xt)))
        allowed = ctx_rows | xt_rows
        if valid is not None:
            allowed = (allowed & valid[batch_idx, kv_idx] & valid[batch_idx, q_idx]) | (q_idx == kv_idx)
        return allowed

    return inner


def dense_mask(mask_function: Callable, batch_size: int, length: int, device: torch.device | str = "cpu"):
    """Evaluates a mask function on a full `(B, 1, length, length)` grid (for inspection and tests).

    Args:
        mask_function: A transformers-style mask function.
        batch_size: B.
        length: Query and key length.
        device: Device.

    Returns:
        `(B, 1, length, length)` bool tensor.
    """
    b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(length, device=device).view(1, 1, -1, 1)
    k = torch.arange(length, device=device).view(1, 1, 1, -1)
    return mask_function(b, h, q, k).expand(batch_size, 1, length, length)


def build_training_rows(
    prompt_ids: torch.LongTensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.LongTensor,
    completion_mask: torch.Tensor,
    noise_mask: torch.BoolTensor,
    mask_token_id: int,
    block_size: int,
    pad_token_id: int,
) -> TrainingRows:
    """Builds `[prompt | x0 | x_t]` rows.

    Args:
        prompt_ids: `(B, L0)` left-padded prompts.
        prompt_mask: `(B, L0)`, 1 on real prompt tokens.
        completion_ids: `(B, L1)` clean completions x0 (right-padded).
        completion_mask: `(B, L1)`, 1 on generated tokens up to and including the first EOS.
        noise_mask: `(B, L1)` bool, True where x_t is masked.
        mask_token_id: Id of the mask token.
        block_size: Block size b; completions are right-padded to a multiple of it.
        pad_token_id: Id written at padding positions.

    Returns:
        The `TrainingRows`.
    """
    completion_ids = pad_to_block_multiple(completion_ids, block_size, pad_token_id)
    completion_mask = pad_to_block_multiple(completion_mask.long(), block_size, 0).bool()
    noise_mask = pad_to_block_multiple(noise_mask.bool(), block_size, False) & completion_mask
    prompt_mask = prompt_mask.bool()
    prompt_ids = prompt_ids.masked_fill(~prompt_mask, pad_token_id)
    x0 = completion_ids.masked_fill(~completion_mask, pad_token_id)
    xt = x0.masked_fill(noise_mask, mask_token_id)
    context_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    context_positions = position_ids_from_mask(context_mask)
    prompt_length = prompt_ids.shape[1]
    return TrainingRows(
        input_ids=torch.cat([prompt_ids, x0, xt], dim=1),
        position_ids=torch.cat([context_positions, context_positions[:, prompt_length:]], dim=1),
        valid=torch.cat([context_mask, completion_mask], dim=1),
        prompt_length=prompt_length,
        completion_length=completion_ids.shape[1],
        block_size=block_size,
    )
