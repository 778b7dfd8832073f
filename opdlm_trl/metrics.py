"""Training metrics with a single definition each.

"Training tokens" = prompt tokens + completion tokens (non-padding, up to and including the first EOS) of every row
used in a parameter update. It is what the paper counts (0.05-0.08B tokens for OPDLM) and what the trainer accumulates
into `trainer.state.num_input_tokens_seen` (logged as `num_tokens`, as TRL does).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def count_training_tokens(prompt_mask: torch.Tensor, completion_mask: torch.Tensor) -> int:
    """Number of training tokens of a batch of rows: real prompt tokens plus generated tokens up to the first EOS.

    Args:
        prompt_mask: `(B, L0)`, 1 on real (non-padding) prompt tokens.
        completion_mask: `(B, L1)`, 1 on generated tokens up to and including the first EOS, 0 after it.

    Returns:
        The token count.
    """
    return int(prompt_mask.bool().sum().item() + completion_mask.bool().sum().item())


def eos_fraction(completion_ids: torch.Tensor, completion_mask: torch.Tensor, eos_token_ids) -> float:
    """Fraction of rows whose completion contains an EOS (the rest were cut by the length limit).

    Args:
        completion_ids: `(B, L1)` completions.
        completion_mask: `(B, L1)`, 1 on generated tokens.
        eos_token_ids: EOS id(s).

    Returns:
        A float in `[0, 1]` (0 for an empty batch).
    """
    if completion_ids.shape[0] == 0:
        return 0.0
    eos = torch.as_tensor(eos_token_ids, device=completion_ids.device).reshape(-1)
    hit = (torch.isin(completion_ids, eos) & completion_mask.bool()).any(-1)
    return hit.float().mean().item()


@contextmanager
def timer(store: dict, key: str, device: torch.device | None = None) -> Iterator[None]:
    """Adds the wall time of the block (seconds) to `store[key]`, synchronising CUDA first for honest numbers.

    Args:
        store: A dict of accumulated seconds.
        key: The entry to add to.
        device: The device whose queued work should be finished before reading the clock.
    """
    sync = device is not None and device.type == "cuda" and torch.cuda.is_available()
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if sync:
            torch.cuda.synchronize(device)
        store[key] = store.get(key, 0.0) + time.perf_counter() - start
