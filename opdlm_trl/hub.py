"""Saving, publishing and loading block-diffusion LMs.

A saved diffusion LM is a normal transformers folder of its base architecture, plus transformers' custom generation
code:

```
config.json                 base architecture + `dlm_block_size`, `mask_token_id`, `dlm_attention`
model.safetensors           the weights (sharded as transformers does for large models)
generation_config.json      + diffusion defaults: block_size, steps_per_block, threshold, confidence, mask_token_id
tokenizer files             the mask token registered as `mask_token`, left padding
custom_generate/generate.py imports the two modules below; `generate` = the diffusion sampler
custom_generate/attention.py  verbatim copy of `opdlm_trl/attention.py` (torch + transformers only)
custom_generate/sampler.py    verbatim copy of `opdlm_trl/sampler.py` (torch + transformers only)
custom_generate/requirements.txt
README.md                   model card (`opdlm_trl/templates/model_card.md.jinja`)
```

`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` imports `custom_generate/generate.py` (transformers'
`load_custom_generate`), which registers the block-causal mask builders, so the forward of the loaded model is
block-causal and its `.generate()` is the diffusion sampler. The code in the folder is the library's own code, copied at
save time, so the published behaviour cannot drift from the library's.

`load_dlm` reads this format without remote code, the dLLM "a2d" format of the paper's released checkpoints, and any
plain causal LM (converted on the fly).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import cached_file

from . import attention as _attention_module
from . import sampler as _sampler_module
from .a2d import a2d_to_causal_config, find_mask_token, is_a2d_config
from .attention import BIDIRECTIONAL, BLOCK_CAUSAL, _unwrap, convert_to_dlm, is_dlm


logger = logging.getLogger(__name__)

CUSTOM_GENERATE_DIR = "custom_generate"
MODEL_CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md.jinja"
PAPER_TITLE = "Data-Efficient Autoregressive-to-Diffusion Language Models via On-Policy Distillation"
PAPER_ARXIV_ID = "2606.06712"
PAPER_URL = f"https://arxiv.org/abs/{PAPER_ARXIV_ID}"
CITATION = f"""@article{{opdlm2026,
  title   = {{{PAPER_TITLE}}},
  journal = {{arXiv preprint arXiv:{PAPER_ARXIV_ID}}},
  year    = {{2026}},
  url     = {{{PAPER_URL}}}
}}"""
DEFAULT_COMMIT_MESSAGE = "Upload block-diffusion LM (opdlm-trl)"
# Training methods the model card knows how to describe (`method=` of `build_model_card`).
METHODS: dict[str, tuple[str, str]] = {
    "opdlm": (
        "self on-policy distillation (OPDLM)",
        "OPDLM (self on-policy distillation): the student (the base model's weights with block-causal attention and a "
        "mask token) samples its own block-diffusion trajectories; the teacher, the frozen autoregressive model with "
        "plain causal attention, scores the completed sequence; the student is trained to match the teacher's "
        "next-token distributions at the positions that were still masked in one noisy state per block (forward KL, no "
        "masked-diffusion loss). Only prompts are needed; the paper reports benchmark scores comparable to diffusion LMs "
        "trained on 15x to about 7,600x more tokens.",
    ),
    "opdlm_off": (
        "on-policy distillation with random masking (OPDLM_off)",
        "OPDLM_off (the paper's ablation): as OPDLM, the student samples its own block-diffusion trajectories and "
        "matches the frozen autoregressive teacher's next-token distributions at masked positions, but the noisy state "
        "of each block is a random masking of the on-policy sequence instead of a state of its own trajectory.",
    ),
    "bd3lm": (
        "block-diffusion supervised fine-tuning (BD3LM)",
        "Block-diffusion fine-tuning (BD3LM, the baseline of the paper): the model is trained with the masked-diffusion "
        "cross-entropy loss on randomly masked blocks of reference completions, with block-causal attention.",
    ),
    "converted": (
        "conversion only (not trained yet)",
        "This checkpoint is the converted model before any diffusion training: same weights as the base model, "
        "block-causal attention and a mask token. Train it with `OPDLMTrainer` (self on-policy distillation) before "
        "use; untrained, it decodes poorly.",
    ),
}
# Trainer arguments shown in the hyper-parameter table of a card written by a trainer (when present and set).
CARD_HYPERPARAMETERS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "optim",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
    "bf16",
    "seed",
    "block_size",
    "steps_per_block",
    "threshold",
    "temperature",
    "top_k",
    "top_p",
    "max_prompt_length",
    "max_completion_length",
    "curriculum_start_length",
    "curriculum_rollouts",
    "state_selection",
    "divergence",
    "beta",
    "teacher_top_k",
    "loss_temperature",
    "num_generations",
    "generation_batch_size",
)
_REQUIREMENTS = "# Needed by custom_generate/*.py (block-causal attention + diffusion sampler).\ntorch>=2.4\ntransformers>=5.24.0\n"
_UPLOAD_IGNORE = ["__pycache__/*", "*/__pycache__/*", "*.pyc", "checkpoint-*", "training_args.bin"]
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ----------------------------------------------------------------------------------------------------------------------
# The folder's code
# ----------------------------------------------------------------------------------------------------------------------


def _package_version() -> str:
    try:
        return metadata.version("opdlm-trl")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def custom_generate_files() -> dict[str, str]:
    """The files of `custom_generate/`, as `{relative path: text}`.

    `attention.py` and `sampler.py` are the library's modules, byte for byte (they import only torch, transformers and
    each other, through relative imports that transformers' dynamic-module loader resolves inside the folder).
    `generate.py` imports them, which registers the block-causal mask builders, and exposes `generate`.
    """
    files = {
        f"{CUSTOM_GENERATE_DIR}/attention.py": Path(_attention_module.__file__).read_text(encoding="utf-8"),
        f"{CUSTOM_GENERATE_DIR}/sampler.py": Path(_sampler_module.__file__).read_text(encoding="utf-8"),
        f"{CUSTOM_GENERATE_DIR}/requirements.txt": _REQUIREMENTS,
    }
    files[
        f"{CUSTOM_GENERATE_DIR}/generate.py"
    ] = f'''"""Block-diffusion `generate()` of this model, loaded by transformers with `trust_remote_code=True`.

Written by `opdlm_trl.hub.save_dlm` (opdlm-trl {_package_version()}). `attention.py` and `sampler.py` next to this file are
verbatim copies of the modules of the same name in opdlm-trl; they depend only on torch and transformers.

Importing this module registers block-causal attention masks with transformers' `AttentionMaskInterface`: a model whose
config has `dlm_attention == "block_causal"` (this one) then attends block-causally, with blocks of
`config.dlm_block_size` tokens aligned to the end of the input. `generate` is the block-diffusion sampler, with
transformers' `custom_generate` signature; `diffusion_generate` also returns the decoding trajectory.
"""

from .attention import register_dlm_masks
from .sampler import DiffusionOutput, diffusion_generate, generate


register_dlm_masks()

__all__ = ["DiffusionOutput", "diffusion_generate", "generate"]
'''
    return files


def diffusion_generation_config(
    model: PreTrainedModel,
    *,
    steps_per_block: int | None = None,
    threshold: float | None = None,
    confidence: str = "probability",
    block_size: int | None = None,
) -> GenerationConfig:
    """The model's generation config with the diffusion defaults that a saved folder ships.

    Args:
        model: A converted model.
        steps_per_block: Default denoising steps per block. Default: the block size (one token per step, the paper's
            evaluation setting).
        threshold: Default dynamic-commit threshold (None: static decoding).
        confidence: Default confidence measure.
        block_size: Default block size. Default: `config.dlm_block_size`.

    Returns:
        A copy of `model.generation_config` with `block_size`, `steps_per_block`, `threshold`, `confidence` and
        `mask_token_id` set.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    block_size = int(block_size or config.dlm_block_size)
    steps_per_block = int(steps_per_block or block_size)
    if not 1 <= steps_per_block <= block_size:
        raise ValueError(f"steps_per_block must be in [1, block_size={block_size}], got {steps_per_block}.")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1] or None, got {threshold}.")
    if confidence not in _sampler_module.CONFIDENCE_MEASURES:
        raise ValueError(f"confidence must be one of {_sampler_module.CONFIDENCE_MEASURES}, got {confidence!r}.")
    generation_config = copy.deepcopy(model.generation_config)
    generation_config.block_size = block_size
    generation_config.steps_per_block = steps_per_block
    generation_config.threshold = threshold
    generation_config.confidence = confidence
    generation_config.mask_token_id = int(config.mask_token_id)
    generation_config._from_model_config = False  # it carries its own (diffusion) defaults now
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = getattr(config, "pad_token_id", None)
    return generation_config


def _check_saveable(model: Any) -> PreTrainedModel:
    inner = _unwrap(model)
    if not is_dlm(inner):
        raise ValueError(
            "This model is not a diffusion LM: convert it first with "
            "`model, tokenizer = opdlm_trl.convert_to_dlm(model, tokenizer)` (or train it with `OPDLMTrainer`)."
        )
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    if config.dlm_attention not in (BLOCK_CAUSAL, BIDIRECTIONAL):
        raise RuntimeError(
            f"The model is temporarily in {config.dlm_attention!r} attention mode (inside `causal_attention`); save it "
            "outside that context so that the saved config is block-causal."
        )
    return inner


def _merged_if_peft(model: Any) -> Any:
    """A PEFT model's adapters merged into a copy of its base model (the folder must load without peft)."""
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        logger.warning("Merging the PEFT adapters into a copy of the base model to save a standalone diffusion LM.")
        return copy.deepcopy(model).merge_and_unload()
    return model


def write_dlm_files(
    save_directory: str | os.PathLike,
    model: Any,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    steps_per_block: int | None = None,
    threshold: float | None = None,
    confidence: str = "probability",
    model_card: bool = True,
    **card_kwargs: Any,
) -> None:
    """Adds what makes a saved transformers folder a diffusion-LM folder: `custom_generate/`, the diffusion defaults
    of `generation_config.json` and the model card.

    For folders whose weights, config and tokenizer were already written (`model.save_pretrained`,
    `Trainer._save`); `save_dlm` does everything at once.

    Args:
        save_directory: The folder.
        model: The converted model whose folder it is (or a PEFT / DDP wrapper of it).
        tokenizer: Its tokenizer (used by the model card).
        steps_per_block: Default denoising steps per block (default: the block size).
        threshold: Default dynamic-commit threshold (default: None, static decoding).
        confidence: Default confidence measure.
        model_card: Whether to write `README.md`.
        **card_kwargs: Passed to `build_model_card`.
    """
    save_directory = Path(save_directory)
    inner = _check_saveable(model)
    for name, text in custom_generate_files().items():
        path = save_directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    generation_config = diffusion_generation_config(
        inner, steps_per_block=steps_per_block, threshold=threshold, confidence=confidence
    )
    generation_config.save_pretrained(save_directory)
    config_path = save_directory / "config.json"
    if config_path.exists() and "dlm_block_size" not in json.loads(config_path.read_text(encoding="utf-8")):
        logger.warning(
            "%s has no `dlm_block_size`: it was not saved from the converted model (a PEFT adapter folder?). Save "
            "the merged model with `opdlm_trl.hub.save_dlm` to get a folder that loads as a diffusion LM.",
            config_path,
        )
    if model_card:
        card = build_model_card(
            inner,
            tokenizer,
            repo_id=card_kwargs.pop("repo_id", None) or str(save_directory.resolve()),
            generation_config=generation_config,
            **card_kwargs,
        )
        card.save(save_directory / "README.md")


def save_dlm(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    save_directory: str | os.PathLike,
    *,
    steps_per_block: int | None = None,
    threshold: float | None = None,
    confidence: str = "probability",
    max_shard_size: str | int = "5GB",
    model_card: bool = True,
    **card_kwargs: Any,
) -> str:
    """Saves a converted model as a self-contained diffusion-LM folder.

    A fresh Python process loads it with `AutoModelForCausalLM.from_pretrained(save_directory,
    trust_remote_code=True)` into a model whose forward is block-causal and whose `.generate()` runs the diffusion
    sampler, with only torch and transformers installed (`opdlm_trl.hub.load_dlm` loads it without remote code).

    Args:
        model: A model converted by `convert_to_dlm` (or trained by `OPDLMTrainer`); PEFT models are merged into a copy.
        tokenizer: Its tokenizer (with the mask token registered). Saved with left padding, as the sampler needs.
        save_directory: Output folder (created if needed).
        steps_per_block: Default denoising steps per block in `generation_config.json` (default: the block size,
            i.e. one token per step, the paper's evaluation setting).
        threshold: Default dynamic-commit threshold in `generation_config.json` (default: None, static decoding).
        confidence: Default confidence measure (`"probability"`, `"margin"` or `"entropy"`).
        max_shard_size: Passed to `save_pretrained`.
        model_card: Whether to write the model card `README.md`.
        **card_kwargs: Model-card fields, see `build_model_card` (`base_model`, `teacher_model`, `training_tokens`,
            `dataset_name`, `hyperparameters`, `eval_results`, `repo_id`, `license`, `tags`, `example_prompt`, ...).

    Returns:
        The folder path.
    """
    _check_saveable(model)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"`tokenizer` must be a transformers tokenizer, got {type(tokenizer).__name__}.")
    if tokenizer.mask_token is None:
        raise ValueError("The tokenizer has no mask token: pass the tokenizer returned by `convert_to_dlm`.")
    inner = _unwrap(_merged_if_peft(model))
    os.makedirs(save_directory, exist_ok=True)
    inner.save_pretrained(save_directory, max_shard_size=max_shard_size)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        tokenizer.save_pretrained(save_directory)
    finally:
        tokenizer.padding_side = padding_side
    write_dlm_files(
        save_directory,
        inner,
        tokenizer,
        steps_per_block=steps_per_block,
        threshold=threshold,
        confidence=confidence,
        model_card=model_card,
        **card_kwargs,
    )
    return str(save_directory)


# ----------------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------------


def _hub_id(name: str | None) -> str | None:
    """`name` if it looks like a Hub repo id (not a local path), else None."""
    if not name or os.path.isabs(name) or os.path.exists(name) or not _HUB_ID_PATTERN.match(name):
        return None
    return name


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "None"
    return str(value).replace("|", "\\|")


def format_training_tokens(tokens: int | float | None) -> str | None:
    """`1234567` -> `"1,234,567 (0.0012B)"`: the count and the paper's unit (billions)."""
    if tokens is None:
        return None
    return f"{int(tokens):,} ({int(tokens) / 1e9:.4g}B)"


def _eval_table(eval_results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> tuple[list, list]:
    """Normalises evaluation results into (headers, rows of formatted cells)."""
    if not eval_results:
        return [], []
    if isinstance(eval_results, Mapping):
        rows = [
            {"Benchmark": name, **value} if isinstance(value, Mapping) else {"Benchmark": name, "Score": value}
            for name, value in eval_results.items()
        ]
    else:
        rows = [dict(row) for row in eval_results]
    headers: list[str] = []
    for row in rows:
        headers += [key for key in row if key not in headers]
    return headers, [[_format_value(row.get(key, "")) for key in headers] for row in rows]


def _versions() -> dict[str, str]:
    versions = {"opdlm-trl": _package_version()}
    for name in ("trl", "transformers", "torch", "datasets", "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def build_model_card(
    model: Any,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    teacher_model: str | None = None,
    method: str = "opdlm",
    training_tokens: int | None = None,
    dataset_name: str | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    eval_results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: Sequence[str] | None = None,
    example_prompt: str = "The capital of France is",
    max_new_tokens: int = 64,
    generation_config: GenerationConfig | None = None,
) -> ModelCard:
    """Renders the model card of a diffusion LM from `opdlm_trl/templates/model_card.md.jinja`.

    Args:
        model: The converted model.
        tokenizer: Its tokenizer (mask token; the usage snippet uses the chat template when it has one).
        repo_id: Hub id (or local path) the usage snippet loads. Default: `model_name`.
        model_name: Title of the card. Default: the last component of `repo_id`, else `"<base model>-dlm"`.
        base_model: The autoregressive model it was converted from. Default: `config._name_or_path` when it is a Hub
            id.
        teacher_model: The distillation teacher. Default: the base model itself (self-distillation).
        method: Key of `METHODS`: `"opdlm"`, `"opdlm_off"`, `"bd3lm"` or `"converted"` (untrained).
        training_tokens: Training tokens (prompt + completion tokens of every row used in an update).
        dataset_name: The training prompts' dataset.
        hyperparameters: Training hyper-parameters, shown as a table.
        eval_results: Evaluation results: `{"GSM8K": 87.1}`, `{"GSM8K": {"accuracy": 87.1, "tokens/forward": 1.0}}`
            or a list of row dicts; shown as a table.
        license: License id for the card metadata.
        language: Language(s) for the card metadata.
        tags: Extra tags (the card always has `opdlm`, `diffusion-lm`, `block-diffusion`, `trl`, `custom_generate`).
        example_prompt: Prompt of the usage snippet.
        max_new_tokens: `max_new_tokens` of the usage snippet.
        generation_config: The diffusion generation defaults (default: `diffusion_generation_config(model)`).

    Returns:
        A `huggingface_hub.ModelCard` (save it with `.save(path)`; `str(card)` is the markdown).
    """
    inner = _unwrap(model)
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}.")
    generation_config = generation_config or diffusion_generation_config(inner)
    base_model = base_model or _hub_id(getattr(inner.config, "_name_or_path", None))
    if model_name is None:
        model_name = repo_id.rstrip("/").split("/")[-1] if repo_id else f"{(base_model or 'model').split('/')[-1]}-dlm"
    repo_id = repo_id or model_name
    mask_token_id = int(config.mask_token_id)
    mask_token = tokenizer.convert_ids_to_tokens(mask_token_id) if tokenizer is not None else str(mask_token_id)
    tags = list(dict.fromkeys(["opdlm", "diffusion-lm", "block-diffusion", "trl", "custom_generate", *(tags or [])]))
    card_data = ModelCardData(
        base_model=_hub_id(base_model),
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        language=language,
        datasets=[dataset_name] if _hub_id(dataset_name) else None,
        tags=tags,
    )
    eval_headers, eval_rows = _eval_table(eval_results)
    method_name, method_description = METHODS[method]
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id,
        base_model=base_model,
        base_model_url=f"https://huggingface.co/{base_model}" if _hub_id(base_model) else base_model,
        method_name=method_name,
        method_description=method_description,
        paper_title=PAPER_TITLE,
        paper_url=PAPER_URL,
        citation=CITATION,
        architecture=type(inner).__name__,
        block_size=int(generation_config.block_size),
        steps_per_block=int(generation_config.steps_per_block),
        threshold=generation_config.threshold,
        confidence=generation_config.confidence,
        mask_token=mask_token.replace("|", "\\|"),  # a pipe would split the markdown table cell
        mask_token_id=mask_token_id,
        teacher_model=teacher_model
        or (f"{base_model} (self-distillation)" if base_model else "the base model (self-distillation)"),
        training_tokens=format_training_tokens(training_tokens),
        dataset_name=dataset_name,
        hyperparameters={k: _format_value(v) for k, v in (hyperparameters or {}).items()},
        eval_headers=eval_headers,
        eval_rows=eval_rows,
        example_prompt=example_prompt,
        max_new_tokens=int(max_new_tokens),
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
        versions=_versions(),
    )


def usage_snippet(card: ModelCard | str) -> str:
    """The first ```python block of a model card (the usage snippet)."""
    match = re.search(r"```python\n(.*?)```", str(card), flags=re.DOTALL)
    if match is None:
        raise ValueError("The model card has no ```python code block.")
    return match.group(1)


# ----------------------------------------------------------------------------------------------------------------------
# Publishing
# ----------------------------------------------------------------------------------------------------------------------


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Uploads a saved diffusion-LM folder to the Hub (`HfApi.create_repo` + `HfApi.upload_folder`).

    Args:
        folder: A folder written by `save_dlm` (or a trainer's `save_model`).
        repo_id: Target model repository, `"user/name"`.
        commit_message: Commit message (default: `DEFAULT_COMMIT_MESSAGE`).
        private: Visibility when the repository is created.
        token: Hub token (default: the logged-in one).
        revision: Branch to push to.
        create_pr: Open a pull request instead of pushing directly.

    Returns:
        The `CommitInfo` of the upload.
    """
    folder = Path(folder)
    if not (folder / CUSTOM_GENERATE_DIR / "generate.py").is_file():
        raise ValueError(
            f"{folder} is not a diffusion-LM folder (no {CUSTOM_GENERATE_DIR}/generate.py): save it with "
            "`opdlm_trl.hub.save_dlm` first."
        )
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="opdlm-push-") as staging:
        upload_from = _with_card_for_repo(folder, repo_url.repo_id, Path(staging))
        return api.upload_folder(
            repo_id=repo_url.repo_id,
            folder_path=str(upload_from),
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
            ignore_patterns=_UPLOAD_IGNORE,
        )


def _with_card_for_repo(folder: Path, repo_id: str, staging: Path) -> Path:
    """`folder`, or a staging copy (symbolic links) whose model card loads `repo_id`.

    A folder saved locally has a usage snippet that loads the local path; the published card must load the repo id.
    """
    readme = folder / "README.md"
    if not readme.is_file():
        return folder
    text = readme.read_text(encoding="utf-8")
    match = re.search(r'^model_id = "(.*)"$', text, flags=re.MULTILINE)
    if match is None or match.group(1) == repo_id:
        return folder
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if not path.is_file() or relative.as_posix() == "README.md" or "__pycache__" in relative.parts:
            continue
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        try:
            (staging / relative).symlink_to(path.resolve())
        except OSError:  # no symbolic links on this file system
            shutil.copyfile(path, staging / relative)
    (staging / "README.md").write_text(text.replace(match.group(1), repo_id), encoding="utf-8")
    return staging


def push_to_hub(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    **save_kwargs: Any,
) -> Any:
    """Publishes a converted model on the Hub: the folder `save_dlm` writes, uploaded in one commit.

    Args:
        model: A converted model.
        tokenizer: Its tokenizer.
        repo_id: Target model repository, `"user/name"`. Also the id the model card's usage snippet loads.
        commit_message: Commit message (default: `DEFAULT_COMMIT_MESSAGE`).
        private: Visibility when the repository is created.
        token: Hub token (default: the logged-in one).
        revision: Branch to push to.
        create_pr: Open a pull request instead of pushing directly.
        **save_kwargs: Passed to `save_dlm` (generation defaults and model-card fields).

    Returns:
        The `CommitInfo` of the upload.
    """
    save_kwargs.setdefault("repo_id", repo_id)
    with tempfile.TemporaryDirectory(prefix="opdlm-push-") as folder:
        save_dlm(model, tokenizer, folder, **save_kwargs)
        return push_folder_to_hub(
            folder,
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def _read_config_dict(path_or_id: str, **hub_kwargs: Any) -> dict[str, Any]:
    config_file = cached_file(path_or_id, "config.json", **hub_kwargs)
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


def detect_format(path_or_id: str, **hub_kwargs: Any) -> str:
    """Which kind of checkpoint `path_or_id` holds: `"opdlm"` (a folder written by `save_dlm`, or any config with
    `dlm_block_size`), `"a2d"` (dLLM a2d format) or `"causal"` (anything else: a plain causal LM)."""
    config_dict = _read_config_dict(path_or_id, **hub_kwargs)
    text_config = config_dict.get("text_config") or {}
    if "dlm_block_size" in config_dict or "dlm_block_size" in text_config:
        return "opdlm"
    if is_a2d_config(config_dict):
        return "a2d"
    return "causal"


def load_dlm(
    path_or_id: str | os.PathLike,
    *,
    block_size: int | None = None,
    mask_token: str | None = None,
    bidirectional: bool | None = None,
    attn_implementation: str = "auto",
    revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a block-diffusion LM and its tokenizer from a local folder or the Hub, whatever its format.

    Recognised formats:

    - **opdlm-trl** (`save_dlm`, trainers' `save_model`): loaded as the base architecture with the library's own
      attention and sampler (the folder's `custom_generate/` code is not executed); block size, mask token and
      attention mode come from `config.json`.
    - **dLLM a2d** (`model_type` `"a2d-qwen3"`, `"a2d-qwen2"`, `"a2d-llama"`, ...: the paper authors' released
      checkpoints): the config is mapped to the stock architecture and the weights loaded into its `...ForCausalLM`
      without remote code, then converted. The mask token is found in the vocabulary (`<|MASK|>`, ...) and registered;
      the block size, absent from the checkpoint, is `block_size` (default 4).
    - **any causal LM**: loaded with `AutoModelForCausalLM` and converted with `convert_to_dlm` (same weights, a
      mask token, block-causal attention). Train it before use.

    Args:
        path_or_id: Local folder or Hub model id.
        block_size: Block size. Default: the checkpoint's (opdlm format), else 4.
        mask_token: Mask token. Default: the checkpoint's.
        bidirectional: Fully bidirectional attention instead of block-causal. Default: the checkpoint's (opdlm format),
            else False.
        attn_implementation: Kernel of the block masks: `"auto"` (the choice of `convert_to_dlm`: flex attention when
            the model is loaded on CUDA, e.g. with `device_map="cuda"`, else sdpa), `"sdpa"`, `"eager"` or
            `"flex_attention"` (flash-attention cannot take block masks).
        revision: Hub revision.
        token: Hub token.
        trust_remote_code: Passed to transformers for plain causal LMs with custom modeling code. Never needed for the
            opdlm and a2d formats, whose remote code is not run.
        **model_kwargs: Passed to `from_pretrained` (`dtype`, `device_map`, ...).

    Returns:
        `(model, tokenizer)`: a converted model (block-causal forward, `.generate()` = diffusion sampler) and its
        tokenizer with the mask token registered and left padding.
    """
    path_or_id = str(path_or_id)
    hub_kwargs = {"revision": revision, "token": token}
    config_dict = _read_config_dict(path_or_id, **hub_kwargs)
    text_config = config_dict.get("text_config") or {}
    load_attn = "sdpa" if attn_implementation == "auto" else attn_implementation
    model_kwargs = {"attn_implementation": load_attn, **hub_kwargs, **model_kwargs}

    if "dlm_block_size" in config_dict or "dlm_block_size" in text_config:
        saved = text_config if "dlm_block_size" in text_config else config_dict
        model = AutoModelForCausalLM.from_pretrained(path_or_id, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, **hub_kwargs)
        if mask_token is None:
            mask_token = tokenizer.convert_ids_to_tokens(int(saved["mask_token_id"]))
        if block_size is None:
            block_size = int(saved["dlm_block_size"])
        if bidirectional is None:
            bidirectional = saved.get("dlm_attention") == BIDIRECTIONAL
    elif is_a2d_config(config_dict):
        config = a2d_to_causal_config(config_dict)
        model = AutoModelForCausalLM.from_pretrained(path_or_id, config=config, **model_kwargs)
        # Passing the mapped config keeps AutoTokenizer from resolving the remote `auto_map` of config.json.
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, config=config, **hub_kwargs)
        mask_token = mask_token or find_mask_token(tokenizer, config_dict)
    else:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, trust_remote_code=trust_remote_code, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code, **hub_kwargs)
    model, tokenizer = convert_to_dlm(
        model,
        tokenizer,
        block_size=int(block_size or 4),
        bidirectional=bool(bidirectional),
        mask_token=mask_token,
        attn_implementation=attn_implementation,
    )
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Trainer integration
# ----------------------------------------------------------------------------------------------------------------------


def trainer_card_kwargs(trainer: Any, **overrides: Any) -> dict[str, Any]:
    """Model-card fields read off a (TRL) trainer: base model, teacher, hyper-parameters, training tokens."""
    args = trainer.args
    model = _unwrap(trainer.model)
    hyperparameters = {}
    for name in CARD_HYPERPARAMETERS:
        value = getattr(args, name, None)
        if value is not None and not (name in ("warmup_ratio", "warmup_steps", "weight_decay") and not value):
            hyperparameters[name] = getattr(value, "value", value)
    teacher = getattr(args, "teacher_model_name_or_path", None)
    # `OPDLMTrainer` counts training tokens (metrics.count_training_tokens) in `state.num_input_tokens_seen`.
    training_tokens = getattr(trainer.state, "num_input_tokens_seen", None) or None
    kwargs = {
        "base_model": _hub_id(getattr(model.config, "_name_or_path", None)),
        "teacher_model": teacher,
        "hyperparameters": hyperparameters,
        "training_tokens": training_tokens,
        "repo_id": getattr(trainer, "hub_model_id", None) or args.hub_model_id or os.path.abspath(args.output_dir),
    }
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs


class DLMHubMixin:
    """Makes a `transformers.Trainer` subclass save and publish the diffusion-LM folder layout.

    Put it first in the bases: `class OPDLMTrainer(DLMHubMixin, DistillationTrainer)`. Then `trainer.save_model()`,
    every checkpoint and `trainer.push_to_hub()` (which uploads `args.output_dir`) write the same folder as `save_dlm`:
    the trainer's usual files plus `custom_generate/`, the diffusion defaults of `generation_config.json` and the
    opdlm model card (`create_model_card` is overridden).

    Class attributes to override: `_dlm_method` (key of `METHODS` for the model card).
    """

    _dlm_method = "opdlm"

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "peft_config"):
            logger.warning(
                "PEFT model: %s holds the adapter only. For a standalone diffusion-LM folder, call "
                "`opdlm_trl.hub.save_dlm(trainer.model, trainer.processing_class, path)` (adapters are merged).",
                output_dir,
            )
        if not is_dlm(_unwrap(model)):
            return
        card_kwargs = trainer_card_kwargs(self, tags=list(getattr(self, "_tag_names", [])))
        if getattr(self, "hub_model_id", None) is None and not self.args.hub_model_id:
            card_kwargs["repo_id"] = os.path.abspath(output_dir)  # the snippet of a local folder loads that folder
        card_kwargs.setdefault("method", self._dlm_method)
        write_dlm_files(output_dir, model, self.processing_class, **card_kwargs)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Writes the opdlm model card to `args.output_dir/README.md` (replaces TRL's generic card)."""
        if not self.is_world_process_zero():
            return
        if not is_dlm(_unwrap(self.accelerator.unwrap_model(self.model))):
            return super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        card_kwargs = trainer_card_kwargs(
            self, model_name=model_name, dataset_name=dataset_name, tags=tags + list(getattr(self, "_tag_names", []))
        )
        card_kwargs.setdefault("method", self._dlm_method)
        os.makedirs(self.args.output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        build_model_card(model, self.processing_class, **card_kwargs).save(
            os.path.join(self.args.output_dir, "README.md")
        )


__all__ = [
    "CITATION",
    "DLMHubMixin",
    "build_model_card",
    "custom_generate_files",
    "detect_format",
    "diffusion_generation_config",
    "load_dlm",
    "push_folder_to_hub",
    "push_to_hub",
    "save_dlm",
    "trainer_card_kwargs",
    "usage_snippet",
    "write_dlm_files",
]
