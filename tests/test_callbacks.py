"""The progress bar of both trainers: the postfix shows training tokens, the loss by its name and tokens/forward."""

import pytest
from datasets import Dataset
from transformers import PrinterCallback, ProgressCallback

from opdlm_trl.baseline import BD3LMConfig, BD3LMTrainer
from opdlm_trl.callbacks import DiffusionProgressCallback
from opdlm_trl.config import OPDLMConfig
from opdlm_trl.testing import make_model, make_tokenizer
from opdlm_trl.trainer import OPDLMTrainer


COMMON = dict(
    per_device_train_batch_size=2,
    max_steps=2,
    learning_rate=1e-3,
    report_to="none",
    bf16=False,
    save_strategy="no",
    use_cpu=True,
    logging_steps=1,
    seed=0,
)


def _opdlm(tmp_path, **overrides):
    tok = make_tokenizer()
    args = OPDLMConfig(
        output_dir=str(tmp_path), max_completion_length=8, max_prompt_length=16, **{**COMMON, **overrides}
    )
    data = Dataset.from_dict({"prompt": ["what is 2+2?", "count: 1 2 3", "abc", "hello"]})
    return OPDLMTrainer(
        model=make_model("qwen3", vocab_size=len(tok)), args=args, train_dataset=data, processing_class=tok
    )


def _bar(trainer):
    return [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProgressCallback)]


def test_postfix_of_a_log():
    logs = {"loss": 2.34567, "num_tokens": 12345.0, "rollout/tokens_per_forward": 1.8349, "grad_norm": 3.0}
    assert DiffusionProgressCallback.postfix(logs, "KL") == {"tokens": "12,345", "KL": "2.346", "tok/fwd": "1.83"}
    assert DiffusionProgressCallback.postfix({"epoch": 1.0}) == {}


def test_opdlm_bar_shows_tokens_kl_and_tokens_per_forward(tmp_path, capsys):
    trainer = _opdlm(tmp_path)
    bars = _bar(trainer)
    assert len(bars) == 1 and type(bars[0]) is DiffusionProgressCallback and bars[0].loss_name == "KL"
    trainer.train()
    postfix = capsys.readouterr().err.split("\r")[-1]  # the bar's last rendering (tqdm writes to stderr)
    last = [log for log in trainer.state.log_history if "loss" in log][-1]
    assert f"tokens={int(last['num_tokens']):,}" in postfix
    assert f"KL={last['loss']:.4g}" in postfix
    assert f"tok/fwd={last['rollout/tokens_per_forward']:.2f}" in postfix


@pytest.mark.parametrize("divergence, name", [("reverse_kl", "reverse KL"), ("jsd", "JSD")])
def test_loss_label_follows_the_divergence(tmp_path, divergence, name):
    assert _bar(_opdlm(tmp_path, divergence=divergence))[0].loss_name == name


def test_disable_tqdm_keeps_the_printer(tmp_path):
    trainer = _opdlm(tmp_path, disable_tqdm=True)
    assert not _bar(trainer)
    assert any(isinstance(cb, PrinterCallback) for cb in trainer.callback_handler.callbacks)


def test_baseline_bar_labels_cross_entropy(tmp_path, capsys):
    tok = make_tokenizer()
    data = Dataset.from_dict({"prompt": ["abc", "hello"], "completion": [" d e", " world"]})
    args = BD3LMConfig(output_dir=str(tmp_path), block_size=4, max_length=32, **COMMON)
    trainer = BD3LMTrainer(
        model=make_model("qwen3", vocab_size=len(tok)), args=args, train_dataset=data, processing_class=tok
    )
    bars = _bar(trainer)
    assert len(bars) == 1 and bars[0].loss_name == "CE"
    trainer.train()
    last = [log for log in trainer.state.log_history if "loss" in log][-1]
    assert f"CE={last['loss']:.4g}" in capsys.readouterr().err.split("\r")[-1]
