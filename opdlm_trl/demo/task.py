"""The demo task: sort a list of distinct integers.

Prompt ``"sort 42 7 93 15 ="``, completion ``"7 15 42 93"`` (then EOS). Every integer 0-99, ``"sort"`` and ``"="`` is a
single token of a word-level tokenizer, so a list of n numbers gives a completion of n + 1 tokens (EOS included). Lists
have 8 to 16 numbers (13 completion tokens on average, i.e. more than 3 blocks of 4), the answer is verifiable from the
prompt alone (`score`), and the completion is predictable enough for a block-diffusion student to decode several tokens
per forward.

The shipped teacher (`TEACHER_PATH`, trained by ``examples/train_teacher.py``) is a small Llama-style decoder
(transformers maps the model type "qwen2" to `Qwen2Tokenizer`, which would rebuild this word-level tokenizer as a
byte-level BPE under `AutoTokenizer`; "llama" keeps the saved `tokenizer.json` as is).
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Sequence

import torch
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)


__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "RESERVED_TOKEN",
    "UNK_TOKEN",
    "MIN_LEN",
    "MAX_LEN",
    "MAX_VALUE",
    "NUM_TRAIN",
    "NUM_TEST",
    "MAX_NEW_TOKENS",
    "TEACHER_PATH",
    "METRIC_PATH",
    "make_prompt",
    "parse_prompt",
    "solve",
    "make_splits",
    "extract_answer",
    "score",
    "build_tokenizer",
    "tokenize_example",
    "load_teacher",
    "load_exact_match_metric",
    "exact_match",
    "generate_ar",
    "evaluate_ar",
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
RESERVED_TOKEN = "<|reserved_special_token_0|>"
UNK_TOKEN = "<|unk|>"

MIN_LEN = 8  # fewest numbers in a list
MAX_LEN = 16  # most numbers in a list
MAX_VALUE = 99  # numbers are drawn from 0..MAX_VALUE, distinct within a list
NUM_TRAIN = 50_000
NUM_TEST = 500
MAX_NEW_TOKENS = MAX_LEN + 1  # enough for the longest completion plus EOS

_HERE = os.path.dirname(os.path.abspath(__file__))
TEACHER_PATH = os.path.join(_HERE, "teacher")
METRIC_PATH = os.path.join(_HERE, "metrics", "exact_match")


# ----------------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------------


def make_prompt(numbers: Sequence[int]) -> str:
    """Formats a list of integers as a prompt, e.g. ``[42, 7]`` -> ``"sort 42 7 ="``."""
    return "sort " + " ".join(str(int(n)) for n in numbers) + " ="


def parse_prompt(prompt: str) -> list[int]:
    """Inverse of `make_prompt`: returns the integers of a prompt."""
    words = prompt.split()
    if len(words) < 2 or words[0] != "sort" or words[-1] != "=":
        raise ValueError(f"Not a sort prompt: {prompt!r}")
    return [int(w) for w in words[1:-1]]


def solve(prompt: str) -> str:
    """The reference completion (without EOS) of a prompt: its integers in ascending order."""
    return " ".join(str(n) for n in sorted(parse_prompt(prompt)))


def _sample_numbers(rng: random.Random) -> list[int]:
    length = rng.randint(MIN_LEN, MAX_LEN)
    return rng.sample(range(MAX_VALUE + 1), length)


def make_splits(seed: int = 0, num_train: int = NUM_TRAIN, num_test: int = NUM_TEST) -> DatasetDict:
    """Builds the fixed train / held-out splits.

    The held-out ("test") prompts are drawn first and every prompt is unique across both splits, so no held-out
    prompt is ever trained on.

    Args:
        seed: Seed of the generator; the same seed always gives the same splits.
        num_train: Number of training examples.
        num_test: Number of held-out examples.

    Returns:
        A `DatasetDict` with splits ``"train"`` and ``"test"``, columns ``"prompt"`` (str) and ``"completion"``
        (str, without EOS).
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    splits = {}
    for name, size in (("test", num_test), ("train", num_train)):
        prompts = []
        while len(prompts) < size:
            prompt = make_prompt(_sample_numbers(rng))
            if prompt not in seen:
                seen.add(prompt)
                prompts.append(prompt)
        splits[name] = Dataset.from_dict({"prompt": prompts, "completion": [solve(p) for p in prompts]})
    return DatasetDict(train=splits["train"], test=splits["test"])


def extract_answer(text: str, eos_token: str = EOS_TOKEN) -> str:
    """Normalises generated text into an answer: cut at the first EOS (if present) and collapse whitespace."""
    text = text.split(eos_token, 1)[0]
    text = text.replace(PAD_TOKEN, " ")
    return " ".join(text.split())


def score(prompt: str, prediction: str) -> float:
    """Verifies a generated completion against the prompt: 1.0 if it is the sorted list, else 0.0."""
    return float(extract_answer(prediction) == solve(prompt))


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Builds the word-level tokenizer of the task (one token per integer 0..MAX_VALUE, ``"sort"`` and ``"="``).

    Special tokens: EOS (id 0, `EOS_TOKEN`), pad (id 1), one unused reserved token (id 2, `RESERVED_TOKEN`, which
    `convert_to_dlm` can reuse as the mask token) and unk (id 3). Left padding (for batched generation).

    Returns:
        A `PreTrainedTokenizerFast`.
    """
    specials = [EOS_TOKEN, PAD_TOKEN, RESERVED_TOKEN, UNK_TOKEN]
    words = ["sort", "="] + [str(i) for i in range(MAX_VALUE + 1)]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: `decode` joins tokens with single spaces, which is exactly the task's text format.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[RESERVED_TOKEN],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )


def tokenize_example(prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """Tokenizes one example for supervised (AR) training.

    Returns:
        ``input_ids`` = prompt tokens + completion tokens + EOS, ``labels`` = the same with the prompt positions set to
        -100, and ``prompt_length``.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [-100] * len(prompt_ids) + completion_ids,
        "prompt_length": len(prompt_ids),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Teacher
# ----------------------------------------------------------------------------------------------------------------------


def load_teacher(
    path: str = TEACHER_PATH, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads the shipped AR teacher and its tokenizer (offline, from the repository).

    Returns:
        ``(model, tokenizer)``, the model in eval mode on CPU.
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Metric and evaluation
# ----------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_exact_match_metric():
    """Loads the shipped exact-match `evaluate` module from its local path (no Hub access)."""
    import evaluate

    return evaluate.load(METRIC_PATH)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Exact match (fraction in [0, 1]) through the shipped `evaluate` metric; whitespace is normalised and anything
    from the first EOS on is ignored."""
    predictions = [extract_answer(p) for p in predictions]
    references = [extract_answer(r) for r in references]
    return load_exact_match_metric().compute(predictions=predictions, references=references)["exact_match"]


@torch.no_grad()
def generate_ar(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 256,
) -> list[str]:
    """Greedy autoregressive decoding with plain `model.generate`; returns the decoded completions (special tokens
    skipped)."""
    tokenizer.padding_side = "left"
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
        batch = batch.to(model.device)
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


def evaluate_ar(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 256,
) -> dict[str, float]:
    """Held-out greedy AR exact match of ``model`` on a split with ``"prompt"``/``"completion"`` columns.

    Returns:
        ``{"exact_match": float, "verified": float}``: exact match against the ``"completion"`` column (through the
        `evaluate` metric), and the fraction verified from the prompt alone with `score` (the two agree).
    """
    predictions = generate_ar(model, tokenizer, dataset["prompt"], max_new_tokens, batch_size)
    verified = sum(score(p, pred) for p, pred in zip(dataset["prompt"], predictions)) / max(len(predictions), 1)
    return {"exact_match": exact_match(predictions, dataset["completion"]), "verified": verified}
