"""Loading and converting the student: the part every diffusion trainer (OPDLM, the BD3LM baseline) shares."""

from __future__ import annotations

import logging
from typing import Any

from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin
from trl.trainer.utils import create_model_from_path, get_config_model_id

from .attention import BLOCK_CAUSAL, _unwrap, convert_to_dlm, is_dlm


logger = logging.getLogger(__name__)


def prepare_student(
    model: str | PreTrainedModel,
    processing_class: PreTrainedTokenizerBase | None,
    args: Any,
    quantization_config: Any | None = None,
    config_name: str = "OPDLMConfig",
) -> tuple[Any, PreTrainedTokenizerBase, bool]:
    """Loads the student (as TRL does), loads its tokenizer, and converts it to a block-diffusion LM in place.

    Conversion must happen between loading and PEFT wrapping, which is why the trainers do this before calling their
    TRL base class's `__init__`.

    Args:
        model: A causal LM id/path (loaded with `args.model_init_kwargs` and `quantization_config`), a causal LM
            instance (converted with `convert_to_dlm(block_size=args.block_size)`), or an already converted model
            (its block size must equal `args.block_size`).
        processing_class: The tokenizer; default: loaded from the model's id (left padding and truncation).
        args: The trainer's config (`block_size`, `mask_token`, `model_init_kwargs`, `trust_remote_code`).
        quantization_config: Optional quantization config, applied when `model` is a path.
        config_name: The config class named in error messages.

    Returns:
        The model (the same object when an instance was given), the tokenizer, and whether the embeddings were resized
        to add the mask token (the original weights then lack that row).

    Raises:
        ValueError: Quantization set twice, no tokenizer to load, a non-tokenizer processing class, a block-size
            mismatch, or a bidirectional model.
    """
    model_init_kwargs = dict(args.model_init_kwargs or {})
    if isinstance(model, str):
        model_id = model
        if quantization_config is not None:
            if "quantization_config" in model_init_kwargs:
                raise ValueError(
                    "You set `quantization_config` both as a trainer argument and in `args.model_init_kwargs`. "
                    "Set it in only one place, preferably as a trainer argument."
                )
            model_init_kwargs["quantization_config"] = quantization_config
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            model_init_kwargs["device_map"] = None  # distributed training requires it ("auto" fails)
        model_init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        model_init_kwargs.setdefault("attn_implementation", "sdpa")  # flash-attention cannot take block masks
        model = create_model_from_path(model, **model_init_kwargs)
    else:
        model_id = get_config_model_id(_unwrap(model).config)
        if args.model_init_kwargs is not None:
            logger.warning("`model_init_kwargs` is ignored: the model is already instantiated.")
        if quantization_config is not None:
            logger.warning("`quantization_config` is ignored: the model is already instantiated.")
    if processing_class is None:
        if not model_id:
            raise ValueError("Pass `processing_class=`: the tokenizer cannot be loaded from the model's config.")
        processing_class = AutoTokenizer.from_pretrained(
            model_id, truncation_side="left", padding_side="left", trust_remote_code=args.trust_remote_code
        )
    if isinstance(processing_class, ProcessorMixin) or not isinstance(processing_class, PreTrainedTokenizerBase):
        raise ValueError(
            "Diffusion trainers train text-only causal LMs and need a tokenizer as `processing_class`, got "
            f"{type(processing_class).__name__}."
        )
    tokenizer = processing_class
    hf_model = _unwrap(model)
    if is_dlm(hf_model):
        if hf_model.config.dlm_block_size != args.block_size:
            raise ValueError(
                f"The model was converted with block_size={hf_model.config.dlm_block_size} but "
                f"args.block_size={args.block_size}. Set `{config_name}(block_size="
                f"{hf_model.config.dlm_block_size})`, or pass the unconverted causal model."
            )
        if tokenizer.mask_token_id is None:
            tokenizer.mask_token = tokenizer.convert_ids_to_tokens(hf_model.config.mask_token_id)
    else:
        convert_to_dlm(hf_model, tokenizer, block_size=args.block_size, mask_token=args.mask_token)
    if getattr(hf_model.config, "dlm_attention", BLOCK_CAUSAL) != BLOCK_CAUSAL:
        raise ValueError(
            "Training rows need a block-causal student; this model was converted with bidirectional=True."
        )
    resized = getattr(hf_model.config, "dlm_original_vocab_size", None) is not None
    return model, tokenizer, resized
