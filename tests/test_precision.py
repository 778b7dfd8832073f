"""Gradient checkpointing and bf16 with the block-causal training rows, through a whole OPDLM training step (CPU)."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from opdlm_trl.config import OPDLMConfig
from opdlm_trl.testing import make_model, make_tokenizer
from opdlm_trl.trainer import OPDLMTrainer, _unwrap_hf


PROMPTS = ["what is 2+2?", "count: 1 2 3", "abc", "hello world", "x*y=?", "go", "7-3=", "one two"]


def _args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=1,
        max_completion_length=8,
        max_prompt_length=16,
        learning_rate=1e-3,
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        temperature=1.0,
    )
    kwargs.update(overrides)
    return OPDLMConfig(**kwargs)


class _Capture(TrainerCallback):
    """Keeps the gradients right before the optimizer step, and whether checkpointing was on during it."""

    def __init__(self, trainer_ref):
        self.trainer_ref = trainer_ref
        self.grads = None
        self.checkpointing = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        model = self.trainer_ref[0].model
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        self.checkpointing = _unwrap_hf(model).is_gradient_checkpointing


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gradient_checkpointing_same_training_step(tmp_path, attn):
    """One full OPDLM step (rollouts, training row with its block mask, teacher, loss, backward) with and without
    gradient checkpointing: the same rollouts, the same loss and the same gradients."""
    tok = make_tokenizer()
    base = make_model("qwen3", vocab_size=len(tok), attn_implementation=attn)
    results = {}
    for checkpointing in (False, True):
        holder = []
        capture = _Capture(holder)
        trainer = OPDLMTrainer(
            model=copy.deepcopy(base).train(),
            args=_args(
                tmp_path,
                gradient_checkpointing=checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
            ),
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            processing_class=make_tokenizer(),
            callbacks=[capture],
        )
        holder.append(trainer)
        rollouts = []

        def spy(inputs, generate=trainer._generate_and_score_completions, rollouts=rollouts):
            rollouts.append(generate(inputs))
            return rollouts[-1]

        trainer._generate_and_score_completions = spy
        trainer.train()
        loss = [r["loss"] for r in trainer.state.log_history if "loss" in r][0]
        results[checkpointing] = (loss, capture.grads, capture.checkpointing, rollouts[0])
    (loss_off, grads_off, gc_off, rows_off), (loss_on, grads_on, gc_on, rows_on) = results[False], results[True]
    assert gc_on is True and gc_off is False
    for key in ("completion_ids", "noise_mask", "loss_mask"):
        assert torch.equal(rows_on[key], rows_off[key]), key
    assert rows_on["loss_mask"].any()
    assert loss_on == pytest.approx(loss_off, rel=1e-5) and loss_off > 0
    assert grads_on.keys() == grads_off.keys() and len(grads_off) > 0
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-6, rtol=1e-5, msg=name)


def _fixed_rows(tmp_path, tok, model):
    trainer = OPDLMTrainer(
        model=copy.deepcopy(model),
        args=_args(tmp_path),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tok,
    )
    torch.manual_seed(0)
    return trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS[:4]])


def _loss_and_grad_norm(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = [p.grad.float() for p in trainer.model.parameters() if p.grad is not None]
    return loss.float().item(), torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()


@pytest.mark.parametrize("mode", ["autocast", "bf16_weights"])
def test_bf16_step_is_finite_and_close_to_fp32(tmp_path, mode):
    """bf16 (mixed precision autocast, or bf16 weights) on the same training rows as an fp32 run: a finite loss and
    gradient norm within a few percent of fp32; and a whole bf16 training step runs with a finite loss."""
    tok = make_tokenizer()
    base = make_model("qwen3", vocab_size=len(tok), hidden_size=64).train()
    inputs = _fixed_rows(tmp_path, make_tokenizer(), base)
    assert inputs["loss_mask"].any()

    fp32 = OPDLMTrainer(
        model=copy.deepcopy(base),
        args=_args(tmp_path),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=make_tokenizer(),
    )
    ref_loss, ref_norm = _loss_and_grad_norm(fp32, inputs)

    model = copy.deepcopy(base)
    if mode == "bf16_weights":
        model = model.to(torch.bfloat16)
    bf16 = OPDLMTrainer(
        model=model,
        args=_args(tmp_path, bf16=(mode == "autocast")),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=make_tokenizer(),
    )
    if mode == "autocast":
        assert bf16.accelerator.mixed_precision == "bf16"
    else:
        assert _unwrap_hf(bf16.teacher_model).dtype == torch.bfloat16
    loss, norm = _loss_and_grad_norm(bf16, inputs)
    assert math.isfinite(loss) and math.isfinite(norm)
    assert loss == pytest.approx(ref_loss, rel=0.05), (loss, ref_loss)
    # bf16 is really in effect (accelerate's autocast sits on `model.forward`, which the loss does not call: the
    # trainer enters it around the loss itself).
    assert loss != ref_loss
    assert norm == pytest.approx(ref_norm, rel=0.1), (norm, ref_norm)

    bf16.train()  # rollouts + update in bf16
    logged = [r["loss"] for r in bf16.state.log_history if "loss" in r]
    assert len(logged) == 1 and math.isfinite(logged[0]) and logged[0] > 0
