"""The `opdlm` command line: train, baseline, generate, eval, push.

```bash
opdlm train --model_name_or_path Qwen/Qwen3-0.6B --dataset_name trl-lib/ultrafeedback-prompt --output_dir Qwen3-0.6B-OPDLM
opdlm train --config recipe.yaml                      # every OPDLMConfig / ModelConfig field is a flag or a YAML key
opdlm baseline --model_name_or_path ... --dataset_name ...   # block-diffusion SFT (BD3LM) baseline
opdlm generate --model_name_or_path Qwen3-0.6B-OPDLM --prompt "What is 2 + 2?" --threshold 0.9
opdlm eval --model_name_or_path Qwen3-0.6B-OPDLM --dataset_name my/dataset --dataset_split test
opdlm push --model_name_or_path Qwen3-0.6B-OPDLM --repo_id user/Qwen3-0.6B-OPDLM
```

Arguments are parsed by `trl.TrlParser` (a `transformers.HfArgumentParser`), so `--config file.yaml` works for every
subcommand and every dataclass field is a flag. Trainers are imported lazily, inside their subcommand.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


logger = logging.getLogger(__name__)

CONFIDENCE_CHOICES = ["probability", "margin", "entropy"]


# ----------------------------------------------------------------------------------------------------------------------
# Argument dataclasses
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DLMModelArguments:
    """Which model to load (any format `opdlm_trl.hub.load_dlm` reads) and how."""

    model_name_or_path: str = field(
        metadata={
            "help": "Local folder or Hub id of the model: a diffusion LM saved by opdlm-trl, a dLLM a2d checkpoint "
            "(model_type a2d-qwen3, ...) or any causal LM (converted on the fly)."
        },
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Weights dtype: 'auto', 'bfloat16', 'float16' or 'float32'. Default: transformers' default.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "Attention kernel of the block masks: 'auto' (flex attention on CUDA, else sdpa), 'sdpa', 'eager' "
            "or 'flex_attention' (flash-attention cannot take block masks).",
            "choices": ["auto", "sdpa", "eager", "flex_attention"],
        },
    )
    device: str | None = field(
        default=None, metadata={"help": "Device to run on, e.g. 'cpu', 'cuda', 'cuda:1'. Default: cuda if available."}
    )
    mask_token: str | None = field(
        default=None,
        metadata={"help": "Mask token, for models converted on the fly. Default: the checkpoint's, else a new one."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow custom modeling code of plain causal LMs (never needed for opdlm / a2d folders)."},
    )


@dataclass
class BlockArguments:
    """Block-diffusion decoding options shared by `generate`, `eval` and `push`."""

    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Block size b of block-diffusion decoding. Default: the model's (set at conversion/training), "
            "4 for checkpoints without one."
        },
    )
    steps_per_block: int | None = field(
        default=None,
        metadata={
            "help": "Denoising steps per block of the static schedule (block_size / steps_per_block tokens committed "
            "per step). Default: the model's generation config, else block_size (one token per step)."
        },
    )
    threshold: float | None = field(
        default=None,
        metadata={
            "help": "Dynamic commit rule: commit every masked position whose confidence exceeds this threshold (at "
            "least the static quota per step), e.g. 0.9. Default: static decoding."
        },
    )
    confidence: str | None = field(
        default=None,
        metadata={
            "help": "Confidence measure used to rank positions: 'probability', 'margin' or 'entropy'. Default: the "
            "model's generation config, else 'probability'.",
            "choices": CONFIDENCE_CHOICES,
        },
    )


@dataclass
class SamplingArguments:
    """Sampling options of `generate` and `eval`."""

    max_new_tokens: int = field(
        default=64,
        metadata={"help": "Tokens to generate per prompt (decoded in blocks of block_size, then trimmed)."},
    )
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature; 0 = greedy decoding."})
    top_k: int = field(default=0, metadata={"help": "Top-k filter when sampling (0 = off)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus (top-p) filter when sampling (1.0 = off)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts decoded together."})
    seed: int = field(default=0, metadata={"help": "Random seed of sampling (temperature > 0)."})
    use_chat_template: bool = field(
        default=False,
        metadata={"help": "Wrap each plain-text prompt as a user message and apply the tokenizer's chat template."},
    )


@dataclass
class GenerateArguments:
    """Inputs and outputs of `opdlm generate`."""

    prompt: list[str] = field(
        default_factory=list, metadata={"help": 'Prompt(s) to complete: --prompt "first prompt" "second prompt".'}
    )
    prompts_file: str | None = field(
        default=None,
        metadata={"help": "Text file with one prompt per line, or a .jsonl file with a 'prompt' field per line."},
    )
    output_file: str | None = field(
        default=None, metadata={"help": "Write one JSON object per prompt (prompt, completion, stats) to this file."}
    )
    output_format: str = field(
        default="text",
        metadata={
            "help": "Standard output: 'text' (one completion per prompt) or 'jsonl' (one JSON object per prompt).",
            "choices": ["text", "jsonl"],
        },
    )


@dataclass
class EvalArguments:
    """Held-out exact-match evaluation of `opdlm eval`."""

    dataset_name: str = field(
        metadata={"help": "Dataset with prompt/completion columns: a Hub id, a local folder or a data file."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts."})
    completion_column: str = field(default="completion", metadata={"help": "Column holding the reference answers."})
    num_examples: int | None = field(default=None, metadata={"help": "Evaluate the first N examples only."})
    output_file: str | None = field(
        default=None, metadata={"help": "Write the metrics and every prediction (JSON) to this file."}
    )


@dataclass
class PushArguments:
    """Publishing options of `opdlm push`."""

    repo_id: str = field(metadata={"help": "Target Hub model repository, 'user/name'."})
    private: bool | None = field(default=None, metadata={"help": "Create the repository as private."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message of the upload."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of pushing directly."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    base_model: str | None = field(
        default=None, metadata={"help": "Model card: the autoregressive model the diffusion LM comes from."}
    )
    method: str | None = field(
        default=None,
        metadata={
            "help": "Model card: how the model was trained ('opdlm', 'opdlm_off', 'bd3lm', or 'converted' for an "
            "untrained conversion). Default: 'converted' for plain causal LMs, else 'opdlm'.",
            "choices": ["opdlm", "opdlm_off", "bd3lm", "converted"],
        },
    )
    license: str | None = field(default=None, metadata={"help": "Model card: license id."})


# ----------------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------------


def _parser(dataclass_types: Sequence[type], prog: str, description: str):
    from trl import TrlParser

    return TrlParser(dataclass_types, prog=prog, description=description, allow_abbrev=False)


def _unknown_arguments(parser, argv: Sequence[str]) -> list[str]:
    """Arguments argparse does not know, found before any dataclass is built (their `__post_init__` may raise)."""
    import argparse

    argv = list(argv)
    if "--config" in argv:
        index = argv.index("--config")
        del argv[index : index + 2]
    saved = [(action, action.required) for action in parser._actions]
    for action, _ in saved:
        action.required = False  # required values may come from the config file
    try:
        _, remaining = argparse.ArgumentParser.parse_known_args(parser, argv)
    finally:
        for action, required in saved:
            action.required = required
    return remaining


def _parse(parser, argv: Sequence[str]) -> tuple:
    """Parses `argv` (with `--config file.yaml`); unknown flags and invalid values are argparse errors (exit code 2)
    whose message names the flag."""
    remaining = _unknown_arguments(parser, argv)
    if remaining:
        unknown = [arg for arg in remaining if arg.startswith("-")] or remaining
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        *parsed, remaining = parser.parse_args_and_config(list(argv), return_remaining_strings=True)
    except ValueError as error:  # a config's __post_init__ check, or a bad config file
        parser.error(str(error))
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    return tuple(parsed)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def load_prompt_dataset(name: str, config: str | None = None, streaming: bool = False):
    """Loads a dataset the way TRL's scripts do, plus local folders and files.

    Args:
        name: Hub id, a folder written by `Dataset(Dict).save_to_disk`, a folder of data files, or a single
            `.json`/`.jsonl`/`.csv`/`.parquet` file.
        config: Dataset configuration name.
        streaming: Stream the dataset.

    Returns:
        A `DatasetDict` (a single saved `Dataset` becomes its `"train"` split).
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if os.path.isdir(name) and (
        os.path.exists(os.path.join(name, "dataset_dict.json")) or os.path.exists(os.path.join(name, "state.json"))
    ):
        dataset = load_from_disk(name)
    elif os.path.isfile(name):
        extension = os.path.splitext(name)[1].lstrip(".")
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(extension)
        if builder is None:
            raise ValueError(f"Unsupported data file {name!r}: use .json, .jsonl, .csv or .parquet.")
        dataset = load_dataset(builder, data_files=name, streaming=streaming)
    else:
        dataset = load_dataset(name, name=config, streaming=streaming)
    if isinstance(dataset, Dataset):
        dataset = DatasetDict({"train": dataset})
    return dataset


def _torch_dtype(dtype: str | None):
    import torch

    if dtype is None or dtype == "auto":
        return dtype
    return getattr(torch, dtype)


def _load_model(model_args: DLMModelArguments, block_size: int | None = None):
    import torch

    from .hub import load_dlm

    device = model_args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"device_map": device}  # on the device at conversion: "auto" attention sees it
    if model_args.dtype is not None:
        kwargs["dtype"] = _torch_dtype(model_args.dtype)
    model, tokenizer = load_dlm(
        model_args.model_name_or_path,
        block_size=block_size,
        mask_token=model_args.mask_token,
        attn_implementation=model_args.attn_implementation,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
        **kwargs,
    )
    return model, tokenizer


def _text_of(value: Any) -> str:
    """The text of a prompt/completion cell: a string, or the content of the last message of a conversation."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return str(value)


def _encode(tokenizer, prompts: Sequence[Any], use_chat_template: bool):
    """Tokenizes prompts (strings, or conversations in TRL's conversational format), left-padded."""
    texts = []
    for prompt in prompts:
        if isinstance(prompt, list):  # conversational prompt
            texts.append(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))
        elif use_chat_template:
            messages = [{"role": "user", "content": prompt}]
            texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        else:
            texts.append(prompt)
    add_special_tokens = not (use_chat_template or any(isinstance(p, list) for p in prompts))
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)


def _complete(model, tokenizer, prompts: Sequence[Any], block: BlockArguments, sampling: SamplingArguments):
    """Completes `prompts` in batches. Returns (completions, list of per-batch stats)."""
    import torch

    from .sampler import diffusion_generate

    tokenizer.padding_side = "left"
    generation_config = model.generation_config
    kwargs = {
        "block_size": block.block_size,
        "steps_per_block": block.steps_per_block or getattr(generation_config, "steps_per_block", None),
        "threshold": block.threshold if block.threshold is not None else getattr(generation_config, "threshold", None),
        "confidence": block.confidence or getattr(generation_config, "confidence", None) or "probability",
    }
    if kwargs["block_size"] is not None and kwargs["steps_per_block"] is not None:
        kwargs["steps_per_block"] = min(kwargs["steps_per_block"], kwargs["block_size"])
    generator = torch.Generator(device=model.device).manual_seed(sampling.seed)
    completions, stats = [], []
    for start in range(0, len(prompts), sampling.batch_size):
        batch = _encode(tokenizer, prompts[start : start + sampling.batch_size], sampling.use_chat_template)
        batch = batch.to(model.device)
        out = diffusion_generate(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            generator=generator,
            **kwargs,
        )
        new_tokens = out.sequences[:, batch["input_ids"].shape[1] :]
        completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        stats.append({"nfe": out.nfe, "tokens_per_forward": out.tokens_per_forward, "rows": len(new_tokens)})
    return completions, stats


def _summary(stats: list[dict]) -> dict[str, float]:
    rows = sum(s["rows"] for s in stats) or 1
    return {
        "nfe": int(sum(s["nfe"] for s in stats)),
        "tokens_per_forward": sum(s["tokens_per_forward"] * s["rows"] for s in stats) / rows,
    }


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: strip both ends and collapse inner whitespace."""
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------------------------------


def train_main(script_args, training_args, model_args, trainer_cls: type | None = None) -> Any:
    """Runs a training script: loads the dataset and the student, trains, saves and optionally pushes.

    Shared by `opdlm train` / `opdlm baseline` and `examples/scripts/opdlm.py`.

    Args:
        script_args: `trl.ScriptArguments` (dataset_name, dataset_config, splits).
        training_args: `OPDLMConfig` (or the baseline's config).
        model_args: `trl.ModelConfig` (model_name_or_path, dtype, attn_implementation, PEFT and quantization).
        trainer_cls: The trainer class (default: `OPDLMTrainer`).

    Returns:
        The trainer, after training.
    """
    from trl import get_peft_config, get_quantization_config

    from .hub import detect_format, load_dlm

    if trainer_cls is None:
        from .trainer import OPDLMTrainer

        trainer_cls = OPDLMTrainer
    if not model_args.model_name_or_path:
        raise ValueError("Set the student with `--model_name_or_path`.")
    if not script_args.dataset_name:
        raise ValueError("Set the training prompts with `--dataset_name` (a Hub id, a local folder or a data file).")

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": getattr(training_args, "trust_remote_code", False),
        "attn_implementation": model_args.attn_implementation or "sdpa",
        "dtype": model_args.dtype,
    }
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)

    model: Any = model_args.model_name_or_path
    processing_class = None
    if detect_format(model_args.model_name_or_path, revision=model_args.model_revision) == "a2d":
        # The authors' released checkpoints: mapped to the stock architecture without remote code.
        model, processing_class = load_dlm(
            model_args.model_name_or_path,
            block_size=training_args.block_size,
            mask_token=getattr(training_args, "mask_token", None),
            attn_implementation=model_args.attn_implementation or "auto",
            revision=model_args.model_revision,
            dtype=_torch_dtype(model_args.dtype),
        )
        model.train()
    else:
        training_args.model_init_kwargs = model_init_kwargs

    dataset = load_prompt_dataset(script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = dataset[script_args.dataset_test_split]
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    if hasattr(trainer, "end"):
        trainer.end()
    return trainer


def cmd_train(argv: Sequence[str]) -> int:
    """`opdlm train`: OPDLM self on-policy distillation (OPDLMTrainer)."""
    from trl import ModelConfig, ScriptArguments

    from .config import OPDLMConfig

    parser = _parser(
        (ScriptArguments, OPDLMConfig, ModelConfig),
        "opdlm train",
        "Convert a causal LM into a block-diffusion LM by self on-policy distillation (OPDLMTrainer). Every "
        "OPDLMConfig, ModelConfig and ScriptArguments field is a flag; `--config file.yaml` sets them from YAML.",
    )
    script_args, training_args, model_args = _parse(parser, argv)
    from .trainer import OPDLMTrainer

    train_main(script_args, training_args, model_args, OPDLMTrainer)
    return 0


def _baseline_module():
    """`opdlm_trl.baseline`, or None when this installation does not have it (errors inside it propagate)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(f"{__package__}.baseline") is None:
        return None
    return importlib.import_module(f"{__package__}.baseline")


def cmd_baseline(argv: Sequence[str]) -> int:
    """`opdlm baseline`: the block-diffusion SFT baseline (BD3LM)."""
    from trl import ModelConfig, ScriptArguments

    baseline = _baseline_module()
    if baseline is None:
        parser = _parser(
            (ScriptArguments, ModelConfig),
            "opdlm baseline",
            "Block-diffusion supervised fine-tuning baseline (BD3LM). Not available in this installation: the "
            "module `opdlm_trl.baseline` is missing.",
        )
        _parse(parser, argv)  # --help and flag errors still work
        parser.error("the BD3LM baseline is not available: `opdlm_trl.baseline` is missing from this installation.")
    parser = _parser(
        (ScriptArguments, baseline.BD3LMConfig, ModelConfig),
        "opdlm baseline",
        "Block-diffusion supervised fine-tuning baseline (BD3LM): masked-diffusion cross-entropy on reference "
        "completions. Every BD3LMConfig, ModelConfig and ScriptArguments field is a flag; `--config file.yaml` works.",
    )
    script_args, training_args, model_args = _parse(parser, argv)
    train_main(script_args, training_args, model_args, baseline.BD3LMTrainer)
    return 0


def cmd_generate(argv: Sequence[str]) -> int:
    """`opdlm generate`: prompts in, completions out."""
    parser = _parser(
        (DLMModelArguments, BlockArguments, SamplingArguments, GenerateArguments),
        "opdlm generate",
        "Complete prompts with a block-diffusion LM (block-by-block parallel denoising with an exact KV cache).",
    )
    model_args, block, sampling, gen = _parse(parser, argv)
    prompts: list[Any] = list(gen.prompt)
    if gen.prompts_file:
        with open(gen.prompts_file, encoding="utf-8") as f:
            if gen.prompts_file.endswith(".jsonl"):
                prompts += [json.loads(line)["prompt"] for line in f if line.strip()]
            else:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        parser.error("no prompt: pass --prompt TEXT (repeatable) or --prompts_file FILE.")
    model, tokenizer = _load_model(model_args, block.block_size)
    completions, stats = _complete(model, tokenizer, prompts, block, sampling)
    summary = _summary(stats)
    records = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    for record in records:
        print(json.dumps(record, ensure_ascii=False) if gen.output_format == "jsonl" else record["completion"])
    if gen.output_file:
        with open(gen.output_file, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps({**record, **summary}, ensure_ascii=False) + "\n")
    print(f"nfe={summary['nfe']} tokens_per_forward={summary['tokens_per_forward']:.3f}", file=sys.stderr)
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    """`opdlm eval`: held-out exact-match accuracy."""
    parser = _parser(
        (DLMModelArguments, BlockArguments, SamplingArguments, EvalArguments),
        "opdlm eval",
        "Exact-match accuracy of a block-diffusion LM on a dataset with prompt/completion columns (predictions and "
        "references are compared after stripping and collapsing whitespace). Prints one JSON object.",
    )
    model_args, block, sampling, eval_args = _parse(parser, argv)
    dataset = load_prompt_dataset(eval_args.dataset_name, eval_args.dataset_config)
    if eval_args.dataset_split not in dataset:
        parser.error(f"split {eval_args.dataset_split!r} not found in {eval_args.dataset_name}: {list(dataset)}.")
    split = dataset[eval_args.dataset_split]
    for column in (eval_args.prompt_column, eval_args.completion_column):
        if column not in split.column_names:
            parser.error(f"column {column!r} not found in the dataset (columns: {split.column_names}).")
    if eval_args.num_examples is not None:
        split = split.select(range(min(eval_args.num_examples, len(split))))
    prompts = list(split[eval_args.prompt_column])
    references = [_text_of(c) for c in split[eval_args.completion_column]]
    model, tokenizer = _load_model(model_args, block.block_size)
    predictions, stats = _complete(model, tokenizer, prompts, block, sampling)
    correct = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]
    metrics = {
        "exact_match": sum(correct) / max(len(correct), 1),
        "num_examples": len(correct),
        **_summary(stats),
    }
    print(json.dumps(metrics))
    if eval_args.output_file:
        with open(eval_args.output_file, "w", encoding="utf-8") as f:
            rows = [
                {"prompt": _text_of(p), "prediction": y, "reference": r, "correct": c}
                for p, y, r, c in zip(prompts, predictions, references, correct)
            ]
            json.dump({"metrics": metrics, "predictions": rows}, f, ensure_ascii=False, indent=2)
    return 0


def cmd_push(argv: Sequence[str]) -> int:
    """`opdlm push`: publish a diffusion LM on the Hub."""
    parser = _parser(
        (DLMModelArguments, BlockArguments, PushArguments),
        "opdlm push",
        "Publish a diffusion LM on the Hub. A folder saved by opdlm-trl (save_dlm, trainer.save_model) is uploaded "
        "as saved (its model card now loading the repo id; the decoding options below are then ignored). Any other "
        "model (a2d checkpoint, causal LM) is loaded, converted and saved with the decoding options as "
        "generation_config.json defaults, then uploaded.",
    )
    model_args, block, push = _parse(parser, argv)
    from .hub import detect_format, push_folder_to_hub, push_to_hub

    source = model_args.model_name_or_path
    fmt = detect_format(source, revision=model_args.model_revision)
    hub_kwargs = {
        "commit_message": push.commit_message,
        "private": push.private,
        "token": push.token,
        "revision": push.revision,
        "create_pr": push.create_pr,
    }
    if (
        fmt == "opdlm"
        and os.path.isdir(source)
        and os.path.isfile(os.path.join(source, "custom_generate", "generate.py"))
    ):
        if any(v is not None for v in (block.block_size, block.steps_per_block, block.threshold, block.confidence)):
            logger.warning("Uploading %s as saved: the decoding options are ignored.", source)
        commit = push_folder_to_hub(source, push.repo_id, **hub_kwargs)
    else:
        model, tokenizer = _load_model(model_args, block.block_size)
        card = {"base_model": push.base_model, "license": push.license}
        commit = push_to_hub(
            model,
            tokenizer,
            push.repo_id,
            steps_per_block=block.steps_per_block,
            threshold=block.threshold,
            confidence=block.confidence or "probability",
            method=push.method or ("converted" if fmt == "causal" else "opdlm"),
            **{k: v for k, v in card.items() if v is not None},
            **hub_kwargs,
        )
    print(getattr(commit, "commit_url", None) or f"https://huggingface.co/{push.repo_id}")
    return 0


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "train": (cmd_train, "Train a block-diffusion LM by self on-policy distillation (OPDLMTrainer)."),
    "baseline": (cmd_baseline, "Train the block-diffusion SFT baseline (BD3LM)."),
    "generate": (cmd_generate, "Complete prompts with a block-diffusion LM."),
    "eval": (cmd_eval, "Exact-match accuracy on a prompt/completion dataset."),
    "push": (cmd_push, "Publish a block-diffusion LM on the Hub."),
}


def _usage() -> str:
    lines = ["usage: opdlm {" + ",".join(COMMANDS) + "} [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `opdlm <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `opdlm` console script.

    Args:
        argv: Arguments after the program name (default: `sys.argv[1:]`).

    Returns:
        The exit code (argparse errors exit with code 2 through `SystemExit`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(_usage(), file=sys.stderr)
        print(f"\nopdlm: error: unknown command {command!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:%(name)s: %(message)s")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # keep stderr readable: no "Loading weights" bars
    return COMMANDS[command][0](rest)


if __name__ == "__main__":
    raise SystemExit(main())
