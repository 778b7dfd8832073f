import copy
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback

from opdlm_trl import convert_to_dlm, position_ids_from_mask
from opdlm_trl.config import OPDLMConfig
from opdlm_trl.metrics import count_training_tokens
from opdlm_trl.testing import make_model, make_tokenizer
from opdlm_trl.trainer import OPDLMTrainer


PROMPTS = [
    "what is 2+2?",
    "count: 1 2 3",
    "abc",
    "hello world",
    "x*y=?",
    "go",
    "7-3=",
    "one two",
    "a, b, c.",
    "sum 4 5",
    "hi",
    "zz top",
]


def make_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=2,
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
    )
    kwargs.update(overrides)
    return OPDLMConfig(**kwargs)


def dataset(n=None):
    return Dataset.from_dict({"prompt": PROMPTS[:n]})


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    # bitsandbytes' CPU 4-bit inference kernel needs every quantized layer's output size to be a multiple of 32
    # and its input size a multiple of the 64-value quantization block.
    make_model(
        "qwen3", vocab_size=len(tok), hidden_size=64, num_attention_heads=4, num_key_value_heads=2
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------------------------------------------------------
# The loss, by hand
# ------------------------------------------------------------------------------------------------------------------


def _hand_batch(tok, mask_id):
    """3 rows: full completion; EOS at 5 then padding; EOS first. Left-padded prompts of 5, 3, 4 tokens."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    gen = torch.Generator().manual_seed(3)
    prompt_ids = torch.full((3, 5), pad)
    prompt_mask = torch.zeros(3, 5, dtype=torch.long)
    for r, n in enumerate([5, 3, 4]):
        prompt_ids[r, 5 - n :] = torch.randint(3, 47, (n,), generator=gen)
        prompt_mask[r, 5 - n :] = 1
    completion_ids = torch.randint(3, 47, (3, 8), generator=gen)
    completion_mask = torch.ones(3, 8, dtype=torch.long)
    completion_ids[1, 5], completion_ids[1, 6:], completion_mask[1, 6:] = eos, pad, 0
    completion_ids[2, 0], completion_ids[2, 1:], completion_mask[2, 1:] = eos, pad, 0
    noise = torch.tensor(
        [
            [0, 1, 1, 1, 0, 0, 1, 1],
            [1, 1, 1, 1, 0, 1, 0, 0],
            [1, 0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    return prompt_ids, prompt_mask, completion_ids, completion_mask, noise


def _inputs(batch, loss_on_eos, eos):
    prompt_ids, prompt_mask, completion_ids, completion_mask, noise = batch
    positions = noise & completion_mask.bool()
    if not loss_on_eos:
        positions &= completion_ids != eos
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "noise_mask": noise,
        "loss_mask": positions,
        "num_loss_rows": positions.any(-1).sum(),
    }


def _softmax(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    s = sum(e)
    return [v / s for v in e]


def _hand_loss(student, teacher, batch, mask_id, divergence, top_k, beta, loss_on_eos, eos, vocab):
    """Per-position divergences with explicit loops over positions and vocabulary, reduced per row then per batch.

    Student logits come from the sampler-style forward [prompt | x0 blocks < j | x_t block j] (block-causal model);
    teacher logits from the plain causal model on [prompt | x0], read at the previous position (shift by one).
    """
    prompt_ids, prompt_mask, completion_ids, completion_mask, noise = batch
    tok_pad = 1
    row_means = []
    for r in range(prompt_ids.shape[0]):
        prompt = prompt_ids[r][prompt_mask[r].bool()]
        n_valid = int(completion_mask[r].sum())
        x0 = completion_ids[r, :n_valid]
        xt = x0.masked_fill(noise[r, :n_valid], mask_id)
        with torch.no_grad():
            t_logits = teacher(torch.cat([prompt, x0])[None]).logits[0, len(prompt) - 1 : len(prompt) - 1 + n_valid]
        values = []
        for i in range(n_valid):
            if not noise[r, i] or (not loss_on_eos and x0[i].item() == eos):
                continue
            j = i // 4
            block = xt[4 * j : 4 * j + 4]
            # The last block of a row that stopped at EOS is completed with (unattended) padding.
            n_pad = 4 - len(block)
            ids = torch.cat([prompt, x0[: 4 * j], block, torch.full((n_pad,), tok_pad)])[None]
            mask = torch.ones_like(ids)
            mask[0, ids.shape[1] - n_pad :] = 0
            with torch.no_grad():
                s_logits = student(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[0]
            s_row = s_logits[len(prompt) + i, :vocab].tolist()
            t_row = t_logits[i, :vocab].tolist()
            ps, pt = _softmax(s_row), _softmax(t_row)
            support = range(vocab) if top_k is None else sorted(range(vocab), key=lambda v: -t_row[v])[:top_k]
            total = 0.0
            for v in support:
                if divergence == "forward_kl":
                    total += pt[v] * math.log(pt[v] / ps[v])
                elif divergence == "reverse_kl":
                    total += ps[v] * math.log(ps[v] / pt[v])
                else:
                    m = (1 - beta) * ps[v] + beta * pt[v]
                    total += beta * pt[v] * math.log(pt[v] / m) + (1 - beta) * ps[v] * math.log(ps[v] / m)
            values.append(total)
        if values:
            row_means.append(sum(values) / len(values))
    return sum(row_means) / len(row_means)


@pytest.mark.parametrize(
    "divergence,top_k,loss_on_eos",
    [("forward_kl", None, True), ("reverse_kl", 5, True), ("jsd", None, False), ("forward_kl", 3, False)],
)
def test_loss_matches_hand_computation(tmp_path, divergence, top_k, loss_on_eos):
    tok = make_tokenizer()
    original = make_model("qwen3", vocab_size=len(tok))
    student = copy.deepcopy(original)
    args = make_args(tmp_path, divergence=divergence, teacher_top_k=top_k, loss_on_eos=loss_on_eos, beta=0.3)
    trainer = OPDLMTrainer(model=student, args=args, train_dataset=dataset(), processing_class=tok)
    mask_id = trainer.mask_token_id
    batch = _hand_batch(tok, mask_id)
    inputs = _inputs(batch, loss_on_eos, tok.eos_token_id)
    if not loss_on_eos:
        assert inputs["num_loss_rows"].item() == 2  # the row with only an EOS has no loss position
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs).item()
    expected = _hand_loss(
        trainer.model, original, batch, mask_id, divergence, top_k, 0.3, loss_on_eos, tok.eos_token_id, len(tok)
    )
    assert loss == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert abs(loss) > 1e-3  # the block-causal student with masks is not the causal teacher


def test_gradient_accumulation_split_sums_to_full_batch_loss(tmp_path):
    tok = make_tokenizer()
    trainer = OPDLMTrainer(
        model=make_model(vocab_size=len(tok)), args=make_args(tmp_path), processing_class=tok, train_dataset=dataset()
    )
    inputs = _inputs(_hand_batch(tok, trainer.mask_token_id), True, tok.eos_token_id)
    with torch.no_grad():
        full = trainer.compute_loss(trainer.model, inputs)
        parts = [
            trainer.compute_loss(trainer.model, {k: (v[s] if v.ndim else v) for k, v in inputs.items()})
            for s in (slice(0, 1), slice(1, 3))
        ]
    torch.testing.assert_close(parts[0] + parts[1], full)


def test_resized_mask_token_teacher_has_one_token_less(tmp_path):
    """A tokenizer without a spare token: the student gets `<|mask|>` (+1 row); the teacher (the original model) does
    not know it, so the divergence compares the teacher's vocabulary only, for an explicit teacher and the self-teacher
    alike."""
    tok = make_tokenizer(with_reserved=False)
    original = make_model("qwen3", vocab_size=len(tok))
    vocab = len(tok)
    losses = {}
    for name in ("explicit", "self"):
        tok_i = make_tokenizer(with_reserved=False)
        teacher = copy.deepcopy(original) if name == "explicit" else None
        trainer = OPDLMTrainer(
            model=copy.deepcopy(original),
            teacher_model=teacher,
            args=make_args(tmp_path),
            train_dataset=dataset(),
            processing_class=tok_i,
        )
        assert trainer.mask_token_id == vocab and trainer.model.get_output_embeddings().weight.shape[0] == vocab + 1
        assert trainer._teacher_vocab_size == vocab
        batch = _hand_batch(tok_i, trainer.mask_token_id)
        inputs = _inputs(batch, True, tok_i.eos_token_id)
        with torch.no_grad():
            losses[name] = trainer.compute_loss(trainer.model, inputs).item()
        expected = _hand_loss(
            trainer.model,
            original,
            batch,
            trainer.mask_token_id,
            "forward_kl",
            None,
            0.5,
            True,
            tok_i.eos_token_id,
            vocab,
        )
        assert losses[name] == pytest.approx(expected, rel=1e-4)
    assert losses["explicit"] == pytest.approx(losses["self"], rel=1e-6)


def test_teacher_vocabulary_mismatch_raises(tmp_path, tiny_path):
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="vocabulary"):
        OPDLMTrainer(
            model=make_model(vocab_size=len(tok)),
            teacher_model=make_model(vocab_size=20),
            args=make_args(tmp_path),
            train_dataset=dataset(),
            processing_class=tok,
        )
    # Same size, different tokenizer saved next to the teacher.
    other = make_tokenizer(with_pad=False, with_reserved=True)
    other.add_tokens(["?!"])
    path = tmp_path / "other_teacher"
    make_model(vocab_size=len(tok)).save_pretrained(path)
    other.save_pretrained(path)
    with pytest.raises(ValueError, match="tokenizer"):
        OPDLMTrainer(
            model=make_model(vocab_size=len(tok)),
            teacher_model=str(path),
            args=make_args(tmp_path),
            train_dataset=dataset(),
            processing_class=tok,
        )


# ------------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------------


def test_only_student_learns_teacher_stays_bit_identical(tmp_path):
    tok = make_tokenizer()
    model = make_model(vocab_size=len(tok))
    student_before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = OPDLMTrainer(
        model=model, args=make_args(tmp_path, max_steps=3), train_dataset=dataset(), processing_class=tok
    )
    teacher = trainer.teacher_model
    assert teacher is not trainer.model
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(not p.requires_grad for p in teacher.parameters())
    trainer.train()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
        assert torch.equal(value, student_before[key]), key  # the teacher is the original weights
    assert all(p.grad is None for p in teacher.parameters())
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, student_before[k])]
    assert len(changed) == len(student_before)


def test_kl_decreases_towards_a_different_teacher(tmp_path):
    """A teacher that is not the student's init (another random model): the KL on a fixed batch of rows and the logged
    training loss both fall over 40 steps."""
    tok = make_tokenizer()
    teacher = make_model(vocab_size=len(tok), seed=1)
    args = make_args(
        tmp_path, max_steps=40, per_device_train_batch_size=4, learning_rate=3e-3, lr_scheduler_type="constant"
    )
    trainer = OPDLMTrainer(
        model=make_model(vocab_size=len(tok)),
        teacher_model=teacher,
        args=args,
        train_dataset=dataset(),
        processing_class=tok,
    )
    torch.manual_seed(123)
    fixed = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS])
    with torch.no_grad():
        before = trainer.compute_loss(trainer.model, fixed).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model, fixed).item()
    assert after < 0.6 * before, (before, after)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 40
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:3]) / 3, losses


def test_metrics_logged_every_step_and_tokens_counted_once(tmp_path):
    tok = make_tokenizer()
    trainer = OPDLMTrainer(
        model=make_model(vocab_size=len(tok)),
        args=make_args(tmp_path, max_steps=3),
        train_dataset=dataset(),
        processing_class=tok,
    )
    seen = []
    generate = trainer._generate_and_score_completions

    def spy(inputs):
        out = generate(inputs)
        seen.append(count_training_tokens(out["prompt_mask"], out["completion_mask"]))
        return out

    trainer._generate_and_score_completions = spy
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 3
    keys = [
        "loss",
        "num_tokens",
        "completions/mean_length",
        "rollout/tokens_per_forward",
        "completions/eos_fraction",
        "time/rollout",
        "time/teacher",
        "time/update",
        "entropy",
    ]
    for record in logs:
        for key in keys:
            assert key in record and record[key] is not None and math.isfinite(record[key]), key
        assert record["time/rollout"] > 0 and record["time/teacher"] > 0 and record["time/update"] > 0
        assert 0.0 < record["rollout/tokens_per_forward"] <= 4.0
    cumulative = [sum(seen[: i + 1]) for i in range(3)]
    assert [r["num_tokens"] for r in logs] == cumulative
    assert trainer.state.num_input_tokens_seen == cumulative[-1]


def test_curriculum_grows_rollout_length(tmp_path):
    tok = make_tokenizer()
    args = make_args(tmp_path, max_steps=5, max_completion_length=16, curriculum_start_length=4, curriculum_rollouts=4)
    trainer = OPDLMTrainer(
        model=make_model(vocab_size=len(tok)), args=args, train_dataset=dataset(), processing_class=tok
    )
    trainer.train()
    lengths = [r["rollout/max_new_tokens"] for r in trainer.state.log_history if "loss" in r]
    # 4 + 12 * (1 - cos(pi * r / 4)) / 2 = 4, 5.8, 10, 14.2, 16 -> multiples of 4: 4, 4, 12, 16, 16
    assert lengths == [args.rollout_length(i) for i in range(5)] == [4, 4, 12, 16, 16]


def test_conversational_prompts(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    )
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS[:4]]})
    trainer = OPDLMTrainer(
        model=make_model(vocab_size=len(tok)), args=make_args(tmp_path), train_dataset=data, processing_class=tok
    )
    out = trainer._generate_and_score_completions([{"prompt": data[0]["prompt"]}])
    assert out["prompt_ids"][0].tolist() == tok(PROMPTS[0] + ":")["input_ids"]
    trainer.train()
    assert all(math.isfinite(r["loss"]) for r in trainer.state.log_history if "loss" in r)


class _Interrupt(TrainerCallback):
    """Stops training right after the optimizer step `at` (after its checkpoint), like a crash would."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            control.should_save = True
            control.should_training_stop = True
        return control


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    def run(out, resume=None, callbacks=None):
        args = make_args(
            tmp_path,
            output_dir=str(out),
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
        )
        # 12 prompts, generation batch 4: 3 steps per epoch, so the run resumes mid-epoch and crosses an epoch.
        trainer = OPDLMTrainer(
            model=make_model(vocab_size=len(make_tokenizer())),
            args=args,
            train_dataset=dataset(12),
            processing_class=make_tokenizer(),
            callbacks=callbacks,
        )
        trainer.train(resume_from_checkpoint=resume)
        return {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}

    full = run(tmp_path / "full")
    interrupted = run(tmp_path / "interrupted", callbacks=[_Interrupt(2)])
    assert interrupted == {1: full[1], 2: full[2]}
    resumed = run(tmp_path / "interrupted", resume=str(tmp_path / "interrupted" / "checkpoint-2"))
    assert set(resumed) == {1, 2, 3, 4}  # steps 1-2 come from the checkpoint's trainer state
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-7)
    assert len(set(full.values())) == 4
    assert "OPDLM" in (tmp_path / "full" / "README.md").read_text()


# ------------------------------------------------------------------------------------------------------------------
# Memory-saving teachers
# ------------------------------------------------------------------------------------------------------------------


def _teacher_logits(trainer, ids, mask):
    hidden, teacher = trainer._teacher_hidden_states(
        trainer.accelerator.unwrap_model(trainer.model), ids[:, :3], mask[:, :3], ids[:, 3:], mask[:, 3:]
    )
    return teacher.get_output_embeddings()(hidden)


def test_lora_self_teacher_is_the_original_model_without_copy(tmp_path):
    tok = make_tokenizer()
    original = make_model(vocab_size=len(tok))
    base_before = {k: v.clone() for k, v in original.state_dict().items()}
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = OPDLMTrainer(
        model=copy.deepcopy(original),
        args=make_args(tmp_path, max_steps=2, learning_rate=1e-2),
        train_dataset=dataset(),
        processing_class=tok,
        peft_config=peft_config,
    )
    assert trainer.teacher_model is None
    modules = [m for m in vars(trainer).values() if isinstance(m, torch.nn.Module)]
    n_params = {id(p) for m in modules for p in m.parameters()}
    assert len(n_params) == len(list(trainer.model.parameters()))  # no second set of weights anywhere
    lora_before = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_" in k}
    trainer.train()
    ids = torch.randint(3, 47, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        got = _teacher_logits(trainer, ids, mask)
        ref = original(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    torch.testing.assert_close(got, ref[:, 2:-1], atol=1e-5, rtol=1e-5)
    # Only the adapter learned.
    for name, param in trainer.model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and not torch.equal(param, lora_before[name]), name
        else:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert not param.requires_grad and torch.equal(param, base_before[key]), name


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_teacher_on_cpu(tmp_path, tiny_path, bits):
    quant = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    tok = make_tokenizer()
    args = make_args(tmp_path, teacher_model_init_kwargs={"quantization_config": quant})
    trainer = OPDLMTrainer(model=tiny_path, args=args, train_dataset=dataset(), processing_class=tok)
    teacher = trainer.teacher_model
    assert getattr(teacher, f"is_loaded_in_{bits}bit")
    reference = AutoModelForCausalLM.from_pretrained(tiny_path, quantization_config=quant, device_map=None)
    ids = torch.randint(3, 47, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = _teacher_logits(trainer, ids, mask)
        ref = reference(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    torch.testing.assert_close(got, ref[:, 2:-1], atol=1e-4, rtol=1e-4)
    trainer.train()
    assert all(math.isfinite(r["loss"]) for r in trainer.state.log_history if "loss" in r)


def test_qlora_student(tmp_path, tiny_path):
    tok = make_tokenizer()
    trainer = OPDLMTrainer(
        model=tiny_path,
        args=make_args(tmp_path, learning_rate=1e-2, max_completion_length=4),
        train_dataset=dataset(),
        processing_class=tok,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.model.is_loaded_in_4bit and trainer.teacher_model is None
    lora_before = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_" in k}
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert any(not torch.equal(p, lora_before[k]) for k, p in trainer.model.named_parameters() if "lora_" in k)


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


def test_bad_datasets_fail_at_construction(tmp_path):
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="no 'prompt' column"):
        OPDLMTrainer(
            model=make_model(vocab_size=len(tok)),
            args=make_args(tmp_path),
            processing_class=tok,
            train_dataset=Dataset.from_dict({"question": ["a"]}),
        )
    with pytest.raises(ValueError, match="empty"):
        OPDLMTrainer(
            model=make_model(vocab_size=len(tok)),
            args=make_args(tmp_path),
            processing_class=tok,
            train_dataset=Dataset.from_dict({"prompt": []}),
        )
    with pytest.raises(ValueError, match="eval_dataset"):
        OPDLMTrainer(
            model=make_model(vocab_size=len(tok)),
            args=make_args(tmp_path),
            processing_class=tok,
            train_dataset=dataset(),
            eval_dataset={"x": Dataset.from_dict({"text": ["a"]})},
        )


def test_bad_configuration_fails_at_construction(tmp_path):
    tok = make_tokenizer()
    from trl import DistillationConfig

    with pytest.raises(TypeError, match="OPDLMConfig"):
        OPDLMTrainer(
            model=make_model(vocab_size=len(tok)),
            args=DistillationConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False),
            processing_class=tok,
            train_dataset=dataset(),
        )
    converted, tok2 = convert_to_dlm(make_model(vocab_size=len(tok)), make_tokenizer(), block_size=8)
    with pytest.raises(ValueError, match="block_size=8"):
        OPDLMTrainer(model=converted, args=make_args(tmp_path), processing_class=tok2, train_dataset=dataset())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        OPDLMTrainer(
            model=make_model(vocab_size=len(tok), max_position_embeddings=16),
            args=make_args(tmp_path),
            processing_class=tok,
            train_dataset=dataset(),
        )


def test_long_prompts_truncated_from_the_left_with_warning(tmp_path):
    tok = make_tokenizer()
    long = "abcdefghijklmnopqrstuvwxyz0123456789"
    trainer = OPDLMTrainer(
        model=make_model(vocab_size=len(tok)),
        args=make_args(tmp_path, max_prompt_length=10),
        train_dataset=Dataset.from_dict({"prompt": [long, "hi"]}),
        processing_class=tok,
    )
    with pytest.warns(UserWarning, match="truncated from the left"):
        out = trainer._generate_and_score_completions([{"prompt": long}, {"prompt": "hi"}])
    assert out["prompt_ids"].shape[1] == 10
    assert out["prompt_ids"][0].tolist() == tok(long[-10:])["input_ids"]
    assert out["prompt_mask"][1].tolist() == [0] * 8 + [1, 1]


def test_nan_loss_stops_with_the_step(tmp_path):
    tok = make_tokenizer()
    teacher = make_model(vocab_size=len(tok), seed=1)
    with torch.no_grad():
        teacher.get_output_embeddings().weight[5, 0] = float("nan")
    trainer = OPDLMTrainer(
        model=make_model(vocab_size=len(tok)),
        teacher_model=teacher,
        args=make_args(tmp_path),
        train_dataset=dataset(),
        processing_class=tok,
    )
    with pytest.raises(FloatingPointError, match="optimizer step 1"):
        trainer.train()
