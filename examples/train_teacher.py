"""Trains the small autoregressive teacher of the demo task (sorting integers) on CPU and ships it.

Builds the word-level tokenizer and a small Llama-style decoder from a config, trains it with a plain torch loop on
the train split of `opdlm_trl.demo.task.make_splits` (loss on completion tokens + EOS only), evaluates greedy AR exact
match (plain `model.generate`) on the held-out split and saves model + tokenizer to `opdlm_trl/demo/teacher/`.

    HF_HUB_OFFLINE=1 python examples/train_teacher.py

Deterministic for a given seed and thread count. About 0.1 s per step on 2 idle CPU cores (1500 steps: under 3
minutes in all); much slower when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import datasets
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, get_cosine_schedule_with_warmup


try:
    import opdlm_trl  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opdlm_trl.demo.task import (
    MAX_LEN,
    MAX_VALUE,
    MIN_LEN,
    TEACHER_PATH,
    build_tokenizer,
    evaluate_ar,
    load_teacher,
    make_splits,
    tokenize_example,
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=TEACHER_PATH)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model initialisation and data order.")
    parser.add_argument("--data-seed", type=int, default=0, help="Seed of `make_splits` (keep 0: the fixed splits).")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=3)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--eval-size", type=int, default=None, help="Held-out examples to evaluate (default: all).")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--no-save", action="store_true")
    return parser.parse_args()


def build_model(tokenizer, hidden_size: int, num_layers: int, num_heads: int):
    # Llama-style. (Not "qwen2": transformers maps that model type to `Qwen2Tokenizer`, so `AutoTokenizer` would
    # rebuild our word-level tokenizer as a byte-level BPE.)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=256,
        rope_theta=10_000.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def collate(rows, pad_token_id: int):
    """Right-pads a list of `tokenize_example` rows into a training batch."""
    length = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def main():
    args = parse_args()
    datasets.disable_progress_bars()
    start = time.time()
    load_start = os.getloadavg()[0]
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    splits = make_splits(args.data_seed)
    tokenizer = build_tokenizer()
    train = splits["train"].map(
        lambda ex: tokenize_example(ex["prompt"], ex["completion"], tokenizer), remove_columns=["prompt", "completion"]
    )
    train_rows = train.to_list()
    # The held-out split is only ever used for evaluation.
    test = splits["test"] if args.eval_size is None else splits["test"].select(range(args.eval_size))

    model = build_model(tokenizer, args.hidden_size, args.num_layers, args.num_heads)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"train={len(splits['train'])} test={len(splits['test'])} params={num_params:,}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)

    order_rng = random.Random(args.seed)
    order: list[int] = []
    model.train()
    train_start = time.time()
    running = 0.0
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:
            epoch_order = list(range(len(train_rows)))
            order_rng.shuffle(epoch_order)
            order.extend(epoch_order)
        batch_idx, order = order[: args.batch_size], order[args.batch_size :]
        batch = collate([train_rows[i] for i in batch_idx], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if step % args.log_every == 0 or step == args.steps:
            n = args.log_every if step % args.log_every == 0 else step % args.log_every
            print(
                f"step {step}/{args.steps} loss {running / n:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                f"elapsed {time.time() - train_start:.0f}s",
                flush=True,
            )
            running = 0.0
    train_time = time.time() - train_start

    model.eval()
    model.generation_config = GenerationConfig(
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    size_mb = float("nan")
    if not args.no_save:
        os.makedirs(args.output_dir, exist_ok=True)
        model.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        size_mb = os.path.getsize(os.path.join(args.output_dir, "model.safetensors")) / 2**20
        # Evaluate what was shipped: reload model and tokenizer from disk with the Auto classes.
        model, loaded_tokenizer = load_teacher(args.output_dir)
        probe = splits["test"][0]["prompt"] + " " + splits["test"][0]["completion"]
        assert loaded_tokenizer(probe)["input_ids"] == tokenizer(probe)["input_ids"], "tokenizer did not round-trip"
        tokenizer = loaded_tokenizer

    eval_start = time.time()
    result = evaluate_ar(model, tokenizer, test)
    eval_time = time.time() - eval_start
    total_time = time.time() - start

    if not args.no_save:
        summary = {
            "task": f"sort {MIN_LEN}-{MAX_LEN} distinct integers in 0..{MAX_VALUE}",
            "train_examples": len(splits["train"]),
            "test_examples": len(splits["test"]),
            "evaluated_examples": len(test),
            "params": num_params,
            "heldout_exact_match_greedy_ar": result["exact_match"],
            "train_wall_time_s": round(train_time, 1),
            "total_wall_time_s": round(total_time, 1),
            "torch_num_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1min_at_start_and_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
            "args": vars(args) | {"output_dir": None},
        }
        with open(os.path.join(args.output_dir, "training_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)

    print(
        f"params={num_params:,} size={size_mb:.2f}MB train_time={train_time:.1f}s eval_time={eval_time:.1f}s "
        f"total_time={total_time:.1f}s threads={torch.get_num_threads()} "
        f"load_avg_start_end={load_start:.2f}/{os.getloadavg()[0]:.2f} "
        f"heldout_exact_match={result['exact_match']:.4f} (verified={result['verified']:.4f}, n={len(test)})",
        flush=True,
    )
    if not math.isfinite(result["exact_match"]) or result["exact_match"] < 0.95:
        print("WARNING: held-out exact match below the 0.95 bar", flush=True)


if __name__ == "__main__":
    main()
