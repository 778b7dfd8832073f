"""The block-diffusion SFT baseline (BD3LM): the prior-work conversion objective, as a TRL trainer.

`BD3LMTrainer` converts a causal LM with `convert_to_dlm` exactly as `OPDLMTrainer` does (same weights, block-causal
attention, a mask token) and trains it with the masked-diffusion cross-entropy of BD3LM on reference completions:

- the data is TRL's prompt-completion format (`"prompt"` and `"completion"` columns, standard or conversational),
  tokenized by `SFTTrainer` (an EOS is appended to the completion), and by default the rest of the completion's last
  block is filled with EOS tokens that are trained on too (`pad_last_block_with_eos`);
- the collator builds the same training row as OPDLM, `[prompt | x0 | x_t]` with the BD3LM attention mask
  (`rows.build_training_rows`), where x0 is the reference completion and x_t masks it block by block: for every block
  `t ~ U(0, 1)`, each position is masked with probability `t`, and a block left without a mask gets one
  (`rows.select_noise_random`, the masking of the paper's OPDLM_off ablation);
- the loss is the cross-entropy of the student at the masked positions of x_t against the clean tokens (computed by
  TRL's fused LM head, without materialising the logits), optionally weighted by `1 / t` (`loss_weighting`), reduced
  as OPDLM reduces its divergences (`losses.opdlm_loss`: per row, sum over masked positions / their count; then the
  mean over the rows), so the two objectives are on the same scale.

Training tokens (`trainer.state.num_input_tokens_seen`, logged as `num_tokens`) are counted with
`metrics.count_training_tokens`: prompt tokens + completion tokens including the EOS of every row used in an update, as
for OPDLM. Checkpoints and `save_model` write diffusion-LM folders (`hub.DLMHubMixin`).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import get_config_model_id, pad

from .attention import _unwrap
from .callbacks import use_diffusion_progress_bar
from .hub import DLMHubMixin
from .losses import opdlm_loss
from .metrics import count_training_tokens
from .rows import build_training_rows, pad_to_block_multiple, select_noise_random
from .student import prepare_student


logger = logging.get_logger(__name__)

LOSS_WEIGHTINGS = ("none", "inverse_t")


@dataclass
class BD3LMConfig(SFTConfig):
    r"""
    Configuration class for the [`~opdlm_trl.baseline.BD3LMTrainer`] (block-diffusion SFT, the BD3LM baseline).

    Extends TRL's [`~trl.SFTConfig`]; every SFT parameter keeps its meaning, except that packing, padding-free batches,
    `assistant_only_loss` and `loss_type="dft"` are not supported (a training row holds one prompt and one completion),
    and the loss is always computed on the completion only.

    Parameters:
        > Parameters that control the diffusion student

        block_size (`int`, *optional*, defaults to `4`):
            Block size b of the block-diffusion student (paper: 4), as in `OPDLMConfig`.
        mask_token (`str`, *optional*):
            Mask token used when converting a causal model (see `convert_to_dlm`). Default: the tokenizer's mask token,
            else an unused reserved special token, else a new `<|mask|>` token (embeddings are resized).

        > Parameters that control the masked-diffusion loss

        pad_last_block_with_eos (`bool`, *optional*, defaults to `True`):
            Fill the rest of the block that holds a completion's EOS with EOS tokens, which are masked and trained on
            like any completion token (the EOS padding of LLaDA-style SFT, limited to the last block). The sampler
            decodes whole blocks, so at inference the positions after the end are mask tokens the model sees and
            must fill; without this they are never trained and the student runs past the end. Measured on the demo
            task (seed 0, 6,000 steps of 8 rows, lr 1e-3 cosine, 100 held-out prompts): 33% held-out exact match
            without it (token accuracy 0.99: the errors are extra numbers after the end), 94% with it. The filler EOS
            tokens are completion tokens, so they count as training tokens.
        loss_weighting (`str`, *optional*, defaults to `"none"`):
            Weight of the cross-entropy of a masked position: `"none"` (w = 1, as OPDLM) or `"inverse_t"` (w = 1 / t,
            the masked-diffusion ELBO weight of MDLM/BD3LM, with `t` the masking probability of the position's block).
        min_t (`float`, *optional*, defaults to `1e-3`):
            With `loss_weighting="inverse_t"`, the weight is `1 / max(t, min_t)` (BD3LM clips t at 1e-3), which bounds
            the weight of the mask forced into a block whose drawn `t` left it unmasked.
    """

    block_size: int = field(
        default=4,
        metadata={
            "help": "Block size b of the block-diffusion student (paper: 4). Prompts are split into blocks aligned to "
            "their end; completions are masked block by block."
        },
    )
    mask_token: str | None = field(
        default=None,
        metadata={
            "help": "Mask token used when converting a causal model. Default: the tokenizer's mask token, else an "
            "unused reserved special token, else a new `<|mask|>` token (embeddings are resized)."
        },
    )
    pad_last_block_with_eos: bool = field(
        default=True,
        metadata={
            "help": "Fill the rest of the block holding a completion's EOS with EOS tokens and train on them (the "
            "sampler decodes whole blocks, so the positions after the end must learn to be EOS). The filler tokens "
            "count as training tokens."
        },
    )
    loss_weighting: str = field(
        default="none",
        metadata={
            "help": "Weight of the cross-entropy of each masked position: 'none' (w = 1, as OPDLM) or 'inverse_t' "
            "(w = 1 / t, the masked-diffusion ELBO weight, t = masking probability of the block).",
            "choices": list(LOSS_WEIGHTINGS),
        },
    )
    min_t: float = field(
        default=1e-3,
        metadata={"help": "With loss_weighting='inverse_t', the weight is 1 / max(t, min_t) (BD3LM clips t at 1e-3)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer (paper: 4), got {self.block_size!r}.")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}.")
        if not 0.0 < self.min_t <= 1.0:
            raise ValueError(f"min_t must be in (0, 1], got {self.min_t}.")
        unsupported = [
            name
            for name, value in (
                ("packing", self.packing),
                ("padding_free", self.padding_free),
                ("assistant_only_loss", self.assistant_only_loss),
            )
            if value
        ]
        if unsupported:
            raise ValueError(
                f"{', '.join(unsupported)} cannot be used with the BD3LM baseline: each training row is one prompt "
                "followed by its clean and its noisy completion."
            )
        if self.completion_only_loss is False:
            raise ValueError(
                "completion_only_loss=False is not supported: the BD3LM loss is on the masked completion tokens only."
            )
        if self.loss_type != "nll":
            raise ValueError(
                f"loss_type must be 'nll' for the BD3LM baseline (cross-entropy), got {self.loss_type!r}."
            )


class BD3LMDataCollator:
    """Collates SFT-tokenized examples (`input_ids`, `labels` with -100 on the prompt) into BD3LM training-row inputs.

    For every example the prompt is the tokens whose label is -100 before the first completion token, and the completion
    (reference x0, with its EOS) is the rest. The batch holds left-padded prompts, completions right-padded to a
    multiple of the block size, and the noisy state: per block `t ~ U(0, 1)` and random masking
    (`rows.select_noise_random`).

    Args:
        pad_token_id: Pad token id.
        block_size: Block size b.
        generator: Optional RNG of the masking (default: the global torch RNG).
        eos_token_id: When given, the rest of the block holding each completion's end is filled with this token and
            belongs to the completion (`BD3LMConfig.pad_last_block_with_eos`).

    Returns (when called on a list of examples):
        A dict of tensors: `prompt_ids`, `prompt_mask` `(B, L0)`; `completion_ids`, `completion_mask`, `noise_mask`
        `(B, L1)`; `t` `(B, L1)` (the masking probability of each position's block).
    """

    def __init__(
        self,
        pad_token_id: int,
        block_size: int,
        generator: torch.Generator | None = None,
        eos_token_id: int | None = None,
    ):
        self.pad_token_id = pad_token_id
        self.block_size = block_size
        self.generator = generator
        self.eos_token_id = eos_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts, completions = [], []
        for i, example in enumerate(examples):
            if "input_ids" not in example or "labels" not in example:
                raise ValueError(
                    "BD3LMDataCollator expects examples tokenized by SFTTrainer (`input_ids` and `labels`), got keys "
                    f"{sorted(example)}."
                )
            ids, labels = list(example["input_ids"]), list(example["labels"])
            start = next((j for j, label in enumerate(labels) if label != -100), None)
            if start is None:
                raise ValueError(f"Example {i} of the batch has no completion token (every label is -100).")
            if start == 0:
                raise ValueError(
                    f"Example {i} of the batch has no prompt token: the BD3LM row needs at least one prompt token."
                )
            completion = ids[start:]
            if self.eos_token_id is not None:
                completion += [self.eos_token_id] * (-len(completion) % self.block_size)
            prompts.append(torch.tensor(ids[:start], dtype=torch.long))
            completions.append(torch.tensor(completion, dtype=torch.long))
        prompt_ids = pad(prompts, padding_value=self.pad_token_id, padding_side="left")
        prompt_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left")
        completion_ids = pad(completions, padding_value=self.pad_token_id, padding_side="right")
        completion_mask = pad([torch.ones_like(c) for c in completions], padding_value=0, padding_side="right")
        completion_ids = pad_to_block_multiple(completion_ids, self.block_size, self.pad_token_id)
        completion_mask = pad_to_block_multiple(completion_mask, self.block_size, 0)

        batch, length = completion_ids.shape
        num_blocks = length // self.block_size
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        t = torch.rand((batch, num_blocks), generator=self.generator, device=gen_device).cpu()
        noise_mask = select_noise_random(completion_mask.bool(), self.block_size, self.generator, t=t)
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "noise_mask": noise_mask,
            "t": t.repeat_interleave(self.block_size, dim=1),
        }


def _check_prompt_completion_dataset(dataset: Any, name: str) -> None:
    """Fails early on datasets that cannot feed the baseline (no `prompt` / `completion` column, empty)."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, value in dataset.items():
            _check_prompt_completion_dataset(value, f"{name}[{key!r}]")
        return
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(f"`{name}` must be a `datasets.Dataset` or `IterableDataset`, got {type(dataset).__name__}.")
    columns = dataset.column_names
    if columns is None:  # an IterableDataset with unknown features
        columns = list(next(iter(dataset)).keys())
    missing = [column for column in ("prompt", "completion") if column not in columns]
    if missing:
        raise ValueError(
            f"`{name}` has no {' and no '.join(repr(m) for m in missing)} column (columns: {columns}). The BD3LM "
            "baseline trains on reference completions: provide a prompt-completion dataset (columns 'prompt' and "
            "'completion', standard or conversational), e.g. `dataset.rename_column('answer', 'completion')`. "
            "OPDLMTrainer needs prompts only."
        )
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"`{name}` is empty.")


class BD3LMTrainer(DLMHubMixin, SFTTrainer):
    """Block-diffusion supervised fine-tuning (BD3LM), the baseline objective of the OPDLM paper.

    The model is converted with `convert_to_dlm` (as in `OPDLMTrainer`) and trained with the masked-diffusion
    cross-entropy on `[prompt | x0 | x_t]` rows built from reference completions (see the module docstring). Overrides
    of `SFTTrainer`: the collator (training rows), `compute_loss` (cross-entropy at the masked positions of x_t),
    `prediction_step` (loss only: there are no logits to return) and the training-token count.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from opdlm_trl.baseline import BD3LMConfig, BD3LMTrainer

    >>> dataset = Dataset.from_dict({"prompt": ["What is 2 + 2?"], "completion": [" 4"]})
    >>> trainer = BD3LMTrainer(
    ...     model="Qwen/Qwen3-0.6B", args=BD3LMConfig(output_dir="out", block_size=4), train_dataset=dataset
    ... )
    >>> trainer.train()
    ```

    Args:
        model (`str`, [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            A causal LM id or path (loaded with `args.model_init_kwargs` and `quantization_config`), a causal LM
            instance (converted in place with `convert_to_dlm(block_size=args.block_size)`), or a model already
            converted (its block size must equal `args.block_size`).
        args ([`BD3LMConfig`], *optional*):
            Configuration. Default: `BD3LMConfig(f"{model_name}-BD3LM")`.
        data_collator (*optional*):
            Default: `BD3LMDataCollator`. A custom collator must return the same keys.
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            Prompt-completion data (`"prompt"` and `"completion"` columns, standard or conversational). Standard
            (text) completions are appended to the prompt as they are: include the separating space if the tokenizer
            needs one.
        eval_dataset (*optional*):
            Evaluation data, same format (the evaluation loss is the same masked-diffusion loss).
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The tokenizer. Default: loaded from the model's name. It gets the mask token during conversion.
        callbacks (list of [`~transformers.TrainerCallback`], *optional*):
            Extra callbacks.
        optimizers (`tuple`, *optional*):
            Optimizer and scheduler, as in [`~transformers.Trainer`].
        quantization_config ([`~transformers.BitsAndBytesConfig`], *optional*):
            Quantization of the model when `model` is a string.
        peft_config ([`~peft.PeftConfig`], *optional*):
            PEFT configuration (e.g. LoRA).
    """

    _tag_names = ["trl", "sft", "bd3lm", "diffusion-lm"]
    _name = "BD3LM"
    _dlm_method = "bd3lm"
    _paper = {
        "title": "Block Diffusion: Interpolating Between Autoregressive and Diffusion Language Models",
        "id": "2503.09573",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{arriola2025block,
                title        = {{Block Diffusion: Interpolating Between Autoregressive and Diffusion Language Models}},
                author       = {Marianne Arriola and Aaron Gokaslan and Justin T. Chiu and Zhihan Yang and Zhixuan Qi and Jiaqi Han and Subham Sekhar Sahoo and Volodymyr Kuleshov},
                booktitle    = {The Thirteenth International Conference on Learning Representations},
                year         = 2025
            }"""),
    }

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: BD3LMConfig | None = None,
        data_collator: Any | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: Any | None = None,
        peft_config: Any | None = None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = BD3LMConfig(f"{(model_name or 'model').split('/')[-1]}-BD3LM")
        elif not isinstance(args, BD3LMConfig):
            raise TypeError(
                f"`args` must be a `BD3LMConfig`, got {type(args).__name__}. `BD3LMConfig` extends TRL's `SFTConfig` "
                "with the diffusion parameters (block_size, loss_weighting, ...)."
            )
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: a prompt-completion dataset.")
        _check_prompt_completion_dataset(train_dataset, "train_dataset")
        _check_prompt_completion_dataset(eval_dataset, "eval_dataset")

        model, tokenizer, _ = prepare_student(model, processing_class, args, quantization_config, "BD3LMConfig")
        quantization_config = None  # applied at loading
        hf_model = _unwrap(model)
        self.mask_token_id = int(hf_model.config.mask_token_id)

        if data_collator is None:
            eos = tokenizer.eos_token_id if args.pad_last_block_with_eos else None
            if args.pad_last_block_with_eos and eos is None:
                raise ValueError(
                    "pad_last_block_with_eos=True needs the tokenizer's eos_token_id: set tokenizer.eos_token, or "
                    "pass pad_last_block_with_eos=False."
                )
            data_collator = BD3LMDataCollator(tokenizer.pad_token_id, args.block_size, eos_token_id=eos)

        saved_model_init_kwargs = args.model_init_kwargs
        args.model_init_kwargs = None  # the model is instantiated: SFTTrainer must not warn about it
        try:
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=tokenizer,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
            )
        finally:
            args.model_init_kwargs = saved_model_init_kwargs
        use_diffusion_progress_bar(self, "CE")

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Masked-diffusion cross-entropy of a micro-batch: at the masked positions of x_t, `-log p(x0_i)` (times
        `1 / t` with `loss_weighting="inverse_t"`); per row, sum / count; then the mean over the rows."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        rows = build_training_rows(
            inputs["prompt_ids"],
            inputs["prompt_mask"],
            inputs["completion_ids"],
            inputs["completion_mask"],
            inputs["noise_mask"],
            self.mask_token_id,
            args.block_size,
            self.processing_class.pad_token_id,
        )
        batch = rows.input_ids.shape[0]
        noisy = rows.noisy_slice
        x0 = rows.input_ids[:, rows.prompt_length : noisy.start]
        valid = inputs["completion_mask"].bool()
        positions = pad_to_block_multiple(inputs["noise_mask"].bool() & valid, args.block_size, False)
        # Targets of the student's own (unshifted) logits: the clean token at every masked x_t position.
        labels = torch.full_like(rows.input_ids, -100)
        labels[:, noisy] = x0.masked_fill(~positions, -100)

        student = _unwrap(self.accelerator.unwrap_model(model))
        outputs = model(
            input_ids=rows.input_ids,
            attention_mask=rows.attention_mask(student),
            position_ids=rows.position_ids,
            shift_labels=labels,
            fused_lm_head=True,
            use_cache=False,
        )
        nll = -outputs.log_probs[:, noisy]
        row_index, col_index = positions.nonzero(as_tuple=True)
        per_token = nll[row_index, col_index]
        if args.loss_weighting == "inverse_t":
            t = pad_to_block_multiple(inputs["t"], args.block_size, 1.0)
            per_token = per_token / t[row_index, col_index].to(per_token.dtype).clamp(min=args.min_t)
        loss, _ = opdlm_loss(per_token, row_index, batch)
        if per_token.numel() == 0:
            loss = loss + 0.0 * outputs.log_probs.sum()  # keep the graph connected (DDP expects gradients)

        num_masked = self.accelerator.gather_for_metrics(positions.sum()).sum()
        num_valid = self.accelerator.gather_for_metrics(valid.sum()).sum()
        entropy_sum = self.accelerator.gather_for_metrics(outputs.entropy[:, noisy].detach().sum()).sum()
        correct = self.accelerator.gather_for_metrics(outputs.is_top1[:, noisy].sum()).sum()
        metrics = self._metrics[mode]
        metrics["entropy"].append((entropy_sum / num_masked).item() if num_masked > 0 else 0.0)
        metrics["mean_token_accuracy"].append((correct / num_masked).item() if num_masked > 0 else 0.0)
        metrics["loss/masked_fraction"].append((num_masked / num_valid.clamp(min=1)).item())
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys: list[str] | None = None):
        """Evaluation: the masked-diffusion loss only (the fused LM head builds no logits)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _track_num_input_tokens(self, inputs):
        """Training tokens of the micro-batch, as for OPDLM: `count_training_tokens(prompt_mask, completion_mask)`
        (prompt + completion tokens including the EOS), gathered over processes. Always counted."""
        tokens = count_training_tokens(inputs["prompt_mask"], inputs["completion_mask"])
        tokens = torch.tensor(tokens, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(tokens).sum().item())
        self._metrics["train"]["num_tokens"] = [self.state.num_input_tokens_seen]


__all__ = ["BD3LMConfig", "BD3LMDataCollator", "BD3LMTrainer", "LOSS_WEIGHTINGS"]
