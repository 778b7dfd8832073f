import pytest
import torch

from opdlm_trl import causal_attention, convert_to_dlm, make_4d_mask, position_ids_from_mask
from opdlm_trl.rows import (
    build_training_rows,
    dense_mask,
    loss_mask,
    pad_to_block_multiple,
    row_mask_function,
    select_noise,
    select_noise_one_state_per_block,
    select_noise_random,
)
from opdlm_trl.testing import make_model, make_tokenizer


def _reference_reach(l0, l1, b, valid=None):
    """The training-row rules of METHOD.md, written as plain loops."""
    t = l0 + 2 * l1

    def region(i):
        if i < l0:
            return "prompt", -((l0 - i + b - 1) // b)  # prompt blocks aligned to the prompt end: -1, -2, ...
        if i < l0 + l1:
            return "x0", (i - l0) // b
        return "xt", (i - l0 - l1) // b

    out = torch.zeros(t, t, dtype=torch.bool)
    for q in range(t):
        rq, jq = region(q)
        for k in range(t):
            rk, jk = region(k)
            if rq in ("prompt", "x0"):
                ok = rk in ("prompt", "x0") and jk <= jq
            else:
                ok = rk == "prompt" or (rk == "x0" and jk < jq) or (rk == "xt" and jk == jq)
            if valid is not None:
                ok = (ok and bool(valid[k]) and bool(valid[q])) or q == k
            out[q, k] = ok
    return out


@pytest.mark.parametrize("l0,l1,b", [(2, 4, 2), (5, 8, 4), (3, 6, 3), (4, 4, 1), (1, 4, 4)])
def test_mask_reach_matches_rules(l0, l1, b):
    got = dense_mask(row_mask_function(l0, l1, b), 1, l0 + 2 * l1)[0, 0]
    assert torch.equal(got, _reference_reach(l0, l1, b))


def test_mask_reach_literal_small_case():
    # L0 = 2, L1 = 4, b = 2: prompt [P P], x0 blocks [A A][B B], x_t blocks [a a][b b].
    expected = [
        # P  P  A  A  B  B  a  a  b  b
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # P
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # P
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # A
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # A
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # B
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # B
        [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],  # a: prompt + its own noisy block
        [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],  # a
        [1, 1, 1, 1, 0, 0, 0, 0, 1, 1],  # b: prompt + clean A + its own noisy block
        [1, 1, 1, 1, 0, 0, 0, 0, 1, 1],  # b
    ]
    got = dense_mask(row_mask_function(2, 4, 2), 1, 10)[0, 0]
    assert torch.equal(got, torch.tensor(expected, dtype=torch.bool))


def test_mask_padding_never_attended():
    l0, l1, b = 3, 4, 2
    valid = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)  # pad at 0, x0[3], x_t[3]
    got = dense_mask(row_mask_function(l0, l1, b, valid), 1, l0 + 2 * l1)[0, 0]
    assert torch.equal(got, _reference_reach(l0, l1, b, valid[0]))
    real = valid[0].nonzero().flatten()
    pads = (~valid[0]).nonzero().flatten()
    assert not got[real][:, pads].any()  # no real token attends padding
    for p in pads.tolist():  # a padding query sees only itself
        assert got[p].nonzero().flatten().tolist() == [p]


def test_completion_length_must_be_block_multiple():
    with pytest.raises(ValueError, match="multiple"):
        row_mask_function(3, 6, 4)
    assert pad_to_block_multiple(torch.ones(2, 5, dtype=torch.long), 4, 0).tolist() == [[1] * 5 + [0] * 3] * 2


def test_build_training_rows_ids_and_positions():
    mask_id, pad = 99, 1
    prompt_ids = torch.tensor([[pad, 10, 11], [12, 13, 14]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    completion_ids = torch.tensor([[20, 21, 0, pad], [22, 23, 24, 25]])  # row 0: EOS (0) at 2, then padding
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    noise = torch.tensor([[False, True, True, True], [True, False, False, True]])
    rows = build_training_rows(prompt_ids, prompt_mask, completion_ids, completion_mask, noise, mask_id, 2, pad)
    assert rows.prompt_length == 3 and rows.completion_length == 4
    assert rows.input_ids.tolist() == [
        [pad, 10, 11, 20, 21, 0, pad, 20, mask_id, mask_id, pad],
        [12, 13, 14, 22, 23, 24, 25, mask_id, 23, 24, mask_id],
    ]
    assert rows.position_ids.tolist() == [[0, 0, 1, 2, 3, 4, 4, 2, 3, 4, 4], [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6]]
    assert rows.valid.long().tolist() == [[0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0], [1] * 11]
    # Completions are right-padded to a block multiple.
    rows3 = build_training_rows(
        prompt_ids, prompt_mask, completion_ids[:, :3], completion_mask[:, :3], noise[:, :3], mask_id, 2, pad
    )
    assert rows3.completion_length == 4 and rows3.input_ids.shape[1] == 3 + 8
    assert rows3.input_ids[1, -1].item() == pad and not rows3.valid[1, -1]


def test_one_state_per_block_picks_uniformly_among_the_blocks_steps():
    # Block 0: steps [0, 1, 1, 2]; block 1: [1, 0, -1, -1] (EOS then nothing); block 2: nothing generated.
    traj = torch.tensor([[0, 1, 1, 2, 1, 0, -1, -1, -1, -1, -1, -1]])
    allowed0 = {(1, 1, 1, 1): 0, (0, 1, 1, 1): 1, (0, 0, 0, 1): 2}
    allowed1 = {(1, 1, 0, 0): 0, (1, 0, 0, 0): 1}
    counts0, counts1 = [0, 0, 0], [0, 0]
    gen = torch.Generator().manual_seed(0)
    n = 3000
    for _ in range(n):
        m = select_noise_one_state_per_block(traj, 4, gen)[0].long().tolist()
        counts0[allowed0[tuple(m[0:4])]] += 1
        counts1[allowed1[tuple(m[4:8])]] += 1
        assert m[8:] == [0, 0, 0, 0]
    for c in counts0:
        assert abs(c / n - 1 / 3) < 0.04
    for c in counts1:
        assert abs(c / n - 1 / 2) < 0.04


def test_random_mask_distribution_and_at_least_one_mask():
    valid = torch.tensor([[True, True, True, True, True, True, False, False]])
    gen = torch.Generator().manual_seed(0)
    n = 4000
    hist = torch.zeros(5)
    for _ in range(n):
        m = select_noise_random(valid, 4, gen)[0]
        assert m[0:4].any() and m[4:6].any() and not m[6:].any()
        hist[int(m[0:4].sum())] += 1
    # t ~ U(0, 1), Binomial(4, t) masks: each count 0..4 has probability 1/5; the forced mask moves 0 onto 1.
    freq = hist / n
    assert abs(freq[1] - 0.4) < 0.04
    for k in (2, 3, 4):
        assert abs(freq[k] - 0.2) < 0.04


def test_select_noise_dispatch_and_errors():
    traj = torch.tensor([[0, 0, 1, 1]])
    torch.manual_seed(0)
    a = select_noise("one_state_per_block", traj, 2)
    torch.manual_seed(0)
    b = select_noise_one_state_per_block(traj, 2)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="state_selection"):
        select_noise("bogus", traj, 2)
    with pytest.raises(ValueError, match="multiple"):
        select_noise_one_state_per_block(torch.zeros(1, 3, dtype=torch.long), 2)


def test_loss_mask_eos_handling():
    noise = torch.tensor([[True, True, True, True]])
    ids = torch.tensor([[5, 0, 1, 1]])  # EOS (0) at 1, then padding
    valid = torch.tensor([[1, 1, 0, 0]])
    assert loss_mask(noise, ids, valid, [0], loss_on_eos=True).tolist() == [[True, True, False, False]]
    assert loss_mask(noise, ids, valid, [0], loss_on_eos=False).tolist() == [[True, False, False, False]]


def _random_case(tok, model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, l0, l1 = 4, 6, 8
    lengths = [6, 3, 5, 1]
    prompt_ids = torch.full((b, l0), tok.pad_token_id)
    prompt_mask = torch.zeros(b, l0, dtype=torch.long)
    for r, n in enumerate(lengths):
        prompt_ids[r, l0 - n :] = torch.randint(4, 40, (n,), generator=gen)
        prompt_mask[r, l0 - n :] = 1
    completion_ids = torch.randint(4, 40, (b, l1), generator=gen)
    completion_mask = torch.ones(b, l1, dtype=torch.long)
    # Row 1 stops at an EOS at position 5 (inside block 1); row 3 at position 0.
    completion_ids[1, 5] = tok.eos_token_id
    completion_ids[1, 6:] = tok.pad_token_id
    completion_mask[1, 6:] = 0
    completion_ids[3, 0] = tok.eos_token_id
    completion_ids[3, 1:] = tok.pad_token_id
    completion_mask[3, 1:] = 0
    trajectory = torch.randint(0, 3, (b, l1), generator=gen).masked_fill(completion_mask == 0, -1)
    noise = select_noise_one_state_per_block(trajectory, 4, gen)
    rows = build_training_rows(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        noise,
        model.config.mask_token_id,
        4,
        tok.pad_token_id,
    )
    return prompt_ids, prompt_mask, completion_ids, completion_mask, noise, rows


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_row_logits_equal_sampler_style_forward(attn):
    """The x_t logits of one training row equal, block by block, the sampler's forward [prompt | x0<j | x_t block j]."""
    tok = make_tokenizer()
    model, tok = convert_to_dlm(make_model("qwen3", vocab_size=len(tok), attn_implementation=attn), tok, block_size=4)
    prompt_ids, prompt_mask, completion_ids, completion_mask, noise, rows = _random_case(tok, model)
    bsz, total = rows.input_ids.shape
    mask4d = make_4d_mask(model, rows.mask_function(), bsz, total, total, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        row_logits = model(input_ids=rows.input_ids, attention_mask=mask4d, position_ids=rows.position_ids).logits
    xt_logits = row_logits[:, rows.noisy_slice]
    xt_ids = rows.input_ids[:, rows.noisy_slice]
    checked = 0
    for j in range(2):
        blk = slice(4 * j, 4 * j + 4)
        ids = torch.cat([prompt_ids, completion_ids[:, : 4 * j], xt_ids[:, blk]], dim=1)
        m2d = torch.cat([prompt_mask, completion_mask[:, : 4 * j], completion_mask[:, blk]], dim=1)
        with torch.no_grad():  # the model's own block-causal attention, blocks aligned to the end of the input
            ref = model(input_ids=ids, attention_mask=m2d, position_ids=position_ids_from_mask(m2d)).logits[:, -4:]
        valid = completion_mask[:, blk].bool()
        torch.testing.assert_close(xt_logits[:, blk][valid], ref[valid], atol=2e-5, rtol=1e-4)
        checked += int(valid.sum())
    assert checked == int(completion_mask.sum()) and noise.any()
    # The clean x0 part equals the plain block-causal forward of [prompt | x0].
    m2d = torch.cat([prompt_mask, completion_mask], dim=1)
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=m2d, position_ids=position_ids_from_mask(m2d)).logits
    valid = m2d.bool()
    torch.testing.assert_close(row_logits[:, : rows.noisy_slice.start][valid], ref[valid], atol=2e-5, rtol=1e-4)
    # Sanity: the row is not trivially equal to a causal forward.
    with causal_attention(model), torch.no_grad():
        causal = model(input_ids=rows.input_ids, position_ids=rows.position_ids).logits[:, rows.noisy_slice]
    assert not torch.allclose(causal[0], xt_logits[0], atol=1e-3)


def test_make_4d_mask_keeps_the_row_layout(tiny_dlm):
    """Building the mask on a block-causal model (whose overlay ORs same-block pairs) keeps the exact layout."""
    model, tok = tiny_dlm
    *_, rows = _random_case(tok, model)
    bsz, total = rows.input_ids.shape
    expected = dense_mask(rows.mask_function(), bsz, total)
    got = make_4d_mask(model, rows.mask_function(), bsz, total, total)
    assert torch.equal(got.bool(), expected)
    with causal_attention(model):
        got = make_4d_mask(model, rows.mask_function(), bsz, total, total)
    assert torch.equal(got.bool(), expected)
