import logging

import pytest
import torch

from opdlm_trl import causal_attention, convert_to_dlm, is_dlm, make_4d_mask, position_ids_from_mask
from opdlm_trl.attention import DEFAULT_MASK_TOKEN, same_block_overlay
from opdlm_trl.testing import RESERVED_TOKEN, TINY_ARCHITECTURES, make_model, make_tokenizer


ARCHS = list(TINY_ARCHITECTURES)


def _logits(model, ids, mask=None):
    with torch.no_grad():
        if mask is None:
            return model(input_ids=ids).logits
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


def _changed_positions(model, ids, pos, tol=1e-5):
    other = ids.clone()
    other[0, pos] = (other[0, pos] + 1) % 40 + 5
    diff = (_logits(model, ids) - _logits(model, other)).abs().amax(-1)[0]
    return (diff > tol).nonzero().flatten().tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_block_causal_reach(arch, attn):
    tok = make_tokenizer()
    model, tok = convert_to_dlm(make_model(arch, vocab_size=len(tok), attn_implementation=attn), tok, block_size=4)
    ids = torch.randint(5, 40, (1, 11))  # blocks aligned to the end: [0..2] [3..6] [7..10]
    # A token in the last block reaches exactly its block-mates (and itself): nothing earlier changes.
    assert _changed_positions(model, ids, 8) == [7, 8, 9, 10]
    # A token inside the middle block changes its block-mates and every later position, nothing before.
    assert _changed_positions(model, ids, 4) == list(range(3, 11))
    # The first (partial) block.
    assert _changed_positions(model, ids, 1) == list(range(0, 11))
    # The original causal view of the same weights: a token reaches only itself and later positions.
    with causal_attention(model):
        assert _changed_positions(model, ids, 8) == [8, 9, 10]
    assert _changed_positions(model, ids, 8) == [7, 8, 9, 10]  # restored on exit


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_changes_nothing(arch):
    tok = make_tokenizer()
    model, tok = convert_to_dlm(make_model(arch, vocab_size=len(tok)), tok, block_size=4)
    ids = torch.randint(5, 40, (1, 9))
    padded = torch.cat([torch.full((1, 3), tok.pad_token_id), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    alone = _logits(model, ids, torch.ones_like(ids))
    with_pad = _logits(model, padded, mask)[:, 3:]
    torch.testing.assert_close(with_pad, alone, atol=1e-5, rtol=1e-5)


def test_converted_weights_unchanged_and_causal_view_matches_original(tokenizer):
    original = make_model("llama", vocab_size=len(tokenizer))
    reference = {k: v.clone() for k, v in original.state_dict().items()}
    ids = torch.randint(5, 40, (2, 10))
    before = _logits(original, ids)
    model, _ = convert_to_dlm(original, tokenizer, block_size=4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    with causal_attention(model):
        torch.testing.assert_close(_logits(model, ids), before)
    assert not torch.allclose(_logits(model, ids), before)


def test_mask_token_reuses_reserved_token():
    tok = make_tokenizer(with_reserved=True)
    model = make_model("qwen3", vocab_size=len(tok))
    vocab_before = model.get_input_embeddings().weight.shape[0]
    model, tok = convert_to_dlm(model, tok)
    assert tok.mask_token == RESERVED_TOKEN
    assert model.config.mask_token_id == tok.convert_tokens_to_ids(RESERVED_TOKEN)
    assert model.get_input_embeddings().weight.shape[0] == vocab_before
    assert model.config.dlm_block_size == 4 and is_dlm(model)
    assert getattr(model.config, "dlm_original_vocab_size", None) is None  # nothing was added


def test_mask_token_added_and_embeddings_resized():
    tok = make_tokenizer(with_reserved=False)
    model = make_model("qwen3", vocab_size=len(tok))
    n = len(tok)
    model, tok = convert_to_dlm(model, tok, block_size=2)
    assert tok.mask_token == DEFAULT_MASK_TOKEN
    assert tok.mask_token_id == n == model.config.mask_token_id
    assert model.get_input_embeddings().weight.shape[0] == n + 1
    assert model.get_output_embeddings().weight.shape[0] == n + 1
    assert model.config.dlm_original_vocab_size == n  # what the original weights (the self-teacher) cover


def test_no_pad_token_falls_back_to_eos_with_warning(caplog):
    tok = make_tokenizer(with_pad=False)
    model = make_model("qwen3", vocab_size=len(tok))
    with caplog.at_level(logging.WARNING):
        _, tok = convert_to_dlm(model, tok)
    assert tok.pad_token == tok.eos_token
    assert "no pad token" in caplog.text


def test_bidirectional_flag(tokenizer):
    model, _ = convert_to_dlm(make_model("qwen3", vocab_size=len(tokenizer)), tokenizer, bidirectional=True)
    ids = torch.randint(5, 40, (1, 10))
    # Fully bidirectional: the last token reaches every position.
    assert _changed_positions(model, ids, 9) == list(range(10))
    assert model.config.is_causal is False


def test_bad_inputs(tokenizer):
    model = make_model("qwen3", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="block_size"):
        convert_to_dlm(model, tokenizer, block_size=0)
    with pytest.raises(TypeError, match="causal LM"):
        convert_to_dlm("Qwen/Qwen3-0.6B", tokenizer)
    with pytest.raises(TypeError, match="AutoModelForCausalLM"):
        convert_to_dlm(model.model, tokenizer)  # the backbone has no LM head
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        convert_to_dlm(model, tokenizer)


def test_make_4d_mask_formats(tiny_dlm):
    model, _ = tiny_dlm

    def layout(b, h, q, kv):
        return kv <= q

    pad = torch.tensor([[0, 1, 1]])
    sdpa = make_4d_mask(model, layout, 1, 3, 3, attention_mask=pad)
    assert sdpa.dtype == torch.bool
    # Row 0 is a padding query (transformers un-masks fully masked rows to avoid NaNs); real rows follow the layout.
    assert sdpa[0, 0, 1:].tolist() == [[False, True, False], [False, True, True]]
    model.config._attn_implementation = "eager"
    eager = make_4d_mask(model, layout, 1, 3, 3, attention_mask=pad)
    assert eager.dtype == torch.float32 and eager[0, 0, 2, 2] == 0 and eager[0, 0, 2, 0] < -1e30


def test_same_block_overlay_alignment():
    f = same_block_overlay(4, 10)  # blocks [0,1] [2..5] [6..9]
    q = torch.arange(10)[:, None]
    kv = torch.arange(10)[None, :]
    m = f(0, 0, q, kv)
    assert m[0].nonzero().flatten().tolist() == [0, 1]
    assert m[3].nonzero().flatten().tolist() == [2, 3, 4, 5]
    assert m[9].nonzero().flatten().tolist() == [6, 7, 8, 9]


def test_attention_kernel_selection(tokenizer, monkeypatch, caplog):
    import opdlm_trl.attention as attention

    model = make_model("qwen3", vocab_size=len(tokenizer))
    with caplog.at_level(logging.INFO, logger="opdlm_trl.attention"):
        assert attention.select_attn_implementation(model) == "sdpa"  # CPU: sdpa with a boolean mask
    assert "sdpa" in caplog.text
    eager = make_model("qwen3", vocab_size=len(tokenizer), attn_implementation="eager")
    assert attention.select_attn_implementation(eager) == "eager"

    class FakeDevice:
        type = "cuda"

    class FakeParam:
        device = FakeDevice()

    monkeypatch.setattr(type(model), "parameters", lambda self: iter([FakeParam()]))
    assert attention.select_attn_implementation(model) == "flex_attention"
    monkeypatch.setattr(attention, "_flex_attention_available", lambda: False)
    assert attention.select_attn_implementation(model) == "sdpa"


def test_flex_attention_forward_is_block_causal(tokenizer):
    # Flex attention is the GPU fast path; its (uncached) forward also runs on CPU and must give the same mask reach.
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = make_model("qwen3", vocab_size=len(tokenizer))
    model, _ = convert_to_dlm(model, tokenizer, attn_implementation="flex_attention")
    ids = torch.randint(5, 40, (1, 11))
    sdpa = make_model("qwen3", vocab_size=len(tokenizer))
    sdpa, _ = convert_to_dlm(sdpa, make_tokenizer(), attn_implementation="sdpa")
    torch.testing.assert_close(_logits(model, ids), _logits(sdpa, ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gradient_checkpointing_same_gradients(tokenizer, attn):
    """Gradient checkpointing recomputes the forward with the same block mask: identical gradients."""
    grads = []
    ids = torch.randint(5, 40, (2, 12))
    for checkpointing in (False, True):
        model = make_model("llama", vocab_size=len(tokenizer), attn_implementation=attn)
        model, _ = convert_to_dlm(model, make_tokenizer(), block_size=4)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        custom = make_4d_mask(model, lambda b, h, q, kv: kv <= q + 2, 2, 12, 12)  # an explicit 4-D layout too
        loss = (
            model(input_ids=ids).logits.logsumexp(-1).mean()
            + model(input_ids=ids, attention_mask=custom).logits[..., 0].mean()
        )
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_bf16_keeps_block_reach(tokenizer):
    model = make_model("qwen3", vocab_size=len(tokenizer)).to(torch.bfloat16)
    model, _ = convert_to_dlm(model, tokenizer, block_size=4)
    ids = torch.randint(5, 40, (1, 11))
    assert _changed_positions(model, ids, 8, tol=0) == [7, 8, 9, 10]
