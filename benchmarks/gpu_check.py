"""GPU check: sampler throughput, OPDLM training-step throughput and memory, sdpa vs flex attention on the training row.

Run by `benchmarks/gpu_check.sh` on one GPU (about 5 minutes on an H100, well under 10), or on CPU with tiny sizes:

    python benchmarks/gpu_check.py            # CUDA: a ~0.3B Qwen3 built from a config (random weights)
    python benchmarks/gpu_check.py --tiny     # CPU (or GPU): hidden 64, 2 layers; exercises every code path

Three parts, each printed as a markdown table (only ratios are meaningful on shared machines):

1. Sampler: tokens/s of HF autoregressive `generate` (same weights, causal attention, KV cache, greedy) and of the
   cached block-diffusion sampler at 1, 2 and 4 tokens per forward (static schedule, b = 4), fixed length (no EOS),
   for each block-mask kernel (sdpa with a boolean mask; flex attention with a `BlockMask`, CUDA only).
2. Training step: `OPDLMTrainer` (fp32 master weights, bf16 autocast, AdamW; rollouts b = 4, threshold 0.9,
   temperature 1) for each kernel: training tokens/s after a warm-up step, the rollout / teacher / update split, peak
   GPU memory (`torch.cuda.max_memory_allocated`) and dynamo recompilations (flex attention is compiled).
3. Attention: forward + backward time of one student forward on the training row `[prompt | x0 | x_t]` with the
   training mask, sdpa vs flex, at two row lengths, and whether both kernels agree (outputs and gradients).

The exit status is 1 if the kernels disagree or a part fails (the other parts still run and print).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import traceback


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _model(opts, tok, device, attn="sdpa"):
    import torch

    from opdlm_trl.testing import make_model

    if opts.tiny:
        sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
        sizes["intermediate_size"] = 128
    else:  # ~0.3B: Qwen3-0.6B's width and vocabulary, 12 layers
        sizes = dict(
            hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=8, head_dim=64
        )
        sizes["intermediate_size"] = 3072
    model = make_model(
        "qwen3",
        vocab_size=opts.vocab_size,
        attn_implementation=attn,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        **sizes,
    )
    return model.to(device=device, dtype=torch.float32)


def _kernels(device) -> list[str]:
    return ["sdpa", "flex_attention"] if device.type == "cuda" else ["sdpa"]


def _prompts(tok, batch: int, length: int, device, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (batch, length), generator=gen)  # ordinary characters of the test tokenizer
    mask = torch.ones(batch, length, dtype=torch.long)
    for r in range(1, batch, 2):  # left padding on every other row
        ids[r, : r % 7] = tok.pad_token_id
        mask[r, : r % 7] = 0
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Sampler
# ---------------------------------------------------------------------------------------------------------------------


def sampler_part(opts, device, rows):
    import torch

    from opdlm_trl import causal_attention, convert_to_dlm, diffusion_generate
    from opdlm_trl.testing import make_tokenizer

    n, batch = opts.new_tokens, opts.sampler_batch
    tok = make_tokenizer()
    base = _model(opts, tok, device).to(torch.bfloat16).eval()
    ids, mask = _prompts(tok, batch, opts.prompt_length, device)
    t_ar = None
    for kernel in _kernels(device):
        model, _ = convert_to_dlm(copy.deepcopy(base), make_tokenizer(), block_size=4, attn_implementation=kernel)

        def ours(steps, model=model):
            with torch.no_grad():
                return diffusion_generate(
                    model, ids, mask, max_new_tokens=n, steps_per_block=steps, eos_token_id=[], temperature=0.0
                )

        if t_ar is None:  # the baseline: HF autoregressive generate with sdpa (transformers' standard fast path)

            def hf_ar(model=model):
                with causal_attention(model), torch.no_grad():
                    return type(model).generate(
                        model,
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        pad_token_id=tok.pad_token_id,
                    )

            hf_ar()  # warm-up
            t_ar, _ = _timed(hf_ar, device, opts.repeats)
            rows.append((kernel, "HF AR `generate` (KV cache, greedy)", batch * n / t_ar, 1.0, 1.0))
        for steps in (4, 2, 1):
            ours(steps)  # warm-up (and compilation for flex attention)
            t, out = _timed(lambda steps=steps: ours(steps), device, opts.repeats)
            label = f"block diffusion, {4 // steps} token(s)/step"
            rows.append((kernel, label, batch * n / t, out.tokens_per_forward, t_ar / t))
        del model


# ---------------------------------------------------------------------------------------------------------------------
# 2. Training step
# ---------------------------------------------------------------------------------------------------------------------


def train_part(opts, device, rows):
    words = ["alpha", "beta", "gamma", "delta", "one two three", "x + y =", "sort 5 3 9 1 ="]
    text = " ".join(words * (opts.prompt_length // 4 + 2))
    prompts = [text[i % 17 : i % 17 + opts.prompt_length - (i % 5)] for i in range(64)]  # 1 character = 1 token
    for kernel in _kernels(device):
        rows.append(_train_kernel(opts, device, kernel, prompts))


def _train_kernel(opts, device, kernel, prompts) -> dict:
    import torch
    import torch._dynamo.utils as dynamo_utils
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from opdlm_trl import convert_to_dlm
    from opdlm_trl.config import OPDLMConfig
    from opdlm_trl.testing import make_tokenizer
    from opdlm_trl.trainer import OPDLMTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))
            if len(self.marks) == opts.warmup_steps and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

    tok = make_tokenizer()
    model = _model(opts, tok, device)
    convert_to_dlm(model, tok, block_size=4, attn_implementation=kernel)
    args = OPDLMConfig(
        output_dir="/tmp/opdlm_gpu_check",
        per_device_train_batch_size=opts.train_batch,
        max_steps=opts.train_steps,
        max_completion_length=opts.completion_length,
        max_prompt_length=opts.prompt_length,
        learning_rate=1e-5,
        bf16=device.type == "cuda",
        use_cpu=device.type != "cuda",
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        temperature=1.0,
        threshold=0.9,
    )
    clock = Clock()
    trainer = OPDLMTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)  # the table below has what matters
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dynamo_utils.counters.clear()
    trainer.train()
    (t0, n0), (t1, n1) = clock.marks[opts.warmup_steps - 1], clock.marks[-1]
    logs = [r for r in trainer.state.log_history if "loss" in r][opts.warmup_steps :]

    def mean(key):
        values = [r[key] for r in logs if key in r]
        return sum(values) / len(values) if values else float("nan")

    result = {
        "kernel": kernel,
        "params_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
        "tokens_per_s": (n1 - n0) / (t1 - t0),
        "split": (mean("time/rollout"), mean("time/teacher"), mean("time/update")),
        "tokens_per_forward": mean("rollout/tokens_per_forward"),
        "length": mean("completions/mean_length"),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
        "loss": [round(r["loss"], 4) for r in logs],
        "step_times": [round(b[0] - a[0], 2) for a, b in zip(clock.marks, clock.marks[1:])],
        "recompiles": int(dynamo_utils.counters["stats"].get("unique_graphs", 0)),
    }
    del trainer, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------------------------------
# 3. Attention: the training row, sdpa vs flex
# ---------------------------------------------------------------------------------------------------------------------


def attention_part(opts, device, rows) -> bool:
    from opdlm_trl import convert_to_dlm
    from opdlm_trl.testing import make_tokenizer

    tok = make_tokenizer()
    base = _model(opts, tok, device)
    models = {}
    for kernel in ("sdpa", "flex_attention"):
        model = copy.deepcopy(base)
        convert_to_dlm(model, make_tokenizer(), block_size=4, attn_implementation=kernel)
        models[kernel] = model.train()
    return all([_attention_size(opts, device, tok, models, l0, l1, rows) for l0, l1 in opts.row_sizes])


def _row_step(model, rows, batch, device, backward):
    import torch

    from opdlm_trl.attention import make_4d_mask

    total = rows.input_ids.shape[1]
    model.zero_grad(set_to_none=True)
    mask = make_4d_mask(model, rows.mask_function(), batch, total, total, device=device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else _null()
    with ctx, torch.set_grad_enabled(backward):
        hidden = model.model(
            input_ids=rows.input_ids, attention_mask=mask, position_ids=rows.position_ids, use_cache=False
        ).last_hidden_state
        out = hidden[:, rows.noisy_slice].float()
        if backward:
            out.square().mean().backward()
    return out.detach()


def _attention_size(opts, device, tok, models, l0, l1, table) -> bool:
    import torch

    from opdlm_trl.attention import make_4d_mask
    from opdlm_trl.rows import build_training_rows

    backward = device.type == "cuda"  # flex attention has no CPU backward
    batch = opts.train_batch
    prompt_ids, prompt_mask = _prompts(tok, batch, l0, device, seed=1)
    gen = torch.Generator().manual_seed(2)
    completion_ids = torch.randint(3, 40, (batch, l1), generator=gen).to(device)
    completion_mask = torch.ones(batch, l1, dtype=torch.long, device=device)
    completion_mask[0, l1 // 2 :] = 0  # one row stops early
    noise = (torch.rand(batch, l1, generator=gen) < 0.5).to(device)
    mask_id = models["sdpa"].config.mask_token_id
    rows = build_training_rows(
        prompt_ids, prompt_mask, completion_ids, completion_mask, noise, mask_id, 4, tok.pad_token_id
    )
    results = {}
    for kernel, model in models.items():
        _row_step(model, rows, batch, device, backward)  # warm-up / compile
        t, out = _timed(lambda model=model: _row_step(model, rows, batch, device, backward), device, opts.repeats)
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        fmt = type(make_4d_mask(model, rows.mask_function(), 1, 8, 8, device=device)).__name__
        results[kernel] = (t, out, grads, fmt)
    (t_s, out_s, g_s, fmt_s), (t_f, out_f, g_f, fmt_f) = results["sdpa"], results["flex_attention"]
    valid = rows.valid[:, rows.noisy_slice]
    out_diff = ((out_f - out_s)[valid].abs().max() / out_s[valid].abs().max()).item()
    grad_diff = float("nan")
    if g_s:
        grad_diff = max(((g_f[n] - g_s[n]).abs().max() / g_s[n].abs().max().clamp(min=1e-12)).item() for n in g_s)
    tolerance = 5e-2 if device.type == "cuda" else 1e-4  # bf16 autocast on CUDA
    agree = out_diff < tolerance and (not g_s or grad_diff < 10 * tolerance)
    table.append(
        (
            f"B={batch}, L0={l0}, L1={l1} (row {rows.input_ids.shape[1]})",
            t_s,
            t_f,
            t_s / t_f,
            f"{fmt_s} / {fmt_f}",
            out_diff,
            grad_diff,
            "yes" if agree else "**NO**",
        )
    )
    return agree


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny sizes (CPU smoke run of every code path).")
    parser.add_argument("--parts", default="sampler,train,attention")
    parser.add_argument("--repeats", type=int, default=None)
    opts = parser.parse_args()

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not opts.tiny:
        raise SystemExit("No CUDA device: run with --tiny for the CPU smoke run.")
    torch.manual_seed(0)
    if opts.tiny:
        opts.vocab_size, opts.prompt_length, opts.new_tokens, opts.sampler_batch = 151936, 16, 16, 2
        opts.train_batch, opts.completion_length, opts.train_steps, opts.warmup_steps = 2, 8, 3, 1
        opts.row_sizes = [(16, 16)]  # (inductor's CPU flex kernel fails to compile some other shapes in torch 2.13)
        opts.repeats = opts.repeats or 1
        torch.set_num_threads(2)
    else:
        opts.vocab_size, opts.prompt_length, opts.new_tokens, opts.sampler_batch = 151936, 64, 256, 8
        opts.train_batch, opts.completion_length, opts.train_steps, opts.warmup_steps = 8, 256, 5, 2
        opts.row_sizes = [(64, 256), (128, 1024)]
        opts.repeats = opts.repeats or 2
    parts = set(opts.parts.split(","))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; {'tiny' if opts.tiny else 'full'} sizes\n", flush=True)
    ok = True
    started = time.perf_counter()

    def run(part, fn, *args):
        nonlocal ok
        t0 = time.perf_counter()
        try:
            result = fn(*args)
            if result is False:
                ok = False
        except Exception:  # noqa: BLE001 - report and go on with the other parts
            ok = False
            print(f"**{part} failed:**\n```\n{traceback.format_exc()[-4000:]}```", flush=True)
        print(f"({part}: {time.perf_counter() - t0:.0f} s)\n", flush=True)

    if "sampler" in parts:
        rows = []
        run("sampler", sampler_part, opts, device, rows)
        print(
            f"Sampler: batch {opts.sampler_batch}, prompt {opts.prompt_length}, {opts.new_tokens} new tokens (fixed "
            f"length), bf16, median of {opts.repeats}.\n"
        )
        print("| kernel | decoder | tokens/s | tokens/forward | speed-up vs HF AR |\n| --- | --- | --- | --- | --- |")
        for kernel, label, tps, tpf, speedup in rows:
            print(f"| {kernel} | {label} | {tps:.0f} | {tpf:.2f} | {speedup:.2f}x |")
        print(flush=True)
    if "train" in parts:
        rows = []
        run("train", train_part, opts, device, rows)
        if rows:
            print(
                f"OPDLM training step: {rows[0]['params_m']:.0f}M-parameter Qwen3 (random), batch "
                f"{opts.train_batch}, prompt <= {opts.prompt_length}, completion {opts.completion_length}; "
                f"{opts.train_steps} steps, {opts.warmup_steps} warm-up; self-teacher (frozen copy).\n"
            )
            print(
                "| kernel | training tokens/s | rollout / teacher / update (s) | tokens/forward | mean length | "
                "peak GPU memory (GiB) | step times (s) | dynamo graphs | losses |"
            )
            print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for r in rows:
                split = " / ".join(f"{x:.2f}" for x in r["split"])
                print(
                    f"| {r['kernel']} | {r['tokens_per_s']:.0f} | {split} | {r['tokens_per_forward']:.2f} | "
                    f"{r['length']:.0f} | {r['peak_gib']:.2f} | {r['step_times']} | {r['recompiles']} | {r['loss']} |"
                )
            if any(not all(math.isfinite(x) for x in r["loss"]) for r in rows):
                ok = False
            print(flush=True)
    if "attention" in parts:
        rows = []
        run("attention", attention_part, opts, device, rows)
        what = "forward + backward" if device.type == "cuda" else "forward only (no flex backward on CPU)"
        print(f"Training-row student forward, sdpa vs flex attention: {what}, median of {opts.repeats}.\n")
        print(
            "| row | sdpa (s) | flex (s) | sdpa / flex | mask formats | max output diff (rel.) | max grad diff (rel.) "
            "| agree |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
        )
        for label, t_s, t_f, ratio, fmt, out_diff, grad_diff, agree in rows:
            print(
                f"| {label} | {t_s:.4f} | {t_f:.4f} | {ratio:.2f}x | {fmt} | {out_diff:.1e} | {grad_diff:.1e} | "
                f"{agree} |"
            )
        print(flush=True)
    print(f"total: {time.perf_counter() - started:.0f} s; {'OK' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
