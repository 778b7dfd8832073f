"""Chunked-loss benchmark: peak memory of OPDLM's loss (forward + backward) with a large vocabulary.

A tiny Qwen3 (hidden 64, 2 layers) with a 151,936-token vocabulary (Qwen3's), so that the logits dominate memory, one
fixed batch of training rows (prompt 32 + completion 64 tokens, b = 4, about half of the completion masked), and these
ways to compute the same loss, forward and backward, each in its own fresh subprocess:

- `chunked` (the trainer's full-vocabulary path): backbone hidden states at the loss positions only, projected to the
  vocabulary tile by tile inside TRL's `ChunkedDivergenceFunction`; neither model's `[N, V]` logits ever exist.
- `unchunked` (the reference): full logits for both models, as a plain implementation gets them from
  `model(...).logits` (student `[B, L0 + 2 L1, V]`, teacher `[B, L0 + L1, V]`), then the divergence at the loss
  positions.
- `dense at loss positions` (the former `teacher_top_k` path): `[N, V]` logits of both models at the loss positions.
- `chunked top-k` (the trainer's `teacher_top_k` path, `chunked_dense_divergence`): the same, a chunk of positions at
  a time, in the forward and in the backward (`--dense_chunk_elements`: the library's chunk is ~220 positions at this
  vocabulary, sized for training batches of ~10^4 loss positions; this batch has ~250, so the benchmark uses 27).

Memory is the peak resident memory (RSS) of the worker process as a delta: the RSS is read after the model, the
trainer and the batch exist, the kernel's peak-RSS counter is reset (`echo 5 > /proc/self/clear_refs`), the loss and
its backward run, and the delta is `VmHWM - baseline`. Workers run with `MALLOC_MMAP_THRESHOLD_=131072
MALLOC_TRIM_THRESHOLD_=0` so that freed tensors leave the RSS at once (as in `benchmarks/trainer_bench.py`); torch's
own memory profiler does not see CPU allocations and tracemalloc does not see torch's. Each worker also saves its loss
and the gradients of the student's LM head, input embeddings and first attention projection; the table compares them
with the unchunked reference (full vocabulary) or the dense one (top-k).

    HF_HUB_OFFLINE=1 python benchmarks/chunked_loss_bench.py          # about a minute on 2 CPU cores, ~6 GB RAM

Not a test: it prints a markdown table. Goal: chunked / unchunked peak memory <= 0.3, same loss within 1e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from memory import peak_kb, reset_peak, rss_kb  # benchmarks/memory.py (the script's folder is on sys.path)


VARIANTS = ("chunked", "unchunked", "dense_topk", "chunked_topk")


def _batch(opts, tokenizer, mask_token_id, block_size):
    """A fixed batch of rollout outputs: left-padded prompts, completions (one row stops at an EOS), noise masks."""
    import torch

    from opdlm_trl.rows import loss_mask

    gen = torch.Generator().manual_seed(0)
    batch, l0, l1 = opts.batch_size, opts.prompt_length, opts.completion_length
    low, high = 3, len(tokenizer)  # ordinary characters of the test tokenizer
    high = min(high, mask_token_id) if mask_token_id > low else high
    prompt_ids = torch.full((batch, l0), tokenizer.pad_token_id)
    prompt_mask = torch.zeros(batch, l0, dtype=torch.long)
    for r in range(batch):
        n = l0 - (r % 4) * 3
        prompt_ids[r, l0 - n :] = torch.randint(low, high, (n,), generator=gen)
        prompt_mask[r, l0 - n :] = 1
    completion_ids = torch.randint(low, high, (batch, l1), generator=gen)
    completion_mask = torch.ones(batch, l1, dtype=torch.long)
    completion_ids[0, l1 // 2] = tokenizer.eos_token_id  # one row ends early
    completion_ids[0, l1 // 2 + 1 :] = tokenizer.pad_token_id
    completion_mask[0, l1 // 2 + 1 :] = 0
    noise = torch.rand(batch, l1, generator=gen) < opts.masked_fraction
    positions = loss_mask(noise, completion_ids, completion_mask, [tokenizer.eos_token_id], True)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "noise_mask": noise,
        "loss_mask": positions,
        "num_loss_rows": positions.any(-1).sum(),
    }


def _full_logits_loss(trainer, inputs):
    """The loss from `model(...).logits` of both models (all positions, all tokens), then the divergence."""
    import torch

    from opdlm_trl.attention import causal_attention, position_ids_from_mask
    from opdlm_trl.losses import dense_divergence, opdlm_loss
    from opdlm_trl.rows import build_training_rows, pad_to_block_multiple

    args = trainer.args
    student, teacher = trainer.model, trainer.teacher_model
    rows = build_training_rows(
        inputs["prompt_ids"],
        inputs["prompt_mask"],
        inputs["completion_ids"],
        inputs["completion_mask"],
        inputs["noise_mask"],
        trainer.mask_token_id,
        args.block_size,
        trainer.processing_class.pad_token_id,
    )
    mask4d = rows.attention_mask(student)
    s_logits = student(input_ids=rows.input_ids, attention_mask=mask4d, position_ids=rows.position_ids).logits
    x0 = rows.input_ids[:, rows.prompt_length : rows.noisy_slice.start]
    mask = torch.cat([inputs["prompt_mask"], rows.valid[:, rows.prompt_length : rows.noisy_slice.start].long()], 1)
    ids = torch.cat([inputs["prompt_ids"], x0], 1).masked_fill(mask == 0, trainer.processing_class.pad_token_id)
    with causal_attention(teacher), torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    start = rows.prompt_length - 1
    positions = pad_to_block_multiple(inputs["loss_mask"], args.block_size, False)
    row_index, col_index = positions.nonzero(as_tuple=True)
    per_token = dense_divergence(
        s_logits[:, rows.noisy_slice][row_index, col_index],
        t_logits[:, start : start + x0.shape[1]][row_index, col_index],
        args.divergence,
        args.beta,
        args.loss_temperature,
        args.teacher_top_k,
    )
    denominator = inputs["num_loss_rows"].float().clamp(min=1.0)
    return opdlm_loss(per_token, row_index, rows.input_ids.shape[0], denominator)[0], int(row_index.numel())


def worker(variant: str, opts) -> dict:
    import torch
    from datasets import Dataset

    import opdlm_trl.trainer as trainer_module
    from opdlm_trl import losses
    from opdlm_trl.config import OPDLMConfig
    from opdlm_trl.losses import dense_divergence_from_hidden
    from opdlm_trl.testing import make_model, make_tokenizer

    torch.set_num_threads(opts.threads)
    tok = make_tokenizer()
    model = make_model(
        "qwen3",
        vocab_size=opts.vocab_size,
        hidden_size=opts.hidden,
        num_hidden_layers=2,
        head_dim=32,
        num_attention_heads=2,
        num_key_value_heads=1,
    ).train()
    top_k = opts.top_k if variant in ("dense_topk", "chunked_topk") else None
    args = OPDLMConfig(
        output_dir=os.path.join(opts.tmp, "out"),
        per_device_train_batch_size=opts.batch_size,
        max_completion_length=opts.completion_length,
        max_prompt_length=opts.prompt_length,
        report_to="none",
        use_cpu=True,
        bf16=False,
        teacher_top_k=top_k,
        save_strategy="no",
    )
    trainer = trainer_module.OPDLMTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"prompt": ["a"]}), processing_class=tok
    )
    if variant == "dense_topk":  # the former top-k path: all [N, V] logits at the loss positions at once
        trainer_module.chunked_dense_divergence = dense_divergence_from_hidden
    losses.DENSE_CHUNK_ELEMENTS = opts.dense_chunk_elements
    inputs = _batch(opts, tok, trainer.mask_token_id, args.block_size)
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)

    baseline = rss_kb()
    reset_ok = reset_peak()
    if variant == "unchunked":
        loss, positions = _full_logits_loss(trainer, inputs)
    else:
        loss = trainer.compute_loss(trainer.model, inputs)
        positions = int(inputs["loss_mask"].sum())
    loss.backward()
    peak_mb = (peak_kb(reset_ok) - baseline) / 1024

    hf = trainer_module._unwrap_hf(trainer.model)
    grads = {
        "lm_head": hf.get_output_embeddings().weight.grad,
        "embed_tokens": hf.get_input_embeddings().weight.grad,
        "q_proj_0": hf.model.layers[0].self_attn.q_proj.weight.grad,
    }
    torch.save({k: v.detach().clone() for k, v in grads.items()}, os.path.join(opts.tmp, f"grads_{variant}.pt"))
    return {
        "variant": variant,
        "loss": loss.item(),
        "peak_mb": peak_mb,
        "peak_reset": reset_ok,
        "positions": positions,
        "rows": int(inputs["prompt_ids"].shape[0]),
        "params_m": sum(p.numel() for p in hf.parameters()) / 1e6,
    }


def _compare_grads(tmp: str, variant: str, reference: str) -> float:
    import torch

    a = torch.load(os.path.join(tmp, f"grads_{variant}.pt"))
    b = torch.load(os.path.join(tmp, f"grads_{reference}.pt"))
    worst = 0.0
    for name in b:
        scale = b[name].abs().max().clamp(min=1e-12)
        worst = max(worst, ((a[name] - b[name]).abs().max() / scale).item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab_size", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--completion_length", type=int, default=64)
    parser.add_argument("--masked_fraction", type=float, default=0.5)
    parser.add_argument("--top_k", type=int, default=16, help="teacher_top_k of the top-k variants (paper: 16).")
    parser.add_argument(
        "--dense_chunk_elements",
        type=int,
        default=1 << 22,
        help="`losses.DENSE_CHUNK_ELEMENTS` of the chunked top-k path (library default 2**25, i.e. ~220 positions per "
        "chunk at 152k tokens; training batches have ~10^4 loss positions). The default here, 2**22 (27 positions), "
        "gives this small batch a comparable number of chunks.",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()

    if opts.worker:
        print("RESULT " + json.dumps(worker(opts.worker, opts)), flush=True)
        return

    tmp = opts.tmp or tempfile.mkdtemp(prefix="opdlm_chunked_loss_")
    results = {}
    for variant in VARIANTS:
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS=str(opts.threads),
            MALLOC_MMAP_THRESHOLD_="131072",
            MALLOC_TRIM_THRESHOLD_="0",
        )
        argv = [a for a in sys.argv[1:] if not a.startswith("--tmp")]
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv, "--tmp", tmp, "--worker", variant],
            capture_output=True,
            text=True,
            env=env,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"worker {variant} failed (exit {proc.returncode})")
        results[variant] = json.loads(lines[-1][len("RESULT ") :])
        print(f"{variant}: {results[variant]}", file=sys.stderr)

    full, chunked = results["unchunked"], results["chunked"]
    dense_k, chunked_k = results["dense_topk"], results["chunked_topk"]
    print(
        f"\nModel: random Qwen3, hidden {opts.hidden}, 2 layers, vocabulary {opts.vocab_size:,} "
        f"({full['params_m']:.1f}M params); batch {full['rows']}, prompt {opts.prompt_length} + completion "
        f"{opts.completion_length} tokens (student row {opts.prompt_length + 2 * opts.completion_length}), "
        f"{full['positions']} loss positions; fp32, CPU, {opts.threads} threads. Peak RSS delta of loss forward + "
        "backward, one fresh process per row.\n"
    )
    print("| loss computation | peak memory (MB) | ratio | loss | max grad diff (rel.) |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| unchunked: full logits of both models (`model(...).logits`) | {full['peak_mb']:.0f} | 1.00 | "
        f"{full['loss']:.6f} | reference |"
    )
    print(
        f"| **chunked (TRL `ChunkedDivergenceFunction`, the trainer's path)** | **{chunked['peak_mb']:.0f}** | "
        f"**{chunked['peak_mb'] / full['peak_mb']:.3f}** (goal <= 0.3) | {chunked['loss']:.6f} "
        f"(diff {abs(chunked['loss'] - full['loss']):.1e}) | {_compare_grads(tmp, 'chunked', 'unchunked'):.1e} |"
    )
    print(
        f"| top-{opts.top_k}: dense at the loss positions (`[N, V]` for both; former path) | {dense_k['peak_mb']:.0f} | "
        f"1.00 | {dense_k['loss']:.6f} | reference |"
    )
    print(
        f"| **top-{opts.top_k}: chunked over positions (`chunked_dense_divergence`, the trainer's path; "
        f"{max(1, opts.dense_chunk_elements // opts.vocab_size)} positions per chunk)** | "
        f"**{chunked_k['peak_mb']:.0f}** | **{chunked_k['peak_mb'] / dense_k['peak_mb']:.3f}** | "
        f"{chunked_k['loss']:.6f} (diff {abs(chunked_k['loss'] - dense_k['loss']):.1e}) | "
        f"{_compare_grads(tmp, 'chunked_topk', 'dense_topk'):.1e} |"
    )
    if not all(r["peak_reset"] for r in results.values()):
        print("\n(peak RSS counter could not be reset: lifetime peaks were used)")


if __name__ == "__main__":
    main()
