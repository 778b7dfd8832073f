"""The BD3LM baseline (block-diffusion SFT): config, collator, the loss by hand, training, bad inputs."""

import dataclasses
import math

import pytest
import torch
from datasets import Dataset

from opdlm_trl import convert_to_dlm
from opdlm_trl.baseline import BD3LMConfig, BD3LMDataCollator, BD3LMTrainer
from opdlm_trl.hub import load_dlm
from opdlm_trl.testing import make_model, make_tokenizer


PAIRS = [
    ("2+2=", " 4"),
    ("3+4=", " 7"),
    ("count:", " 1 2 3"),
    ("abc", " def"),
    ("hi", " there"),
    ("5-1=", " 4"),
    ("x?", " yz"),
    ("go", " on and on"),
]


def make_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        report_to="none",
        bf16=False,
        use_cpu=True,
        activation_checkpointing=False,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    kwargs.update(overrides)
    return BD3LMConfig(**kwargs)


def pairs_dataset(n=None):
    pairs = PAIRS[:n]
    return Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})


def make_trainer(tmp_path, dataset=None, **overrides):
    tok = make_tokenizer()
    model = make_model("qwen3", vocab_size=len(tok))
    return BD3LMTrainer(
        model=model,
        args=make_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else pairs_dataset(),
        processing_class=tok,
    )


# ------------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------------


def test_every_config_field_has_help():
    missing = [f.name for f in dataclasses.fields(BD3LMConfig) if f.init and not f.metadata.get("help")]
    assert not missing, missing


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_size": 0}, "block_size"),
        ({"loss_weighting": "sqrt"}, "loss_weighting"),
        ({"min_t": 0.0}, "min_t"),
        ({"packing": True}, "packing"),
        ({"completion_only_loss": False}, "completion_only_loss"),
        ({"loss_type": "dft"}, "loss_type"),
    ],
)
def test_invalid_config_raises(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Collator
# ------------------------------------------------------------------------------------------------------------------


def test_collator_splits_pads_and_masks_every_block():
    pad = 1
    examples = [
        {"input_ids": [5, 6, 7, 10, 11, 12, 13, 14, 0], "labels": [-100] * 3 + [10, 11, 12, 13, 14, 0]},
        {"input_ids": [8, 20, 0], "labels": [-100, 20, 0]},
    ]
    torch.manual_seed(0)
    batch = BD3LMDataCollator(pad_token_id=pad, block_size=4)(examples)
    assert batch["prompt_ids"].tolist() == [[5, 6, 7], [pad, pad, 8]]
    assert batch["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["completion_ids"].tolist() == [[10, 11, 12, 13, 14, 0, pad, pad], [20, 0] + [pad] * 6]
    assert batch["completion_mask"].tolist() == [[1] * 6 + [0, 0], [1, 1] + [0] * 6]
    noise, valid = batch["noise_mask"], batch["completion_mask"].bool()
    assert not (noise & ~valid).any()
    for row in range(2):
        for block in range(2):
            cols = slice(4 * block, 4 * block + 4)
            if valid[row, cols].any():
                assert noise[row, cols].any()  # at least one mask in every block with tokens
            assert batch["t"][row, cols].unique().numel() == 1  # one t per block
    assert ((batch["t"] >= 0) & (batch["t"] <= 1)).all()


def test_collator_fills_the_last_block_with_eos():
    pad, eos = 1, 0
    examples = [
        {"input_ids": [5, 6, 7, 10, 11, 12, 13, 14, eos], "labels": [-100] * 3 + [10, 11, 12, 13, 14, eos]},
        {"input_ids": [8, 20, 21, 22, eos], "labels": [-100, 20, 21, 22, eos]},  # ends exactly on a block
    ]
    torch.manual_seed(0)
    batch = BD3LMDataCollator(pad_token_id=pad, block_size=4, eos_token_id=eos)(examples)
    # Row 0: 6 tokens -> filled with EOS up to 8, which are completion tokens (masked and trained on).
    assert batch["completion_ids"].tolist() == [[10, 11, 12, 13, 14, eos, eos, eos], [20, 21, 22, eos] + [pad] * 4]
    assert batch["completion_mask"].tolist() == [[1] * 8, [1] * 4 + [0] * 4]
    # The filled positions can be masked: over many draws every position of row 0's last block is.
    seen = torch.zeros(8, dtype=torch.bool)
    for _ in range(50):
        seen |= BD3LMDataCollator(pad_token_id=pad, block_size=4, eos_token_id=eos)(examples)["noise_mask"][0]
    assert seen.all()


def test_trainer_pads_with_eos_by_default(tmp_path):
    trainer = make_trainer(tmp_path)
    assert trainer.data_collator.eos_token_id == trainer.processing_class.eos_token_id is not None
    trainer = make_trainer(tmp_path, pad_last_block_with_eos=False)
    assert trainer.data_collator.eos_token_id is None


def test_collator_errors():
    collate = BD3LMDataCollator(pad_token_id=1, block_size=4)
    with pytest.raises(ValueError, match="no completion token"):
        collate([{"input_ids": [3, 4], "labels": [-100, -100]}])
    with pytest.raises(ValueError, match="no prompt token"):
        collate([{"input_ids": [3, 4], "labels": [3, 4]}])
    with pytest.raises(ValueError, match="input_ids"):
        collate([{"prompt": "x", "completion": "y"}])


# ------------------------------------------------------------------------------------------------------------------
# The loss, by hand
# ------------------------------------------------------------------------------------------------------------------


def _log_softmax_at(logits, index):
    values = [float(v) for v in logits]
    m = max(values)
    return values[index] - m - math.log(sum(math.exp(v - m) for v in values))


def _hand_loss(model, batch, mask_id, pad_id, weighting, min_t=1e-3):
    """Explicit loops: for each row and block j, the converted model's own (block-causal) forward on
    `[prompt | x0 blocks < j | x_t block j]`, cross-entropy of the unshifted logit at every masked position against
    the clean token, weighted by 1 or 1/t; per row sum / count, then the mean over rows."""
    row_means = []
    for r in range(batch["prompt_ids"].shape[0]):
        prompt = batch["prompt_ids"][r][batch["prompt_mask"][r].bool()]
        n_valid = int(batch["completion_mask"][r].sum())
        x0 = batch["completion_ids"][r, :n_valid]
        noise = batch["noise_mask"][r, :n_valid]
        terms = []
        for start in range(0, n_valid, 4):
            block = list(range(start, min(start + 4, n_valid)))
            xt_block = torch.tensor([mask_id if noise[i] else int(x0[i]) for i in block])
            # The last block of a row that stopped at EOS is completed with (unattended) padding.
            n_pad = 4 - len(block)
            ids = torch.cat([prompt, x0[:start], xt_block, torch.full((n_pad,), pad_id)])[None]
            attention_mask = torch.ones_like(ids)
            attention_mask[0, ids.shape[1] - n_pad :] = 0
            with torch.no_grad():
                logits = model(ids, attention_mask=attention_mask).logits[0, ids.shape[1] - 4 :]
            for k, i in enumerate(block):
                if noise[i]:
                    weight = 1.0 if weighting == "none" else 1.0 / max(float(batch["t"][r, i]), min_t)
                    terms.append(-weight * _log_softmax_at(logits[k], int(x0[i])))
        if terms:
            row_means.append(sum(terms) / len(terms))
    return sum(row_means) / len(row_means)


@pytest.mark.parametrize("weighting", ["none", "inverse_t"])
def test_loss_matches_hand_computation(tmp_path, weighting):
    trainer = make_trainer(tmp_path, loss_weighting=weighting)
    model = trainer.model.eval()
    tok = trainer.processing_class
    eos, pad = tok.eos_token_id, tok.pad_token_id
    gen = torch.Generator().manual_seed(0)
    # 3 rows: left-padded prompts of 4, 2, 3 tokens; completions of 7, 3 and 1 (EOS only) tokens, padded to 8.
    prompt_ids = torch.full((3, 4), pad)
    prompt_mask = torch.zeros(3, 4, dtype=torch.long)
    completion_ids = torch.full((3, 8), pad)
    completion_mask = torch.zeros(3, 8, dtype=torch.long)
    for r, (n_prompt, n_completion) in enumerate([(4, 7), (2, 3), (3, 1)]):
        prompt_ids[r, 4 - n_prompt :] = torch.randint(3, 40, (n_prompt,), generator=gen)
        prompt_mask[r, 4 - n_prompt :] = 1
        completion_ids[r, : n_completion - 1] = torch.randint(3, 40, (n_completion - 1,), generator=gen)
        completion_ids[r, n_completion - 1] = eos
        completion_mask[r, :n_completion] = 1
    noise = torch.tensor(
        [[1, 0, 1, 1, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    t = torch.tensor([[0.7] * 4 + [0.2] * 4, [0.5] * 4 + [0.9] * 4, [0.0004] * 4 + [0.3] * 4])
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "noise_mask": noise,
        "t": t,
    }
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    expected = _hand_loss(model, batch, trainer.mask_token_id, pad, weighting)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    if weighting == "inverse_t":  # the clipped 1/t of row 2 (t = 4e-4 < min_t = 1e-3) dominates
        assert loss.item() > 100


# ------------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------------


def test_loss_falls_tokens_are_counted_and_the_checkpoint_is_a_dlm(tmp_path):
    trainer = make_trainer(
        tmp_path, max_steps=40, learning_rate=3e-3, per_device_train_batch_size=8, lr_scheduler_type="constant"
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    # Training tokens: 40 updates of the whole 8-row dataset, each row = its prompt + completion + EOS tokens, the
    # completion filled with EOS up to the end of its last block of 4 (pad_last_block_with_eos).
    tok = trainer.processing_class
    per_epoch = sum(len(tok(p)["input_ids"]) + math.ceil((len(tok(c)["input_ids"]) + 1) / 4) * 4 for p, c in PAIRS)
    assert trainer.state.num_input_tokens_seen == 40 * per_epoch
    assert [log["num_tokens"] for log in trainer.state.log_history if "loss" in log][-1] == 40 * per_epoch
    # Checkpoints are diffusion-LM folders.
    trainer.save_model(str(tmp_path / "saved"))
    loaded, loaded_tok = load_dlm(str(tmp_path / "saved"))
    assert loaded.config.dlm_block_size == 4 and loaded_tok.mask_token_id == trainer.mask_token_id
    assert (tmp_path / "saved" / "custom_generate" / "generate.py").exists()
    assert "bd3lm" in (tmp_path / "saved" / "README.md").read_text().lower()


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """Same rows, same noise: one batch of 4 and two accumulated micro-batches of 2 give the same gradient."""
    trainer = make_trainer(tmp_path)
    collate = trainer.data_collator
    examples = [trainer.train_dataset[i] for i in range(4)]
    torch.manual_seed(1)
    full = collate(examples)
    model = trainer.model.train()

    def grads(batches):
        model.zero_grad()
        for b in batches:
            (trainer.compute_loss(model, dict(b)) / len(batches)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    assert torch.allclose(grads([full]), grads(halves), atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors(tmp_path):
    tok = make_tokenizer()
    model = make_model("qwen3", vocab_size=len(tok))
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match="'completion'"):
        BD3LMTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"prompt": ["a"]}), processing_class=tok)
    with pytest.raises(ValueError, match="'prompt'"):
        BD3LMTrainer(
            model=model, args=args, train_dataset=Dataset.from_dict({"completion": ["a"]}), processing_class=tok
        )
    with pytest.raises(ValueError, match="empty"):
        BD3LMTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": [], "completion": []}),
            processing_class=tok,
        )
    with pytest.raises(ValueError, match="required"):
        BD3LMTrainer(model=model, args=args, processing_class=tok)
    with pytest.raises(TypeError, match="BD3LMConfig"):
        from trl import SFTConfig

        BD3LMTrainer(
            model=model, args=SFTConfig(str(tmp_path), use_cpu=True, bf16=False), train_dataset=pairs_dataset()
        )
    converted, tok8 = convert_to_dlm(make_model("qwen3", vocab_size=len(tok)), make_tokenizer(), block_size=8)
    with pytest.raises(ValueError, match="block_size=8"):
        BD3LMTrainer(model=converted, args=args, train_dataset=pairs_dataset(), processing_class=tok8)
