"""Sampler benchmark: tokens per forward, cached vs uncached, and HF autoregressive generate vs our sampler.

Everything is measured side by side in one run on the same model, prompts and batch; only ratios are meaningful
(this machine is shared and noisy). Each timing is the median of `--repeats` interleaved runs.

    python benchmarks/sampler_bench.py                       # random tiny model (4 layers, hidden 256)
    python benchmarks/sampler_bench.py --model demo-OPDLM --batch_size 64   # the demo student on held-out prompts
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from opdlm_trl import causal_attention, convert_to_dlm, diffusion_generate
from opdlm_trl.testing import make_model, make_tokenizer


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _bench_random(args) -> list[tuple[str, str]]:
    """Random tiny model, fixed-length generation (no EOS): the sampler's mechanics at `--new_tokens`."""
    tok = make_tokenizer()
    model = make_model(
        "qwen3", vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, max_position_embeddings=1024
    )
    model, tok = convert_to_dlm(model, tok, block_size=4)
    prompts = ["the quick brown fox", "12 + 7 =", "hello world", "sort 5 3 9 1 ="]
    enc = tok((prompts * args.batch_size)[: args.batch_size], return_tensors="pt", padding=True)
    n, block, rows = args.new_tokens, model.config.dlm_block_size, []
    no_eos = dict(eos_token_id=[])  # fixed length: every row generates exactly n tokens
    for name, kw in [("static", {}), ("threshold 0.9", {"threshold": 0.9}), ("threshold 0.8", {"threshold": 0.8})]:
        out = diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=64, **kw)
        rows.append((f"tokens/forward, {name}", f"{out.tokens_per_forward:.2f}"))

    def cached():
        return diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=n, use_cache=True, **no_eos)

    def uncached():
        return diffusion_generate(
            model, enc.input_ids, enc.attention_mask, max_new_tokens=n, use_cache=False, **no_eos
        )

    t_cached, a = _timed(cached, args.repeats)
    t_uncached, b = _timed(uncached, args.repeats)
    assert torch.equal(a.sequences, b.sequences), "cached and uncached greedy outputs differ"
    rows.append((f"uncached / cached wall-clock, {n} tokens (goal >= 3x)", f"{t_uncached / t_cached:.2f}x"))

    def hf_ar():
        with causal_attention(model):
            return type(model).generate(
                model, **enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
            )

    t_ar, _ = _timed(hf_ar, args.repeats)
    # Matched tokens per forward: static decoding with k = 1, 2, 4 tokens per step.
    for steps in (block, block // 2, 1):

        def ours(steps=steps):
            return diffusion_generate(
                model, enc.input_ids, enc.attention_mask, max_new_tokens=n, steps_per_block=steps, **no_eos
            )

        t_ours, out = _timed(ours, args.repeats)
        rows.append(
            (f"HF AR generate / ours, static {out.tokens_per_forward:.0f} tokens/forward", f"{t_ar / t_ours:.2f}x")
        )
    return rows


def _bench_model(args) -> list[tuple[str, str]]:
    """A converted model folder on the demo task's held-out prompts, EOS honoured (real use)."""
    from opdlm_trl.demo import MAX_NEW_TOKENS, exact_match, extract_answer, make_splits
    from opdlm_trl.hub import load_dlm

    model, tok = load_dlm(args.model)
    model.eval()
    test = make_splits()["test"].select(range(args.batch_size))
    prompts, refs = list(test["prompt"]), list(test["completion"])
    enc = tok(prompts, return_tensors="pt", padding=True)
    n, rows = MAX_NEW_TOKENS, []

    def accuracy(sequences) -> float:
        texts = tok.batch_decode(sequences[:, enc.input_ids.size(1) :], skip_special_tokens=False)
        return exact_match([extract_answer(t, tok.eos_token) for t in texts], refs)

    def ar():
        with causal_attention(model):
            return type(model).generate(model, **enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)

    t_ar, _ = _timed(ar, args.repeats)
    for name, kw in [("static", {}), ("threshold 0.9", {"threshold": 0.9}), ("threshold 0.8", {"threshold": 0.8})]:

        def ours(kw=kw):
            return diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=n, **kw)

        t_ours, out = _timed(ours, args.repeats)
        rows.append((f"{name}: tokens/forward", f"{out.tokens_per_forward:.2f}"))
        rows.append((f"{name}: exact match", f"{accuracy(out.sequences):.3f}"))
        rows.append((f"{name}: HF AR generate (same weights, causal) / ours wall-clock", f"{t_ar / t_ours:.2f}x"))
    uncached = diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=n, use_cache=False)
    cached = diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=n)
    assert torch.equal(cached.sequences, uncached.sequences), "cached and uncached greedy outputs differ"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Converted model folder (demo task); default: random model.")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = _bench_model(args) if args.model else _bench_random(args)
    what = args.model or f"random Qwen3 (4 layers, hidden 256), {args.new_tokens} new tokens, no EOS"
    print(f"\nmodel: {what}; batch {args.batch_size}; {args.threads} thread(s); median of {args.repeats} runs")
    print("\n| measurement | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
