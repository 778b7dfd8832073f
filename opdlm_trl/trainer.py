"""`OPDLMTrainer`: self on-policy distillation of an autoregressive LM into a block-diffusion LM, as a TRL trainer.

`OPDLMTrainer` subclasses TRL's `DistillationTrainer` and overrides only what OPDLM changes:

- construction: the student is converted with `convert_to_dlm` (unless it already is a diffusion LM) and the default
  teacher is the frozen original weights with causal attention (a frozen copy, or, with PEFT, the same base model with
  the adapter disabled: no second copy of the weights);
- on-policy generation (`_generate_and_score_completions`): the student samples with the block-diffusion sampler and
  the trajectories pick the noisy state of every block;
- the loss (`compute_loss` / `_compute_loss`): one student forward on the `[prompt | x0 | x_t]` training row, one
  causal teacher forward on `[prompt | x0]`, and a divergence at the masked positions of x_t.

Everything else (datasets in standard and conversational `prompt` formats, callbacks, `report_to`, checkpoints and
resumption, gradient accumulation, PEFT wrapping) is TRL's / transformers'; saving and model cards add the diffusion-LM
folder layout through `hub.DLMHubMixin`.
"""

from __future__ import annotations

import copy
import math
import textwrap
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from accelerate.utils import gather_object, is_peft_model, set_seed
from datasets import Dataset, IterableDataset
from transformers import (
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
)
from transformers.utils import logging
from trl import DistillationTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import create_model_from_path, get_config_model_id, pad

from .attention import causal_attention, position_ids_from_mask
from .callbacks import use_diffusion_progress_bar
from .config import OPDLMConfig
from .hub import DLMHubMixin
from .losses import chunked_dense_divergence, chunked_divergence, logit_postprocessing, opdlm_loss
from .metrics import count_training_tokens, eos_fraction, timer
from .rows import build_training_rows, loss_mask, pad_to_block_multiple, select_noise
from .sampler import diffusion_generate
from .student import prepare_student


logger = logging.get_logger(__name__)


# How the progress bar labels the loss of each divergence.
_LOSS_NAMES = {"forward_kl": "KL", "reverse_kl": "reverse KL", "jsd": "JSD"}


def _unwrap_hf(model: Any) -> PreTrainedModel:
    """The transformers model under PEFT / DDP wrappers (LoRA layers stay injected in it)."""
    while not isinstance(model, PreTrainedModel):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module"):
            model = model.module
        else:
            raise TypeError(f"Expected a transformers model (or a PEFT/DDP wrapper of one), got {type(model)}.")
    return model


def _backbone(model: Any) -> torch.nn.Module:
    """The decoder stack (without LM head) of a causal LM, PEFT-wrapped or not."""
    return _unwrap_hf(model).base_model


def _rows(param: torch.Tensor) -> int:
    """First dimension of a parameter, also when it is a DeepSpeed ZeRO-3 partition (locally empty outside forward)."""
    return int(param.ds_shape[0]) if hasattr(param, "ds_shape") else int(param.shape[0])


def _vocab_rows(model: Any) -> int:
    return _rows(_unwrap_hf(model).get_output_embeddings().weight)


def _full_weight(param: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """An LM-head parameter as a whole tensor: FSDP2 shards it as a `DTensor` outside its module's forward (the heads are
    read directly by the loss), so it is gathered once here, as TRL's distillation loss does; under mixed precision the
    gathered fp32 master weight is cast to the hidden states' dtype once. Anything else is returned as is (DeepSpeed
    ZeRO-3 partitions are gathered by the loss kernels themselves)."""
    if param is None or not torch.distributed.is_available():
        return param
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        param = param.full_tensor()
        return param.to(dtype) if dtype is not None and param.is_floating_point() else param
    return param


def _frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of the model's current weights (the default self-teacher), frozen by the caller.

    Under DeepSpeed ZeRO-3, transformers builds every model inside `deepspeed.zero.Init`, so its parameters are already
    partitions (locally empty, with gather hooks bound to them) and `copy.deepcopy` gives a broken teacher. The copy is
    then a fresh model from the same config (partitioned by transformers as well) into which the gathered weights are
    copied one parameter at a time.
    """
    params = dict(model.named_parameters())
    if not any(hasattr(p, "ds_id") for p in params.values()):
        return copy.deepcopy(model)
    import deepspeed

    teacher = type(model)._from_config(
        copy.deepcopy(model.config),
        attn_implementation=model.config._attn_implementation,
        dtype=next(iter(params.values())).dtype,
    )
    targets = dict(teacher.named_parameters())
    if targets.keys() != params.keys():
        raise RuntimeError("The ZeRO-3 self-teacher copy does not have the student's parameters.")
    for name, param in params.items():
        with (
            deepspeed.zero.GatheredParameters([param]),
            deepspeed.zero.GatheredParameters([targets[name]], modifier_rank=0),
        ):
            targets[name].data.copy_(param.data)
    buffers = dict(teacher.named_buffers())
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffers[name].copy_(buffer)
    return teacher


@contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _keep_bnb_4bit_differentiable_on_cpu(model: torch.nn.Module) -> int:
    """Stops bitsandbytes from repacking a trainable 4-bit model's weights for its CPU inference kernel.

    bitsandbytes (0.50) repacks a `Linear4bit` weight for a faster CPU kernel the first time the layer runs in eval mode
    without gradients (on CPUs with AVX512-BF16); afterwards the layer no longer passes gradients to its input, so a
    QLoRA student whose rollouts (or adapter-disabled teacher forwards) ran under `no_grad` silently stops learning.

    Returns:
        The number of layers changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def _check_prompt_dataset(dataset: Any, name: str) -> None:
    """Fails early on datasets that cannot feed OPDLM (no `prompt` column, empty)."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, value in dataset.items():
            _check_prompt_dataset(value, f"{name}[{key!r}]")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"`{name}` has no 'prompt' column (columns: {columns}). OPDLM trains on prompts only: provide a dataset "
            "with a 'prompt' column in the standard (text) or conversational (list of messages) format, e.g. "
            "`dataset.rename_column('question', 'prompt')`."
        )
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"`{name}` is empty: OPDLM needs at least one prompt.")


class OPDLMTrainer(DLMHubMixin, DistillationTrainer):
    """Trainer for OPDLM: on-policy self-distillation of an autoregressive LM into a block-diffusion LM.

    The student (the model's own weights with block-causal attention and a mask token) samples completions with the
    block-diffusion sampler, keeping for every position the denoising step that committed it. For every response block
    one of its own denoising states is re-created (`args.state_selection`), and the student learns, in one forward of
    the `[prompt | x0 | x_t]` training row, to match at the still-masked positions the next-token distributions of the
    teacher (by default the frozen original model, with causal attention) on the final sequence.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from opdlm_trl import OPDLMConfig, OPDLMTrainer

    >>> dataset = Dataset.from_dict({"prompt": ["What is 2 + 2?", "Name a colour."]})
    >>> trainer = OPDLMTrainer(
    ...     model="Qwen/Qwen3-0.6B", args=OPDLMConfig(output_dir="out", block_size=4), train_dataset=dataset
    ... )
    >>> trainer.train()
    ```

    Args:
        model (`str`, [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The student: a causal LM id or path (loaded with `args.model_init_kwargs` and `quantization_config`), a
            causal LM instance (converted in place with `convert_to_dlm(block_size=args.block_size)`), or a model
            already converted by `convert_to_dlm` (its block size must equal `args.block_size`).
        teacher_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            The teacher. Default: the student's own original weights with causal attention (self-distillation): a
            frozen copy, or with PEFT the same base model with the adapter disabled (no copy). `args.teacher_model_
            init_kwargs` (e.g. a `BitsAndBytesConfig`) or `args.teacher_model_name_or_path` load a separate teacher
            instead. Any causal LM with the same tokenizer works (e.g. a larger one); a different vocabulary raises a
            `ValueError`. When the student's mask token was added to the vocabulary, the teacher may lack it: the
            divergence then compares the teacher's vocabulary only.
        args ([`OPDLMConfig`], *optional*):
            Configuration. Default: `OPDLMConfig(f"{model_name}-OPDLM")`.
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            Prompts, in a `"prompt"` column (standard or conversational format). Completions are generated on-policy.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Evaluation prompts, same format.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The tokenizer. Default: loaded from the model's name. It gets the mask token during conversion.
        callbacks (list of [`~transformers.TrainerCallback`], *optional*):
            Extra callbacks.
        optimizers (`tuple`, *optional*):
            Optimizer and scheduler, as in [`~transformers.Trainer`].
        quantization_config ([`~transformers.BitsAndBytesConfig`], *optional*):
            Quantization of the student when `model` is a string; with `peft_config`, QLoRA.
        peft_config ([`~peft.PeftConfig`], *optional*):
            PEFT configuration (e.g. LoRA) used to wrap the student. The default teacher is then the same base model
            with the adapter disabled.
    """

    _tag_names = ["trl", "opdlm", "diffusion-lm", "distillation"]
    _name = "OPDLM"
    _paper = {
        "title": "Data-Efficient Autoregressive-to-Diffusion Language Models via On-Policy Distillation",
        "id": "2606.06712",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{opdlm2026,
                title        = {{Data-Efficient Autoregressive-to-Diffusion Language Models via On-Policy Distillation}},
                year         = 2026,
                eprint       = {arXiv:2606.06712}
            }"""),
    }

    def __init__(
        self,
        model: str | PreTrainedModel,
        teacher_model: str | PreTrainedModel | None = None,
        args: OPDLMConfig | None = None,
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
            args = OPDLMConfig(f"{(model_name or 'model').split('/')[-1]}-OPDLM")
        elif not isinstance(args, OPDLMConfig):
            raise TypeError(
                f"`args` must be an `OPDLMConfig`, got {type(args).__name__}. `OPDLMConfig` extends TRL's "
                "`DistillationConfig` with the diffusion parameters (block_size, steps_per_block, ...)."
            )
        _check_prompt_dataset(train_dataset, "train_dataset")
        _check_prompt_dataset(eval_dataset, "eval_dataset")

        set_seed(args.seed)
        model, tokenizer, resized = prepare_student(model, processing_class, args, quantization_config, "OPDLMConfig")
        model_id = get_config_model_id(_unwrap_hf(model).config)
        hf_model = _unwrap_hf(model)
        # Compare only the vocabulary the original weights have when the mask token was added by resizing.
        self._teacher_vocab_limit: int | None = hf_model.config.dlm_original_vocab_size if resized else None
        self.mask_token_id = int(hf_model.config.mask_token_id)

        # Default teacher: the frozen original weights. A copy is taken before PEFT wrapping (so it has no adapter);
        # with PEFT, the base model with the adapter disabled plays the teacher and nothing is copied.
        teacher_model_init_kwargs = dict(args.teacher_model_init_kwargs or {})
        uses_peft = peft_config is not None or is_peft_model(model)
        teacher_source = teacher_model
        if teacher_source is None and (args.teacher_model_name_or_path or args.teacher_model_init_kwargs is not None):
            teacher_source = args.teacher_model_name_or_path or model_id
            if not teacher_source:
                raise ValueError(
                    "`teacher_model_init_kwargs` needs a path to load the teacher from: set "
                    "`args.teacher_model_name_or_path`, or pass `model` as a path."
                )
        if isinstance(teacher_source, str):
            dtype = teacher_model_init_kwargs.get("dtype")
            if isinstance(dtype, str) and dtype != "auto":
                teacher_model_init_kwargs["dtype"] = getattr(torch, dtype)
            if args.teacher_model_revision is not None:
                teacher_model_init_kwargs.setdefault("revision", args.teacher_model_revision)
            if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
                teacher_model_init_kwargs["device_map"] = None
            teacher_model_init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            teacher = create_model_from_path(teacher_source, **teacher_model_init_kwargs)
            self._teacher_is_copy = False
        elif teacher_source is not None:
            if args.teacher_model_init_kwargs is not None:
                raise ValueError(
                    "You passed `teacher_model_init_kwargs` to the config, but your teacher_model is already "
                    "instantiated."
                )
            teacher = teacher_source
            self._teacher_is_copy = False
        elif uses_peft:
            teacher = None  # the student's base model with the adapter disabled
            self._teacher_is_copy = False
        else:
            teacher = _frozen_copy(hf_model)  # the original weights, run with causal attention
            self._teacher_is_copy = True
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

        # The model is instantiated here, so TRL must not warn about `model_init_kwargs` again.
        saved_model_init_kwargs = args.model_init_kwargs
        args.model_init_kwargs = None
        try:
            super().__init__(
                model=model,
                teacher_model=None,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=tokenizer,
                callbacks=callbacks,
                optimizers=optimizers,
                peft_config=peft_config,
            )
        finally:
            args.model_init_kwargs = saved_model_init_kwargs

        if getattr(_unwrap_hf(self.model), "is_loaded_in_4bit", False):
            _keep_bnb_4bit_differentiable_on_cpu(self.model)

        # Teacher setup (TRL's, with a vocabulary check that allows the student's extra mask token).
        self._self_teacher_adapter_disabled = teacher is None
        if teacher is None and not is_peft_model(self.model):
            raise ValueError(
                "No teacher: pass `teacher_model=` (the default self-teacher needs the student's weights)."
            )
        self._teacher_vocab_size = self._check_teacher_vocabulary(teacher)
        if teacher is not None:
            if self.is_deepspeed_enabled:  # ZeRO-3: sharded like the student; ZeRO-1/2: a full copy per process
                self.teacher_model = prepare_deepspeed(teacher, self.accelerator)
            elif self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.fsdp_version == 2:
                # Sharded at rest (one FSDP2 unit, gathered for its forward), as TRL's trainers prepare reference
                # models; the loss gathers its LM head (a DTensor) once per step.
                self.teacher_model = prepare_fsdp(teacher, self.accelerator)
            else:  # DDP (and FSDP1, whose resharded heads the loss could not read): a full copy per process
                self.teacher_model = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        else:
            self.teacher_model = None

        max_positions = getattr(_unwrap_hf(self.model).config.get_text_config(), "max_position_embeddings", None)
        if max_positions is not None and args.max_prompt_length is not None:
            needed = args.max_prompt_length + math.ceil(args.max_completion_length / args.block_size) * args.block_size
            if needed > max_positions:
                raise ValueError(
                    f"max_prompt_length ({args.max_prompt_length}) + max_completion_length "
                    f"({args.max_completion_length}, rounded up to a multiple of block_size) = {needed} exceeds the "
                    f"model's max_position_embeddings ({max_positions}). Lower one of them."
                )

        self._warned_truncation = False
        self._timings: dict[str, float] = {}
        use_diffusion_progress_bar(self, _LOSS_NAMES.get(args.divergence, args.divergence))

    # ------------------------------------------------------------------------------------------------------------
    # Construction helpers
    # ------------------------------------------------------------------------------------------------------------

    def _check_teacher_vocabulary(self, teacher: PreTrainedModel | None) -> int:
        """Returns the number of leading vocabulary entries both models are compared on; raises on a mismatch."""
        tokenizer = self._tokenizer
        student_rows = _vocab_rows(self.model)
        if teacher is None or self._teacher_is_copy:
            # Self-teacher: the original weights; a mask token added by resizing does not exist for it.
            return self._teacher_vocab_limit or student_rows
        teacher_rows = _vocab_rows(teacher)
        common = min(student_rows, teacher_rows)
        needed = [i for i in range(len(tokenizer)) if i != self.mask_token_id]
        largest_needed = max(needed) if needed else -1
        if largest_needed >= common:
            raise ValueError(
                f"The teacher's vocabulary ({teacher_rows} tokens) does not cover the student's tokenizer "
                f"({len(tokenizer)} tokens, {student_rows} embedding rows). OPDLM compares the teacher's and the "
                "student's next-token distributions token by token, so the teacher must use the same tokenizer "
                "(e.g. a larger model of the same family)."
            )
        teacher_path = get_config_model_id(_unwrap_hf(teacher).config)
        if teacher_path:
            try:
                teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path, local_files_only=True)
            except Exception:  # noqa: BLE001 - no tokenizer next to the teacher: nothing more to compare
                teacher_tokenizer = None
            if teacher_tokenizer is not None:
                mask_token = tokenizer.mask_token
                student_vocab = {t: i for t, i in tokenizer.get_vocab().items() if i < common and t != mask_token}
                teacher_vocab = {
                    t: i for t, i in teacher_tokenizer.get_vocab().items() if i < common and t != mask_token
                }
                if student_vocab != teacher_vocab:
                    differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()))[:5]
                    raise ValueError(
                        f"The teacher's tokenizer ({teacher_path}) differs from the student's (e.g. {differing}). "
                        "OPDLM needs a teacher with the same tokenizer."
                    )
        return common

    # ------------------------------------------------------------------------------------------------------------
    # Rollouts
    # ------------------------------------------------------------------------------------------------------------

    def _truncate_prompts(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        limit = self.args.max_prompt_length
        for i, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise ValueError(
                    f"Prompt {i} of the batch tokenizes to no tokens. Every prompt needs at least one token."
                )
        if limit is None:
            return prompt_ids
        too_long = [len(ids) for ids in prompt_ids if len(ids) > limit]
        if too_long and not self._warned_truncation:
            warnings.warn(
                f"{len(too_long)} prompt(s) of this batch are longer than max_prompt_length={limit} (longest: "
                f"{max(too_long)} tokens) and were truncated from the left. Raise `max_prompt_length` to keep them "
                "whole. This warning is shown once.",
                UserWarning,
                stacklevel=2,
            )
            self._warned_truncation = True
        return [ids[-limit:] if len(ids) > limit else ids for ids in prompt_ids]

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """Samples completions with the diffusion sampler and prepares the training rows' ingredients.

        Returns a dict of `(B, ...)` tensors: `prompt_ids`/`prompt_mask` (left-padded), `completion_ids`/
        `completion_mask` (right-padded to a multiple of the block size; the mask covers generated tokens up to and
        including the first EOS), `noise_mask` (masked positions of x_t), `loss_mask` (its loss positions), and the
        scalar `num_loss_rows` (rows with at least one loss position in the whole generation batch, all processes).
        """
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        if "images" in inputs[0] or "image" in inputs[0]:
            raise ValueError("OPDLMTrainer is text-only: the dataset has an image column.")
        prompts = copy.deepcopy([x["prompt"] for x in inputs])
        prompt_ids_list, _, _ = self._tokenize_prompts(prompts)
        prompt_ids_list = self._truncate_prompts([list(ids) for ids in prompt_ids_list])

        pad_id = self._tokenizer.pad_token_id
        prompt_tensors = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids_list]
        prompt_ids = pad(prompt_tensors, padding_value=pad_id, padding_side="left").to(device)
        prompt_mask = pad([torch.ones_like(t) for t in prompt_tensors], padding_value=0, padding_side="left").to(
            device
        )

        args = self.args
        max_new_tokens = args.rollout_length(self.state.global_step) if mode == "train" else args.max_completion_length
        with (
            timer(self._timings, "rollout", device) if mode == "train" else nullcontext(),
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            ) as unwrapped,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            student = _unwrap_hf(unwrapped)
            with _eval_mode(student):
                out = diffusion_generate(
                    student,
                    prompt_ids,
                    prompt_mask,
                    max_new_tokens=max_new_tokens,
                    block_size=args.block_size,
                    steps_per_block=args.steps_per_block,
                    threshold=args.threshold,
                    temperature=self.temperature,
                    top_k=self.top_k,
                    top_p=self.top_p,
                    eos_token_id=self.eos_token_ids,
                    pad_token_id=pad_id,
                    mask_token_id=self.mask_token_id,
                )

        completion_ids = out.sequences[:, prompt_ids.shape[1] :]
        completion_mask = (out.trajectory >= 0).long()
        # Drop trailing all-padding columns (rows that all stopped early), keeping a multiple of the block size.
        keep = int(completion_mask.sum(-1).max().item()) if completion_mask.numel() else 0
        keep = max(math.ceil(keep / args.block_size) * args.block_size, args.block_size)
        completion_ids = pad_to_block_multiple(completion_ids, args.block_size, pad_id)[:, :keep]
        completion_mask = pad_to_block_multiple(completion_mask, args.block_size, 0)[:, :keep]
        trajectory = pad_to_block_multiple(out.trajectory, args.block_size, -1)[:, :keep]
        completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_id)

        noise_mask = select_noise(args.state_selection, trajectory, args.block_size)
        positions = loss_mask(noise_mask, completion_ids, completion_mask, self.eos_token_ids, args.loss_on_eos)
        num_loss_rows = self.accelerator.gather(positions.any(-1).sum()).sum()

        # Metrics (training tokens are defined once, in `metrics.count_training_tokens`).
        tokens = self.accelerator.gather(
            torch.tensor(count_training_tokens(prompt_mask, completion_mask), device=device)
        )
        if mode == "train":
            self.state.num_input_tokens_seen += int(tokens.sum().item())
        metrics = self._metrics[mode]
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        lengths = self.accelerator.gather(completion_mask.sum(-1)).float()
        metrics["completions/mean_length"].append(lengths.mean().item())
        metrics["completions/min_length"].append(lengths.min().item())
        metrics["completions/max_length"].append(lengths.max().item())
        # The other rollout statistics, summed over all processes (each rank samples its own prompts).
        rows, generated = completion_ids.shape[0], float(completion_mask.sum().item())
        tokens_per_forward = float(out.tokens_per_forward)
        local = [
            eos_fraction(completion_ids, completion_mask, self.eos_token_ids) * rows,  # rows that reached an EOS
            float(rows),
            generated,
            generated / tokens_per_forward if tokens_per_forward > 0 else 0.0,  # sum over rows of their forwards
            float(out.nfe),
            float(positions.sum().item()),  # loss positions
        ]
        eos_rows, all_rows, generated, row_forwards, nfe, masked = (
            self.accelerator.gather(torch.tensor([local], dtype=torch.float32, device=device)).sum(0).tolist()
        )
        metrics["completions/eos_fraction"].append(eos_rows / max(all_rows, 1.0))
        metrics["rollout/tokens_per_forward"].append(generated / max(row_forwards, 1.0))
        metrics["rollout/nfe"].append(nfe / self.accelerator.num_processes)  # forwards per process
        metrics["rollout/max_new_tokens"].append(float(max_new_tokens))
        metrics["loss/masked_fraction"].append(masked / max(generated, 1.0))

        if self.log_completions:
            self._logs["prompt"].extend(
                gather_object(self.processing_class.batch_decode(prompt_ids, skip_special_tokens=True))
            )
            self._logs["completion"].extend(
                gather_object(self.processing_class.batch_decode(completion_ids, skip_special_tokens=True))
            )

        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "noise_mask": noise_mask,
            "loss_mask": positions,
            "num_loss_rows": num_loss_rows,
        }

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """OPDLM loss of a micro-batch: per-row mean divergence at its loss positions, averaged over the rows of the
        whole generation batch that have loss positions (so gradient accumulation reproduces the full-batch mean).

        Raises:
            FloatingPointError: The loss is NaN or infinite (names the optimizer step).
        """
        denominator = inputs["num_loss_rows"].float().clamp(min=1.0) / self.accelerator.num_processes
        unwrapped_student = self.accelerator.unwrap_model(model)
        # Mixed precision: accelerate puts autocast on the model's `forward`, which the redirection replaces (and the
        # backbones are called directly), so it is entered here (a no-op without native AMP, e.g. fp32 or DeepSpeed).
        with self.accelerator.autocast():
            loss, entropy_sum, num_tokens = self._forward_redirection(
                model, unwrapped_student, self._compute_loss, unwrapped_student, inputs, denominator
            )
        if not torch.isfinite(loss.detach()).item():
            raise FloatingPointError(
                f"OPDLM: the loss is {loss.item()} at optimizer step {self.state.global_step + 1} (micro-step "
                f"{self._step}). Check the teacher's and the student's logits (a NaN/inf weight, fp16 overflow), lower "
                "the learning rate, or use bf16/fp32."
            )
        mode = "train" if self.model.training else "eval"
        num_tokens = self.accelerator.gather_for_metrics(num_tokens).sum()
        entropy_sum = self.accelerator.gather_for_metrics(entropy_sum).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_tokens).item() if num_tokens > 0 else 0.0)
        return (loss, None) if return_outputs else loss

    def _teacher_hidden_states(self, unwrapped_student, prompt_ids, prompt_mask, x0, completion_mask):
        """Teacher (causal) hidden states that predict x0: position `L0 - 1 + i` predicts `x0[i]` (the shift)."""
        ids = torch.cat([prompt_ids, x0], dim=1)
        mask = torch.cat([prompt_mask, completion_mask], dim=1)
        if self._self_teacher_adapter_disabled:
            teacher = unwrapped_student
            adapter_off = unwrapped_student.disable_adapter()
        else:
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            adapter_off = nullcontext()
        embed_rows = _rows(_unwrap_hf(teacher).get_input_embeddings().weight)
        ids = ids.masked_fill((ids >= embed_rows) | (mask == 0), self._tokenizer.pad_token_id)
        kwargs = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": position_ids_from_mask(mask),
            "use_cache": False,
        }

        def forward():
            return _backbone(teacher)(**kwargs).last_hidden_state

        with adapter_off, causal_attention(teacher), _eval_mode(teacher), torch.no_grad():
            if self.teacher_model is not None:
                hidden = self._forward_redirection(self.teacher_model, teacher, forward)
            else:
                hidden = forward()
        start = prompt_ids.shape[1] - 1
        return hidden[:, start : start + x0.shape[1]], _unwrap_hf(teacher)

    def _compute_loss(self, unwrapped_student, inputs, denominator):
        args = self.args
        device = inputs["prompt_ids"].device
        rows = build_training_rows(
            inputs["prompt_ids"],
            inputs["prompt_mask"],
            inputs["completion_ids"],
            inputs["completion_mask"],
            inputs["noise_mask"],
            self.mask_token_id,
            args.block_size,
            self._tokenizer.pad_token_id,
        )
        positions = pad_to_block_multiple(inputs["loss_mask"], args.block_size, False)
        x0 = rows.input_ids[:, rows.prompt_length : rows.noisy_slice.start]
        completion_mask = rows.valid[:, rows.prompt_length : rows.noisy_slice.start].long()

        train = self.model.training
        with timer(self._timings, "teacher", device) if train else nullcontext():
            teacher_hidden, teacher_hf = self._teacher_hidden_states(
                unwrapped_student, inputs["prompt_ids"], inputs["prompt_mask"], x0, completion_mask
            )

        student_hf = _unwrap_hf(unwrapped_student)
        batch = rows.input_ids.shape[0]
        hidden = _backbone(unwrapped_student)(
            input_ids=rows.input_ids,
            attention_mask=rows.attention_mask(student_hf),
            position_ids=rows.position_ids,
            use_cache=False,
        ).last_hidden_state
        student_hidden = hidden[:, rows.noisy_slice]

        row_index, col_index = positions.nonzero(as_tuple=True)
        h_s = student_hidden[row_index, col_index]
        h_t = teacher_hidden[row_index, col_index].to(h_s.device)
        student_head = student_hf.get_output_embeddings()
        teacher_head = teacher_hf.get_output_embeddings()
        s_scale, s_cap = logit_postprocessing(student_hf.config)
        t_scale, t_cap = logit_postprocessing(teacher_hf.config)
        kwargs = dict(
            student_bias=student_head.bias,
            teacher_bias=teacher_head.bias,
            divergence=args.divergence,
            beta=args.beta,
            temperature=args.loss_temperature,
            student_logit_scale=s_scale,
            student_softcap=s_cap,
            teacher_logit_scale=t_scale,
            teacher_softcap=t_cap,
            vocab_size=self._teacher_vocab_size,
        )
        # FSDP2: whole heads (DTensor shards gathered once); ZeRO-3 partitions are gathered inside the loss kernels.
        student_weight = _full_weight(student_head.weight, h_s.dtype)
        teacher_weight = _full_weight(teacher_head.weight, h_t.dtype)
        kwargs["student_bias"] = _full_weight(student_head.bias)
        kwargs["teacher_bias"] = _full_weight(teacher_head.bias)
        if not hasattr(teacher_weight, "ds_id"):
            teacher_weight = teacher_weight.to(h_s.device)
        if args.teacher_top_k is not None:
            # Position-chunked: one chunk's [n, V] logits at a time, never [N, V] (large vocabularies).
            per_token, entropy = chunked_dense_divergence(
                h_s, student_weight, h_t, teacher_weight, teacher_top_k=args.teacher_top_k, **kwargs
            )
        else:
            per_token, entropy = chunked_divergence(h_s, student_weight, h_t, teacher_weight, **kwargs)
        if h_s.shape[0] == 0:
            # Keep the graph connected (DDP expects gradients) with an exact zero.
            per_token = per_token + 0.0 * student_hidden.sum()
        loss, _ = opdlm_loss(per_token, row_index, batch, denominator)
        if h_s.shape[0] == 0:
            loss = loss + 0.0 * student_hidden.sum()
        return loss, entropy.sum().detach(), torch.tensor(h_s.shape[0], device=device)

    # ------------------------------------------------------------------------------------------------------------
    # Timing
    # ------------------------------------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch):
        """TRL's training step, plus the split of the step time between rollout, teacher and update."""
        start = time.perf_counter()
        output = super().training_step(model, inputs, num_items_in_batch)
        device = self.accelerator.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self._timings["step"] = self._timings.get("step", 0.0) + time.perf_counter() - start
        if self._step % self.current_gradient_accumulation_steps == 0:
            rollout = self._timings.get("rollout", 0.0)
            teacher = self._timings.get("teacher", 0.0)
            metrics = self._metrics["train"]
            metrics["time/rollout"].append(rollout)
            metrics["time/teacher"].append(teacher)
            metrics["time/update"].append(max(self._timings["step"] - rollout - teacher, 0.0))
            self._timings = {}
        return output
