"""Fast tests of the demo task, the shipped exact-match metric and the shipped AR teacher."""

import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from opdlm_trl.demo import task  # noqa: E402


@pytest.fixture(scope="module")
def splits():
    return task.make_splits(seed=0)


@pytest.fixture(scope="module")
def teacher():
    return task.load_teacher()


def test_split_sizes_and_disjointness(splits):
    assert set(splits) == {"train", "test"}
    assert len(splits["train"]) == task.NUM_TRAIN
    assert len(splits["test"]) == task.NUM_TEST
    assert splits["train"].column_names == ["prompt", "completion"]
    train, test = set(splits["train"]["prompt"]), set(splits["test"]["prompt"])
    assert len(train) == task.NUM_TRAIN and len(test) == task.NUM_TEST  # unique within splits
    assert not train & test


def test_splits_are_deterministic(splits):
    other = task.make_splits(seed=0, num_train=100, num_test=task.NUM_TEST)
    assert other["test"]["prompt"] == splits["test"]["prompt"]
    assert task.make_splits(seed=1, num_train=10, num_test=10)["test"]["prompt"] != splits["test"]["prompt"][:10]


def test_examples_are_correct(splits):
    for row in splits["test"]:
        numbers = task.parse_prompt(row["prompt"])
        assert task.MIN_LEN <= len(numbers) <= task.MAX_LEN
        assert len(set(numbers)) == len(numbers)
        assert row["completion"] == " ".join(map(str, sorted(numbers)))
        assert task.score(row["prompt"], row["completion"]) == 1.0


def test_completion_length_and_eos(splits, teacher):
    _, tokenizer = teacher
    lengths = []
    for row in splits["test"]:
        tokenized = task.tokenize_example(row["prompt"], row["completion"], tokenizer)
        ids, labels, n_prompt = tokenized["input_ids"], tokenized["labels"], tokenized["prompt_length"]
        assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
        assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
        assert tokenizer.unk_token_id not in ids
        # Every integer is a single token.
        assert len(ids) - n_prompt == len(row["completion"].split()) + 1
        assert tokenizer.decode(ids[n_prompt:], skip_special_tokens=True) == row["completion"]
        lengths.append(len(ids) - n_prompt)
    assert sum(lengths) / len(lengths) >= 12  # > 3 blocks of 4 tokens on average, EOS included
    assert max(lengths) <= task.MAX_NEW_TOKENS


def test_tokenizer_special_tokens(teacher):
    _, tokenizer = teacher
    assert tokenizer.eos_token == task.EOS_TOKEN and tokenizer.pad_token == task.PAD_TOKEN
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert task.RESERVED_TOKEN in tokenizer.all_special_tokens
    reserved_id = tokenizer.convert_tokens_to_ids(task.RESERVED_TOKEN)
    assert reserved_id not in (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    assert tokenizer.mask_token is None  # left for `convert_to_dlm` to register
    assert tokenizer.padding_side == "left"
    fresh = task.build_tokenizer()
    assert fresh.get_vocab() == tokenizer.get_vocab()
    # `AutoTokenizer` keeps the word-level tokenizer (one token per integer) rather than rebuilding it.
    text = "sort 42 7 93 15 = 7 15 42 93"
    assert tokenizer(text)["input_ids"] == fresh(text)["input_ids"] == [4, 48, 13, 99, 21, 5, 13, 21, 48, 99]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_extract_answer_and_score():
    prompt = task.make_prompt([42, 7, 93, 15])
    assert prompt == "sort 42 7 93 15 ="
    assert task.solve(prompt) == "7 15 42 93"
    assert task.extract_answer("  7 15  42 93 <|endoftext|> 1 2") == "7 15 42 93"
    assert task.score(prompt, "7 15 42 93<|endoftext|><|pad|>") == 1.0
    assert task.score(prompt, "7 15 93 42") == 0.0
    assert task.score(prompt, "7 15 42") == 0.0
    with pytest.raises(ValueError):
        task.parse_prompt("add 1 2 =")


def test_metric_module_loads_locally():
    import evaluate

    metric = evaluate.load(task.METRIC_PATH)
    assert metric.compute(predictions=["1 2 3"], references=["1 2 3"]) == {"exact_match": 1.0}
    assert metric.compute(predictions=["1 2 3", "4 5"], references=["1 2 3", "5 4"]) == {"exact_match": 0.5}
    assert metric.compute(predictions=[" 1  2 "], references=["1 2"])["exact_match"] == 1.0
    assert metric.compute(predictions=[" 1  2 "], references=["1 2"], normalize_whitespace=False)["exact_match"] == 0.0
    assert metric.compute(predictions=["A"], references=["a"], ignore_case=True)["exact_match"] == 1.0


def test_exact_match_helper():
    assert task.exact_match(["7 15 42 93", "1 2"], ["7 15 42 93", "1 2"]) == 1.0
    assert task.exact_match(["7 15 42 93<|endoftext|>", "2 1", "1 2 3"], ["7 15 42 93", "1 2", "1 2"]) == 1 / 3
    assert task.exact_match(["9"], ["1"]) == 0.0


def test_shipped_teacher_is_small(teacher):
    model, tokenizer = teacher
    assert os.path.isfile(os.path.join(task.TEACHER_PATH, "model.safetensors"))
    assert os.path.getsize(os.path.join(task.TEACHER_PATH, "model.safetensors")) < 10 * 2**20
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert model.config.model_type in ("qwen2", "llama")
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_shipped_teacher_greedy_exact_match(splits, teacher):
    model, tokenizer = teacher
    heldout = splits["test"].select(range(64))
    predictions = task.generate_ar(model, tokenizer, heldout["prompt"])
    assert task.exact_match(predictions, heldout["completion"]) >= 0.9
    # The answers are verifiable from the prompt alone.
    assert sum(task.score(p, q) for p, q in zip(heldout["prompt"], predictions)) / 64 >= 0.9


def test_teacher_generation_ends_with_eos(splits, teacher):
    model, tokenizer = teacher
    batch = tokenizer(splits["test"]["prompt"][:8], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=task.MAX_NEW_TOKENS, do_sample=False)
    new = out[:, batch["input_ids"].shape[1] :]
    assert (new == tokenizer.eos_token_id).any(dim=1).all()
