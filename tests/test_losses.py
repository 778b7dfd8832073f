import math

import pytest
import torch

from opdlm_trl.losses import (
    chunked_divergence,
    dense_divergence,
    dense_divergence_from_hidden,
    divergence_beta,
    logit_postprocessing,
    opdlm_loss,
)
from opdlm_trl.testing import make_model


def _softmax(row, temperature=1.0):
    m = max(row)
    e = [math.exp((x - m) / temperature) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _by_hand(student, teacher, divergence, beta=0.5, temperature=1.0, top_k=None):
    out = []
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        ps, pt = _softmax(s_row, temperature), _softmax(t_row, temperature)
        vocab = range(len(s_row))
        if top_k is not None:
            vocab = sorted(vocab, key=lambda v: -t_row[v])[:top_k]
        total = 0.0
        for v in vocab:
            if divergence == "forward_kl":
                total += pt[v] * (math.log(pt[v]) - math.log(ps[v]))
            elif divergence == "reverse_kl":
                total += ps[v] * (math.log(ps[v]) - math.log(pt[v]))
            else:
                m = (1 - beta) * ps[v] + beta * pt[v]
                total += beta * pt[v] * math.log(pt[v] / m) + (1 - beta) * ps[v] * math.log(ps[v] / m)
        out.append(total)
    return torch.tensor(out)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_divergence_matches_hand_computation(divergence, beta, top_k, temperature):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 7, generator=gen) * 2
    teacher = torch.randn(4, 7, generator=gen) * 2
    got = dense_divergence(student, teacher, divergence, beta, temperature, top_k)
    torch.testing.assert_close(
        got, _by_hand(student, teacher, divergence, beta, temperature, top_k), atol=1e-5, rtol=1e-5
    )
    if top_k is None:
        assert (got >= -1e-6).all()
        assert dense_divergence(teacher, teacher, divergence, beta).abs().max() < 1e-6


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("vocab_size", [None, 9])
def test_chunked_equals_dense_with_gradients(divergence, vocab_size):
    gen = torch.Generator().manual_seed(1)
    n, hs, ht, v = 6, 5, 8, 10
    h_s = torch.randn(n, hs, generator=gen, requires_grad=True)
    w_s = torch.randn(v, hs, generator=gen, requires_grad=True)
    h_t = torch.randn(n, ht, generator=gen)
    w_t = torch.randn(v, ht, generator=gen)
    kwargs = dict(divergence=divergence, beta=0.3, temperature=1.5, vocab_size=vocab_size)
    kwargs.update(student_logit_scale=0.7, teacher_softcap=3.0)
    chunked, ent_c = chunked_divergence(h_s, w_s, h_t, w_t, **kwargs)
    g_h, g_w = torch.autograd.grad(chunked.sum(), (h_s, w_s))
    dense, ent_d = dense_divergence_from_hidden(h_s, w_s, h_t, w_t, **kwargs)
    d_h, d_w = torch.autograd.grad(dense.sum(), (h_s, w_s))
    torch.testing.assert_close(chunked, dense, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ent_c, ent_d, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_h, d_h, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_w, d_w, atol=1e-5, rtol=1e-4)
    if vocab_size is not None:  # the extra student row (a mask token the teacher lacks) gets no gradient
        assert g_w[vocab_size:].abs().max() == 0
        # ... and equals the divergence of the logits restricted to the common vocabulary, computed by hand
        s_logits = (h_s @ w_s[:vocab_size].T).detach() * 0.7
        t_logits = 3.0 * torch.tanh((h_t @ w_t[:vocab_size].T) / 3.0)
        beta = 0.3 if divergence == "jsd" else 0.5
        expected = _by_hand(s_logits, t_logits, divergence, beta, temperature=1.5)
        torch.testing.assert_close(chunked.detach(), expected, atol=1e-5, rtol=1e-4)


def test_head_size_mismatch_needs_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_divergence(torch.randn(2, 3), torch.randn(5, 3), torch.randn(2, 3), torch.randn(4, 3))


def test_empty_selection_gives_zero_with_graph():
    h = torch.randn(0, 3, requires_grad=True)
    div, ent = chunked_divergence(h, torch.randn(5, 3), torch.randn(0, 3), torch.randn(5, 3))
    assert div.shape == (0,) and ent.shape == (0,)


def test_opdlm_loss_reduction_by_hand():
    per_token = torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0, 8.0])
    rows = torch.tensor([0, 0, 2, 2, 2, 3])
    loss, means = opdlm_loss(per_token, rows, num_rows=4)
    # Row means: (1+3)/2 = 2, row 1 has no loss position (0, not counted), (2+4+6)/3 = 4, 8.
    assert means.tolist() == [2.0, 0.0, 4.0, 8.0]
    assert loss.item() == pytest.approx((2 + 4 + 8) / 3)
    loss, _ = opdlm_loss(per_token, rows, num_rows=4, denominator=torch.tensor(7))
    assert loss.item() == pytest.approx(14 / 7)
    loss, _ = opdlm_loss(torch.zeros(0), torch.zeros(0, dtype=torch.long), num_rows=3)
    assert loss.item() == 0.0


def test_divergence_beta_and_logit_postprocessing():
    assert divergence_beta("forward_kl") == 0.0
    assert divergence_beta("reverse_kl") == 1.0
    assert divergence_beta("jsd", 0.25) == 0.25
    with pytest.raises(ValueError, match="jsd"):
        divergence_beta("jsd", 1.0)
    with pytest.raises(ValueError, match="Unknown divergence"):
        divergence_beta("tvd")
    model = make_model("gemma", vocab_size=16, final_logit_softcapping=30.0)
    assert logit_postprocessing(model.config) == (1.0, 30.0)
    assert logit_postprocessing(make_model("qwen3", vocab_size=16).config) == (1.0, None)
