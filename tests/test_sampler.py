import pytest
import torch

from opdlm_trl import convert_to_dlm, diffusion_generate
from opdlm_trl.testing import make_model, make_tokenizer


PROMPTS = ["abc 12 +", "hello world 7 8 9", "z"]


def _batch(tok, prompts=PROMPTS):
    return tok(prompts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("threshold", [None, 0.3])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_greedy_cached_equals_uncached(arch, threshold):
    tok = make_tokenizer()
    model, tok = convert_to_dlm(make_model(arch, vocab_size=len(tok), num_hidden_layers=2), tok, block_size=4)
    enc = _batch(tok)
    kw = dict(max_new_tokens=22, threshold=threshold, steps_per_block=2, eos_token_id=tok.eos_token_id)
    cached = diffusion_generate(model, enc.input_ids, enc.attention_mask, use_cache=True, **kw)
    uncached = diffusion_generate(model, enc.input_ids, enc.attention_mask, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.trajectory, uncached.trajectory)
    assert cached.nfe == uncached.nfe
    assert cached.sequences.shape == (3, enc.input_ids.size(1) + 22)  # 22 rounded up to 24 and trimmed back


def test_batch_equals_single_rows(tiny_dlm):
    model, tok = tiny_dlm
    enc = _batch(tok)
    batched = diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=12)
    for i, prompt in enumerate(PROMPTS):
        single = tok([prompt], return_tensors="pt")
        out = diffusion_generate(model, single.input_ids, single.attention_mask, max_new_tokens=12)
        assert torch.equal(out.sequences[0, -12:], batched.sequences[i, -12:])
        assert torch.equal(out.trajectory[0], batched.trajectory[i])


def test_static_rule_commits_quota_per_step(tiny_dlm):
    model, tok = tiny_dlm
    enc = _batch(tok)
    for steps, per_step in [(4, 1), (2, 2), (1, 4)]:
        out = diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=16, steps_per_block=steps)
        assert out.nfe == 4 * steps
        for row in out.trajectory:
            for block in row.view(4, 4):
                counts = torch.bincount(block, minlength=steps)
                assert counts.tolist() == [per_step] * steps
        assert out.tokens_per_forward == pytest.approx(per_step)


def test_dynamic_threshold_commits_above_threshold(tiny_dlm):
    model, tok = tiny_dlm
    enc = _batch(tok)
    # threshold 1.0 never fires (probabilities < 1): identical to static decoding.
    static = diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=16)
    never = diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=16, threshold=1.0)
    assert torch.equal(static.sequences, never.sequences) and static.nfe == never.nfe
    # A tiny threshold commits every position at the first step: one forward per block.
    low = diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=16, threshold=1e-6)
    assert low.nfe == 4 and bool((low.trajectory == 0).all())
    assert low.tokens_per_forward == pytest.approx(4.0)


def test_eos_ends_row_and_pads(tiny_dlm):
    model, tok = tiny_dlm
    enc = _batch(tok)
    free = diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=16)
    gen = free.sequences[:, -16:]
    eos = int(gen[0, 5])  # pretend the token the model writes at position 5 of row 0 is EOS
    out = diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=16, eos_token_id=eos)
    g = out.sequences[:, -16:]
    for row in range(3):
        hits = (g[row] == eos).nonzero().flatten()
        if len(hits):
            first = int(hits[0])
            assert bool((g[row, first + 1 :] == tok.pad_token_id).all())
            assert bool((out.trajectory[row, first + 1 :] == -1).all())
            assert bool((out.trajectory[row, : first + 1] >= 0).all())
    assert bool((g[0] == eos).any())


def test_sampling_is_seeded_and_respects_top_k(tiny_dlm):
    model, tok = tiny_dlm
    enc = _batch(tok)
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=1, threshold=0.9, steps_per_block=4)
    # top_k=1 sampling is greedy whatever the seed.
    greedy = diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=16, threshold=0.9)
    topk1 = diffusion_generate(
        model, enc.input_ids, enc.attention_mask, generator=torch.Generator().manual_seed(3), **kw
    )
    assert torch.equal(greedy.sequences, topk1.sequences)
    kw["top_k"] = 0
    a = diffusion_generate(model, enc.input_ids, enc.attention_mask, generator=torch.Generator().manual_seed(1), **kw)
    b = diffusion_generate(model, enc.input_ids, enc.attention_mask, generator=torch.Generator().manual_seed(1), **kw)
    c = diffusion_generate(model, enc.input_ids, enc.attention_mask, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)


@pytest.mark.parametrize("confidence", ["probability", "margin", "entropy"])
def test_confidence_measures(tiny_dlm, confidence):
    model, tok = tiny_dlm
    enc = _batch(tok)
    out = diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=8, confidence=confidence)
    assert bool((out.trajectory >= 0).all()) and out.nfe == 8
    assert not bool((out.sequences == model.config.mask_token_id).any())


def test_model_generate_runs_the_sampler(tiny_dlm):
    model, tok = tiny_dlm
    enc = _batch(tok)
    ref = diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=12, threshold=0.5)
    out = model.generate(**enc, max_new_tokens=12, threshold=0.5)
    assert torch.equal(out, ref.sequences)
    full = model.generate(
        enc.input_ids,
        attention_mask=enc.attention_mask,
        max_new_tokens=12,
        threshold=0.5,
        return_dict_in_generate=True,
    )
    assert torch.equal(full.trajectory, ref.trajectory) and full.nfe == ref.nfe
    # do_sample with top_k=1 is greedy: the standard GenerationConfig fields reach the sampler.
    sampled = model.generate(**enc, max_new_tokens=12, threshold=0.5, do_sample=True, top_k=1)
    assert torch.equal(sampled, ref.sequences)


def test_bidirectional_model_runs_uncached():
    tok = make_tokenizer()
    model, tok = convert_to_dlm(make_model("qwen3", vocab_size=len(tok)), tok, bidirectional=True)
    enc = _batch(tok)
    out = diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=8)
    assert out.nfe == 8
    with pytest.raises(ValueError, match="bidirectional"):
        diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=8, use_cache=True)


def test_bad_inputs(tiny_dlm):
    model, tok = tiny_dlm
    enc = _batch(tok)
    with pytest.raises(ValueError, match="threshold"):
        diffusion_generate(model, enc.input_ids, enc.attention_mask, threshold=1.5)
    with pytest.raises(ValueError, match="threshold"):
        diffusion_generate(model, enc.input_ids, enc.attention_mask, threshold=0.0)
    with pytest.raises(ValueError, match="Empty prompt"):
        diffusion_generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=1000)
    with pytest.raises(ValueError, match="left-padded"):
        diffusion_generate(model, enc.input_ids, enc.attention_mask.flip(1))
    with pytest.raises(ValueError, match="steps_per_block"):
        diffusion_generate(model, enc.input_ids, steps_per_block=5)
    with pytest.raises(ValueError, match="confidence"):
        diffusion_generate(model, enc.input_ids, confidence="logit")
    plain = make_model("qwen3", vocab_size=len(tok))
    with pytest.raises(ValueError, match="convert_to_dlm"):
        diffusion_generate(plain, enc.input_ids)


def test_nothing_after_eos_is_attended(tiny_dlm):
    """Tokens after a committed EOS in its block are padding and invisible, as in the training rows."""
    model, tok = tiny_dlm
    enc = _batch(tok, PROMPTS[:1])
    free = diffusion_generate(model, enc.input_ids, max_new_tokens=8, eos_token_id=[])
    order = free.trajectory[0, :4]
    first = int(order.argmin())  # the first committed position of block 0
    if first == 3:
        pytest.skip("the first commit is the last position of the block: nothing after it")
    eos = int(free.sequences[0, enc.input_ids.size(1) + first])
    a = diffusion_generate(model, enc.input_ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    b = diffusion_generate(model, enc.input_ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=5)
    # Whatever the pad token is, the generated tokens (up to the first EOS) and their order are the same.
    p = enc.input_ids.size(1)
    assert torch.equal(a.trajectory, b.trajectory)
    generated = a.trajectory[0] >= 0
    assert torch.equal(a.sequences[0, p:][generated], b.sequences[0, p:][generated])
    assert bool((a.sequences[0, p:][~generated] == tok.pad_token_id).all())
    assert bool((b.sequences[0, p:][~generated] == 5).all()) and int((~generated).sum()) > 0
