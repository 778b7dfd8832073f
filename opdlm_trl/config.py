"""Configuration of the OPDLM trainer: TRL's `DistillationConfig` plus the block-diffusion knobs."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from trl import DistillationConfig


STATE_SELECTIONS = ("one_state_per_block", "random_mask")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def cosine_length_curriculum(
    rollout: int, start_length: int, final_length: int, num_rollouts: int, block_size: int = 1
) -> int:
    """Maximum completion length of a rollout under a cosine ramp (the paper's rollout-length curriculum).

    The length goes from `start_length` (rollout 0) to `final_length` (rollout `num_rollouts` and later) along
    `start + (final - start) * (1 - cos(pi * rollout / num_rollouts)) / 2`, rounded to the nearest multiple of
    `block_size` and clamped to `[block_size, final_length]` (the final length itself is returned unrounded).

    Args:
        rollout: 0-based index of the rollout (one rollout per optimizer step).
        start_length: Length of the first rollout (paper: 100).
        final_length: Length reached at the end of the ramp (paper: 4,000).
        num_rollouts: Number of rollouts of the ramp. `0` disables the ramp (always `final_length`).
        block_size: Lengths are rounded to a multiple of it.

    Returns:
        The maximum completion length of this rollout.
    """
    if num_rollouts <= 0 or rollout >= num_rollouts:
        return final_length
    progress = max(rollout, 0) / num_rollouts
    length = start_length + (final_length - start_length) * (1.0 - math.cos(math.pi * progress)) / 2.0
    length = int(math.floor(length / block_size + 0.5)) * block_size  # round half up
    return max(min(length, final_length), min(block_size, final_length))


@dataclass
class OPDLMConfig(DistillationConfig):
    r"""
    Configuration class for the [`~opdlm_trl.OPDLMTrainer`].

    Extends TRL's [`~trl.DistillationConfig`] with the parameters of OPDLM (self on-policy distillation of an
    autoregressive LM into a block-diffusion LM). All parameters of [`~trl.DistillationConfig`] keep their meaning, with
    these exceptions: `temperature`, `top_k` and `top_p` control the diffusion sampler of the rollouts (not the loss;
    see `loss_temperature`), `beta` is only used by `divergence="jsd"`, and `use_vllm` is not supported (vLLM has no
    block-diffusion sampler).

    Parameters:
        > Parameters that control the diffusion student

        block_size (`int`, *optional*, defaults to `4`):
            Block size b of the block-diffusion student (paper: 4). Prompts are split into blocks aligned to their end,
            responses are generated block by block.
        mask_token (`str`, *optional*):
            Mask token used when converting a causal model (see `convert_to_dlm`). Default: the tokenizer's mask token,
            else an unused reserved special token, else a new `<|mask|>` token (embeddings are resized).

        > Parameters that control the rollouts (diffusion sampler)

        steps_per_block (`int`, *optional*, defaults to `4`):
            Denoising steps per block of the static schedule (`block_size / steps_per_block` tokens committed per step);
            with `threshold` set, the minimum number of tokens committed per step under the dynamic rule.
        threshold (`float` or `None`, *optional*, defaults to `0.9`):
            Dynamic commit rule of the paper's rollouts: commit every masked position whose confidence exceeds it (and
            at least the static quota). `None` uses the static schedule only.
        max_prompt_length (`int` or `None`, *optional*, defaults to `512`):
            Maximum prompt length in tokens. Longer prompts are truncated from the left (their start is dropped), with a
            warning. `None` disables truncation.
        curriculum_start_length (`int` or `None`, *optional*):
            Start of the rollout-length curriculum: the maximum completion length grows from this value to
            `max_completion_length` over `curriculum_rollouts` rollouts along a cosine ramp, rounded to a multiple of
            `block_size` (paper: 100 to 4,000). `None` disables the curriculum.
        curriculum_rollouts (`int`, *optional*, defaults to `0`):
            Number of rollouts (one per optimizer step) over which the rollout-length curriculum ramps up.

        > Parameters that control the training rows and the loss

        state_selection (`str`, *optional*, defaults to `"one_state_per_block"`):
            How the noisy state x_t of each response block is chosen. `"one_state_per_block"` (OPDLM): pick uniformly one
            denoising step that committed something in the block and mask the positions committed at that step or
            later. `"random_mask"` (the paper's OPDLM_off ablation): t ~ U(0, 1) per block, each position masked with
            probability t, at least one mask per block.
        divergence (`str`, *optional*, defaults to `"forward_kl"`):
            Divergence between the teacher's and the student's token distributions at the masked positions:
            `"forward_kl"` (KL(teacher || student), the paper's), `"reverse_kl"` (KL(student || teacher)) or `"jsd"`
            (generalized Jensen-Shannon with mixture `(1 - beta) * student + beta * teacher`).
        beta (`float`, *optional*, defaults to `0.5`):
            Mixture coefficient of `divergence="jsd"`, in `(0, 1)`. Ignored by the KL divergences.
        teacher_top_k (`int` or `None`, *optional*):
            Restrict the divergence sum to the teacher's top-k tokens at each position, without renormalisation (paper:
            16 for 4B/8B students). `None` sums over the whole vocabulary.
        loss_temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature applied to both models' logits in the loss.
        loss_on_eos (`bool`, *optional*, defaults to `True`):
            Whether the first EOS of a completion is a loss position (when masked). Positions after it never are.

    > [!NOTE]
    > These parameters have default values different from [`~trl.DistillationConfig`]:
    > - `beta`: Defaults to `0.5` (standard JSD) instead of `1.0`, and only applies to `divergence="jsd"`.
    > - `logging_steps`: Defaults to `1` instead of `10`: OPDLM runs are a few hundred rollouts long.
    """

    # Parameters whose default values are overridden from DistillationConfig
    logging_steps: float = field(
        default=1,
        metadata={
            "help": "Log every X updates steps. Should be an integer or a float in range `[0,1)`. If smaller than 1, "
            "will be interpreted as ratio of total training steps."
        },
    )
    beta: float = field(
        default=0.5,
        metadata={
            "help": "Mixture coefficient of `divergence='jsd'` (mixture (1 - beta) * student + beta * teacher), in "
            "(0, 1). Ignored by the KL divergences."
        },
    )

    # Parameters that control the diffusion student
    block_size: int = field(
        default=4,
        metadata={
            "help": "Block size b of the block-diffusion student (paper: 4). Prompts are split into blocks aligned to "
            "their end; responses are generated block by block."
        },
    )
    mask_token: str | None = field(
        default=None,
        metadata={
            "help": "Mask token used when converting a causal model. Default: the tokenizer's mask token, else an "
            "unused reserved special token, else a new `<|mask|>` token (embeddings are resized)."
        },
    )

    # Parameters that control the rollouts (diffusion sampler)
    steps_per_block: int = field(
        default=4,
        metadata={
            "help": "Denoising steps per block of the static schedule (block_size / steps_per_block tokens per step); "
            "with `threshold`, the minimum commit quota per step."
        },
    )
    threshold: float | None = field(
        default=0.9,
        metadata={
            "help": "Dynamic commit rule of the rollouts: commit every masked position whose confidence exceeds it "
            "(and at least the static quota). `None` uses the static schedule only."
        },
    )
    max_prompt_length: int | None = field(
        default=512,
        metadata={
            "help": "Maximum prompt length in tokens. Longer prompts are truncated from the left, with a warning. "
            "`None` disables truncation."
        },
    )
    curriculum_start_length: int | None = field(
        default=None,
        metadata={
            "help": "Start of the rollout-length curriculum: the maximum completion length grows from this value to "
            "`max_completion_length` over `curriculum_rollouts` rollouts (cosine ramp, rounded to `block_size`). "
            "`None` disables the curriculum."
        },
    )
    curriculum_rollouts: int = field(
        default=0,
        metadata={
            "help": "Number of rollouts (one per optimizer step) over which the rollout-length curriculum ramps up."
        },
    )

    # Parameters that control the training rows and the loss
    state_selection: str = field(
        default="one_state_per_block",
        metadata={
            "help": "How the noisy state of each block is chosen: 'one_state_per_block' (a uniformly chosen denoising "
            "step of the block's own trajectory) or 'random_mask' (t ~ U(0, 1) per block, the paper's OPDLM_off).",
            "choices": list(STATE_SELECTIONS),
        },
    )
    divergence: str = field(
        default="forward_kl",
        metadata={
            "help": "Divergence at the masked positions: 'forward_kl' (KL(teacher || student)), 'reverse_kl' "
            "(KL(student || teacher)) or 'jsd' (generalized JSD with `beta`).",
            "choices": list(DIVERGENCES),
        },
    )
    teacher_top_k: int | None = field(
        default=None,
        metadata={
            "help": "Restrict the divergence sum to the teacher's top-k tokens, without renormalisation (paper: 16 for "
            "4B/8B). `None` sums over the whole vocabulary."
        },
    )
    loss_temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature applied to both models' logits in the loss."},
    )
    loss_on_eos: bool = field(
        default=True,
        metadata={
            "help": "Whether the first EOS of a completion is a loss position (when masked). Positions after it never "
            "are."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer (paper: 4), got {self.block_size!r}.")
        if not isinstance(self.steps_per_block, int) or not 1 <= self.steps_per_block <= self.block_size:
            raise ValueError(
                f"steps_per_block must be an integer in [1, block_size={self.block_size}], got {self.steps_per_block!r}."
            )
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1] or None, got {self.threshold}.")
        if self.state_selection not in STATE_SELECTIONS:
            raise ValueError(f"state_selection must be one of {STATE_SELECTIONS}, got {self.state_selection!r}.")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}.")
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(
                f"divergence='jsd' needs beta strictly between 0 and 1 (0.5 is the standard JSD), got {self.beta}. "
                "Use divergence='forward_kl' or 'reverse_kl' for the limits."
            )
        if self.teacher_top_k is not None and (not isinstance(self.teacher_top_k, int) or self.teacher_top_k < 1):
            raise ValueError(f"teacher_top_k must be a positive integer or None, got {self.teacher_top_k!r}.")
        if not self.loss_temperature > 0:
            raise ValueError(f"loss_temperature must be positive, got {self.loss_temperature}.")
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ValueError(
                f"max_completion_length must be a positive integer for diffusion rollouts, got "
                f"{self.max_completion_length!r}."
            )
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be a positive integer or None, got {self.max_prompt_length}.")
        if self.curriculum_start_length is not None:
            if not 1 <= self.curriculum_start_length <= self.max_completion_length:
                raise ValueError(
                    f"curriculum_start_length must be in [1, max_completion_length={self.max_completion_length}], "
                    f"got {self.curriculum_start_length}."
                )
            if self.curriculum_rollouts < 1:
                raise ValueError(
                    "curriculum_start_length is set but curriculum_rollouts is not: set curriculum_rollouts to the "
                    "number of rollouts over which the rollout length ramps up (e.g. 100)."
                )
        if self.curriculum_rollouts < 0:
            raise ValueError(f"curriculum_rollouts must be >= 0, got {self.curriculum_rollouts}.")
        ignored = [
            name
            for name, value, default in (
                ("min_p", self.min_p, None),
                ("repetition_penalty", self.repetition_penalty, 1.0),
                ("generation_kwargs", self.generation_kwargs, None),
                ("cache_implementation", self.cache_implementation, None),
            )
            if value != default
        ]
        if ignored:
            warnings.warn(
                f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored by OPDLM: rollouts use the "
                "block-diffusion sampler, which takes temperature, top_k, top_p, steps_per_block and threshold.",
                UserWarning,
                stacklevel=2,
            )
        if self.use_vllm:
            raise ValueError(
                "use_vllm=True is not supported by OPDLM: rollouts use the block-diffusion sampler "
                "(`opdlm_trl.sampler.diffusion_generate`), which vLLM does not implement."
            )

    def rollout_length(self, rollout: int) -> int:
        """Maximum completion length of rollout `rollout` (0-based), following the configured curriculum.

        Args:
            rollout: Index of the rollout (the trainer uses `state.global_step`, one rollout per optimizer step).

        Returns:
            `max_completion_length` when no curriculum is configured, else the cosine-ramped length.
        """
        if self.curriculum_start_length is None:
            return self.max_completion_length
        return cosine_length_curriculum(
            rollout,
            self.curriculum_start_length,
            self.max_completion_length,
            self.curriculum_rollouts,
            self.block_size,
        )
