# Copyright 2026 The opdlm-trl authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""
The main job: convert an autoregressive LM into a block-diffusion LM with `OPDLMTrainer`, and measure it.

By default it converts the small autoregressive teacher shipped with the package (`opdlm_trl/demo/teacher`: a 0.8M-
parameter decoder that sorts lists of 8-16 integers, greedy exact match 100% on held-out prompts) on CPU in a few
minutes, with the demo's prompts. It prints, on held-out prompts (greedy decoding):

- the teacher's accuracy (autoregressive `generate`);
- the accuracy of the freshly converted, untrained student (what the conversion alone does);
- the trained student's accuracy with static decoding (one token per forward) and with the dynamic threshold 0.9
  (parallel decoding), and its tokens per forward;
- the training tokens used (prompt + completion tokens of every row used in an update,
  `opdlm_trl.metrics.count_training_tokens`);

and saves the converted model as a diffusion-LM folder (`trainer.save_model`; load it with `opdlm_trl.hub.load_dlm`
or `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`).

```bash
python examples/convert_demo.py                                   # the demo (CPU, a few minutes)
python examples/convert_demo.py --max_steps 50 --num_eval 50      # a quicker look
```

The same code path runs on a real model; only the model and the prompts differ (and the hyper-parameters, which are
set for the demo here: pass the paper's, as in `examples/scripts/opdlm.py`):

```bash
python examples/convert_demo.py --model_name_or_path Qwen/Qwen3-0.6B --dataset_name trl-lib/ultrafeedback-prompt \
    --learning_rate 1e-5 --per_device_train_batch_size 8 --max_prompt_length 512 --max_completion_length 256 \
    --max_steps 500 --temperature 1.0 --bf16 --output_dir Qwen3-0.6B-OPDLM
```

Every `OPDLMConfig`, `ModelConfig` and `ScriptArguments` field is a flag (`--config recipe.yaml` works too), plus the
evaluation flags of `DemoArguments`. A dataset with a `completion` column in its test split is scored by exact match
against it; without one, the students are scored by agreement with the teacher's greedy completions.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


# The demo's hyper-parameters (any flag overrides them), chosen by measurement on 2 CPU cores (README, "Token
# efficiency"). Rollout temperature 2.0, not the paper's 1.0: the freshly converted 0.8M-parameter student predicts one
# number at every masked position, and at temperature 1.0 its rollouts (and so the teacher's targets) stay that
# degenerate: 0% exact match after 1,750 steps (constant lr 1e-3; 1.5 also stayed at 0%). The paper's 0.6B-8B students do
# not start there.
DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": "demo-OPDLM",
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 5,
    "per_device_train_batch_size": 8,
    "max_steps": 3000,
    "max_grad_norm": 1.0,
    "temperature": 2.0,
    "threshold": 0.9,
    "steps_per_block": 4,
    "block_size": 4,
    "max_prompt_length": 64,
    "max_completion_length": 17,  # the longest demo completion (16 numbers) + EOS
    "logging_steps": 50,
    "save_strategy": "no",
    "report_to": "none",
    "activation_checkpointing": False,  # a 0.8M-parameter model: recomputation would only cost time
    "seed": 0,
}


@dataclass
class DemoArguments:
    """Evaluation options of the demo."""

    num_eval: int = field(
        default=200,
        metadata={"help": "Number of held-out prompts evaluated (greedy decoding), before and after training."},
    )
    eval_batch_size: int = field(default=200, metadata={"help": "Prompts decoded per batch during evaluation."})
    eval_threshold: float = field(
        default=0.9,
        metadata={"help": "Confidence threshold of the dynamic (parallel) decoding evaluated after training."},
    )
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Tokens generated per prompt at evaluation. Default: max_completion_length."}
    )


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def load_data(dataset_name: str | None, dataset_config: str | None, train_split: str, test_split: str, num_eval: int):
    """The training prompts and the held-out evaluation set.

    Args:
        dataset_name: A Hub id, a local folder or data file, or `None` for the demo's sorting task.
        dataset_config: Dataset configuration name.
        train_split: Training split.
        test_split: Evaluation split. When the dataset has none, the last `num_eval` rows of the training split are
            held out (and not trained on).
        num_eval: Number of evaluation prompts.

    Returns:
        `(train_dataset, eval_dataset)`: the first with a `prompt` column only (OPDLM needs no responses), the second
        with `prompt` and, when the data has it, `completion`.
    """
    if dataset_name is None:
        from opdlm_trl.demo import make_splits

        splits = make_splits()
        train, test = splits["train"], splits["test"]
    else:
        from opdlm_trl.cli import load_prompt_dataset

        splits = load_prompt_dataset(dataset_name, dataset_config)
        if train_split not in splits:
            raise ValueError(f"Split {train_split!r} not found in {dataset_name}: {list(splits)}.")
        train = splits[train_split]
        if test_split in splits:
            test = splits[test_split]
        else:
            if len(train) <= num_eval:
                raise ValueError(
                    f"{dataset_name} has no {test_split!r} split and only {len(train)} training rows: cannot hold "
                    f"out {num_eval} prompts. Lower --num_eval."
                )
            test = train.select(range(len(train) - num_eval, len(train)))
            train = train.select(range(len(train) - num_eval))
    if "prompt" not in train.column_names:
        raise ValueError(f"The training data has no 'prompt' column (columns: {train.column_names}).")
    test = test.select(range(min(num_eval, len(test))))
    keep = [c for c in ("prompt", "completion") if c in test.column_names]
    return train.select_columns(["prompt"]), test.select_columns(keep)


def encode_prompts(tokenizer, prompts: Sequence[Any]):
    """Tokenizes prompts as the trainer does: text as is, conversations with the chat template; left-padded."""
    texts, conversational = [], False
    for prompt in prompts:
        if isinstance(prompt, list):
            conversational = True
            texts.append(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))
        else:
            texts.append(prompt)
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not conversational)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


def score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Exact match in [0, 1] (whitespace-normalised, cut at EOS) through the shipped `evaluate` metric."""
    from opdlm_trl.demo import exact_match

    return float(exact_match(list(predictions), list(references)))


@torch.no_grad()
def generate_teacher(model, tokenizer, prompts: Sequence[Any], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy autoregressive completions (transformers' `generate`)."""
    model.eval()
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = encode_prompts(tokenizer, prompts[start : start + batch_size]).to(model.device)
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        outputs += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return outputs


@torch.no_grad()
def generate_student(
    model,
    tokenizer,
    prompts: Sequence[Any],
    max_new_tokens: int,
    batch_size: int,
    threshold: float | None = None,
) -> tuple[list[str], float]:
    """Greedy block-diffusion completions: static decoding (one token per forward) or dynamic (`threshold`).

    Returns:
        `(completions, tokens_per_forward)`, the latter averaged over prompts.
    """
    from opdlm_trl import diffusion_generate

    was_training = model.training
    model.eval()
    block_size = int(model.config.dlm_block_size)
    outputs, weighted_tpf = [], 0.0
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            batch = encode_prompts(tokenizer, chunk).to(model.device)
            out = diffusion_generate(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                block_size=block_size,
                steps_per_block=block_size,
                threshold=threshold,
                temperature=0.0,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            outputs += tokenizer.batch_decode(
                out.sequences[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
            weighted_tpf += out.tokens_per_forward * len(chunk)
    finally:
        model.train(was_training)
    return outputs, weighted_tpf / max(len(prompts), 1)


def evaluate_student(model, tokenizer, prompts, references, max_new_tokens, batch_size, threshold=None) -> dict:
    """Exact match and tokens per forward of a diffusion student (greedy)."""
    predictions, tpf = generate_student(model, tokenizer, prompts, max_new_tokens, batch_size, threshold)
    return {"exact_match": score(predictions, references), "tokens_per_forward": tpf, "predictions": predictions}


# ----------------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------------


def make_parser():
    """TRL's parser over `ScriptArguments`, `OPDLMConfig`, `ModelConfig` and `DemoArguments`, with the demo defaults."""
    from trl import ModelConfig, ScriptArguments, TrlParser

    from opdlm_trl.config import OPDLMConfig

    parser = TrlParser((ScriptArguments, OPDLMConfig, ModelConfig, DemoArguments), prog="convert_demo.py")
    defaults = dict(DEMO_DEFAULTS)
    if not torch.cuda.is_available():
        defaults.update(use_cpu=True, bf16=False)
    parser.set_defaults(**defaults)
    return parser


def run(script_args, training_args, model_args, demo_args, callbacks=None, verbose: bool = True) -> dict[str, Any]:
    """Loads, evaluates, trains with `OPDLMTrainer`, evaluates again and saves. Returns every number it prints.

    Args:
        script_args: `trl.ScriptArguments` (`dataset_name` None = the demo's sorting prompts).
        training_args: `OPDLMConfig`.
        model_args: `trl.ModelConfig` (`model_name_or_path` None = the shipped demo teacher).
        demo_args: `DemoArguments`.
        callbacks: Extra trainer callbacks.
        verbose: Print the report.

    Returns:
        A dict: `teacher`, `untrained`, `static`, `dynamic` (evaluations), `training_tokens`, `steps`, timings,
        `output_dir`, and the `trainer`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from opdlm_trl.demo import TEACHER_PATH
    from opdlm_trl.trainer import OPDLMTrainer

    start = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    model_path = model_args.model_name_or_path or TEACHER_PATH
    init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation or "sdpa",  # block masks need sdpa, eager or flex
        "dtype": model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype),
    }
    training_args.model_init_kwargs = {**init_kwargs, **(training_args.model_init_kwargs or {})}
    train_dataset, eval_dataset = load_data(
        script_args.dataset_name,
        script_args.dataset_config,
        script_args.dataset_train_split,
        script_args.dataset_test_split,
        demo_args.num_eval,
    )
    prompts = list(eval_dataset["prompt"])
    max_new_tokens = demo_args.eval_max_new_tokens or training_args.max_completion_length
    batch_size = demo_args.eval_batch_size

    # The teacher: the original autoregressive model, greedy.
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision, padding_side="left")
    teacher = AutoModelForCausalLM.from_pretrained(model_path, **init_kwargs).to(training_args.device)
    teacher_predictions = generate_teacher(teacher, tokenizer, prompts, max_new_tokens, batch_size)
    if "completion" in eval_dataset.column_names:
        references, reference_name = list(eval_dataset["completion"]), "reference completions"
        teacher_eval = {"exact_match": score(teacher_predictions, references)}
    else:
        references, reference_name = teacher_predictions, "the teacher's greedy completions (no references)"
        teacher_eval = {"exact_match": None}
    del teacher

    # The student: the trainer converts the model (same weights, block-causal attention, a mask token).
    trainer = OPDLMTrainer(
        model=model_path,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    student = trainer.model
    untrained = evaluate_student(student, tokenizer, prompts, references, max_new_tokens, batch_size)
    say(
        f"Freshly converted student (before training): exact match {100 * untrained['exact_match']:.1f}% on "
        f"{len(prompts)} held-out prompts (static decoding).",
        flush=True,
    )

    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start

    static = evaluate_student(student, tokenizer, prompts, references, max_new_tokens, batch_size)
    dynamic = evaluate_student(
        student, tokenizer, prompts, references, max_new_tokens, batch_size, threshold=demo_args.eval_threshold
    )
    trainer.save_model(training_args.output_dir)
    total_seconds = time.perf_counter() - start
    results = {
        "teacher": teacher_eval,
        "untrained": untrained,
        "static": static,
        "dynamic": dynamic,
        "reference": reference_name,
        "num_eval": len(prompts),
        "training_tokens": int(trainer.state.num_input_tokens_seen),
        "steps": int(trainer.state.global_step),
        "train_seconds": train_seconds,
        "total_seconds": total_seconds,
        "output_dir": training_args.output_dir,
        "trainer": trainer,
    }
    say(report(results, model_path, training_args, demo_args))
    return results


def _pct(value: float | None) -> str:
    return "   n/a" if value is None else f"{100 * value:5.1f}%"


def report(results: dict[str, Any], model_path: str, args, demo_args) -> str:
    """The printed summary."""
    name = "the shipped demo teacher" if os.path.abspath(model_path).startswith(_demo_dir()) else model_path
    lines = [
        "",
        f"== OPDLM conversion of {name}: {results['num_eval']} held-out prompts, greedy, block size "
        f"{args.block_size}; scored against {results['reference']} ==",
        f"teacher, autoregressive                       exact match {_pct(results['teacher']['exact_match'])}",
        f"student before training (conversion only)     exact match {_pct(results['untrained']['exact_match'])}",
        f"student, static decoding (1 token/forward)    exact match {_pct(results['static']['exact_match'])}"
        f"   tokens/forward {results['static']['tokens_per_forward']:.2f}",
        f"student, dynamic decoding (threshold {demo_args.eval_threshold:g})     exact match "
        f"{_pct(results['dynamic']['exact_match'])}   tokens/forward {results['dynamic']['tokens_per_forward']:.2f}",
        f"training tokens (prompt + completion of every row used in an update): {results['training_tokens']:,} "
        f"in {results['steps']} optimizer steps",
        f"wall time: training {results['train_seconds']:.0f} s, total {results['total_seconds']:.0f} s",
        f"saved to {os.path.abspath(results['output_dir'])} (load with opdlm_trl.hub.load_dlm, or "
        "AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))",
    ]
    return "\n".join(lines)


def _demo_dir() -> str:
    from opdlm_trl.demo import TEACHER_PATH

    return os.path.abspath(TEACHER_PATH)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses the flags and runs the job."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = make_parser()
    script_args, training_args, model_args, demo_args = parser.parse_args_and_config(
        list(argv) if argv is not None else None
    )
    if math.isclose(training_args.learning_rate, 0.0):
        parser.error("--learning_rate must be positive.")
    return run(script_args, training_args, model_args, demo_args)


if __name__ == "__main__":
    main(sys.argv[1:])
