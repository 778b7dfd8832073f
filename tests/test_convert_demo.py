"""Smoke test of the main job (`examples/convert_demo.py`) with tiny settings: its numbers and its saved model."""

import os
import re
import sys

import pytest
import torch


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import convert_demo  # noqa: E402

from opdlm_trl.hub import load_dlm  # noqa: E402
from opdlm_trl.metrics import count_training_tokens  # noqa: E402
from opdlm_trl.trainer import OPDLMTrainer  # noqa: E402


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "student"
    counted = []
    original = OPDLMTrainer._generate_and_score_completions

    def recording(self, inputs):
        batch = original(self, inputs)
        if self.model.training:
            counted.append(count_training_tokens(batch["prompt_mask"], batch["completion_mask"]))
        return batch

    OPDLMTrainer._generate_and_score_completions = recording
    torch.manual_seed(0)
    try:
        from contextlib import redirect_stdout
        from io import StringIO

        buffer = StringIO()
        with redirect_stdout(buffer):
            results = convert_demo.main(
                [
                    "--output_dir",
                    str(out),
                    "--max_steps",
                    "3",
                    "--per_device_train_batch_size",
                    "4",
                    "--num_eval",
                    "8",
                    "--eval_batch_size",
                    "8",
                    "--disable_tqdm",
                    "true",
                ]
            )
    finally:
        OPDLMTrainer._generate_and_score_completions = original
    return results, buffer.getvalue(), counted


def test_report_numbers(demo_run):
    results, printed, counted = demo_run
    assert results["steps"] == 3 and len(counted) == 3
    # Training tokens: the trainer's count is the sum of count_training_tokens over the rows of every update...
    assert results["training_tokens"] == sum(counted) > 0
    # ... and is what the report prints.
    match = re.search(r"training tokens \(prompt \+ completion of every row used in an update\): ([\d,]+)", printed)
    assert match and int(match.group(1).replace(",", "")) == results["training_tokens"]
    # The demo teacher is exact on the held-out prompts; every figure is printed.
    assert results["teacher"]["exact_match"] == 1.0
    assert "teacher, autoregressive" in printed and "100.0%" in printed
    assert "student before training" in printed and "threshold 0.9" in printed
    for key in ("untrained", "static", "dynamic"):
        assert 0.0 <= results[key]["exact_match"] <= 1.0
    assert results["static"]["tokens_per_forward"] == pytest.approx(1.0, abs=0.1)  # static: one token per forward
    assert results["dynamic"]["tokens_per_forward"] >= results["static"]["tokens_per_forward"] - 1e-6


def test_saved_model_loads_and_decodes_like_the_trained_student(demo_run):
    results, _, _ = demo_run
    model, tokenizer = load_dlm(results["output_dir"])
    assert model.config.dlm_block_size == 4
    trainer = results["trainer"]
    prompts = [f"sort {a} {b} {c} 5 70 12 33 8 =" for a, b, c in [(1, 2, 3), (90, 40, 41), (9, 19, 29)]]
    ours, _ = convert_demo.generate_student(trainer.model, trainer.processing_class, prompts, 17, 8)
    theirs, _ = convert_demo.generate_student(model, tokenizer, prompts, 17, 8)
    assert ours == theirs
    # The held-out predictions of the report are reproduced by the saved model.
    _, test = convert_demo.load_data(None, None, "train", "test", 8)
    again, _ = convert_demo.generate_student(model, tokenizer, list(test["prompt"]), 17, 8)
    assert again == results["static"]["predictions"]


def test_load_data_holds_out_prompts_of_a_dataset_without_test_split(tmp_path):
    from datasets import Dataset

    path = tmp_path / "prompts.jsonl"
    Dataset.from_dict({"prompt": [f"p{i}" for i in range(10)]}).to_json(str(path))
    train, test = convert_demo.load_data(str(path), None, "train", "test", 3)
    assert list(test["prompt"]) == ["p7", "p8", "p9"] and len(train) == 7
    assert train.column_names == ["prompt"] and test.column_names == ["prompt"]
    with pytest.raises(ValueError, match="num_eval"):
        convert_demo.load_data(str(path), None, "train", "test", 10)


def test_the_same_job_runs_on_another_model_and_dataset(tmp_path):
    """The README's "real model" command, offline: a model folder and a local prompt dataset given by flags."""
    from datasets import Dataset

    from opdlm_trl.testing import make_model, make_tokenizer

    tok = make_tokenizer()
    model_dir = tmp_path / "model"
    make_model("qwen3", vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    Dataset.from_dict({"prompt": [f"count {i}" for i in range(12)]}).to_json(str(data))
    out = tmp_path / "student"
    results = convert_demo.main(
        [
            "--model_name_or_path",
            str(model_dir),
            "--dataset_name",
            str(data),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--max_completion_length",
            "6",
            "--num_eval",
            "4",
            "--disable_tqdm",
            "true",
        ]
    )
    # No references: the students are scored against the teacher's greedy completions.
    assert results["teacher"]["exact_match"] is None and "teacher" in results["reference"]
    assert results["steps"] == 2 and results["training_tokens"] > 0
    model, _ = load_dlm(str(out))
    assert model.config.dlm_block_size == 4 and model.config.model_type == "qwen3"  # not the demo teacher (llama)
