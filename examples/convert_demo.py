"""The main job: convert an autoregressive LM into a block-diffusion LM with `OPDLMTrainer`, on CPU, and measure it.

By default it converts the small AR teacher shipped in `opdlm_trl/demo/teacher` (sorting lists of integers, 100%
held-out accuracy with greedy AR decoding) using the task's training prompts, then prints, on the held-out prompts:
teacher accuracy (AR, greedy), student accuracy (diffusion, greedy, static and dynamic threshold 0.9), tokens per
forward, and the training tokens used; the converted model is saved to `--output_dir`.

The code path is the one a user runs on a real model; only the defaults differ:

    python examples/convert_demo.py                                   # the shipped teacher, CPU, a few minutes
    python examples/convert_demo.py --model_name_or_path Qwen/Qwen3-0.6B \\
        --dataset_name trl-lib/ultrafeedback-prompt --max_completion_length 256 --no_eval --bf16

With `--dataset_name`, the dataset needs a `prompt` column (and a `completion` column for the accuracy figures).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="AR model to convert (default: the shipped teacher).")
    p.add_argument("--dataset_name", default=None, help="Hub id or local path of a prompt dataset (default: demo).")
    p.add_argument("--output_dir", default="out/opdlm-demo", help="Where the converted model is saved.")
    p.add_argument("--max_steps", type=int, default=120, help="Optimizer steps.")
    p.add_argument("--per_device_train_batch_size", type=int, default=16, help="Prompts per rollout.")
    p.add_argument("--learning_rate", type=float, default=3e-4, help="Peak learning rate (cosine decay).")
    p.add_argument("--max_completion_length", type=int, default=None, help="Rollout length (default: the task's).")
    p.add_argument("--eval_size", type=int, default=200, help="Held-out prompts used for the accuracy figures.")
    p.add_argument("--no_eval", action="store_true", help="Skip the accuracy figures.")
    p.add_argument("--bf16", action="store_true", help="Train in bf16 (GPU).")
    p.add_argument("--seed", type=int, default=0, help="Seed.")
    return p.parse_args()


def main() -> None:
    args = _parse()
    os.environ.setdefault("HF_HUB_OFFLINE", "0" if args.model_name_or_path or args.dataset_name else "1")
    from opdlm_trl import OPDLMConfig, OPDLMTrainer, diffusion_generate
    from opdlm_trl.demo import MAX_NEW_TOKENS, exact_match, extract_answer, generate_ar, load_teacher, make_splits
    from opdlm_trl.hub import save_dlm

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.model_name_or_path is None:
        model, tokenizer = load_teacher()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, padding_side="left")
    if args.dataset_name is None:
        splits = make_splits()
        train, test = splits["train"].remove_columns("completion"), splits["test"]
    else:
        from datasets import load_dataset

        data = load_dataset(args.dataset_name)
        train = data["train"]
        test = data["test"] if "test" in data else None
    max_new = args.max_completion_length or MAX_NEW_TOKENS
    evaluate = not args.no_eval and test is not None and "completion" in test.column_names
    if evaluate:
        test = test.select(range(min(args.eval_size, len(test))))
        prompts, refs = list(test["prompt"]), list(test["completion"])
        teacher_preds = generate_ar(model, tokenizer, prompts, max_new_tokens=max_new)
        teacher_acc = exact_match([extract_answer(t, tokenizer.eos_token) for t in teacher_preds], refs)

    config = OPDLMConfig(
        output_dir=args.output_dir,
        block_size=4,
        steps_per_block=4,
        threshold=0.9,
        temperature=1.0,
        max_completion_length=max_new,
        max_prompt_length=64 if args.dataset_name is None else 512,
        per_device_train_batch_size=args.per_device_train_batch_size,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=5,
        max_grad_norm=1.0,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    trainer = OPDLMTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    start = time.time()
    trainer.train()
    train_time = time.time() - start
    student = trainer.model
    save_dlm(student, tokenizer, args.output_dir, training_tokens=trainer.state.num_input_tokens_seen)

    print("\n=== OPDLM conversion ===")
    print(f"training steps: {trainer.state.global_step}, wall time {train_time:.0f}s")
    print(
        f"training tokens (prompt + completion of every row used in an update): {trainer.state.num_input_tokens_seen}"
    )
    if evaluate:
        student.eval()
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(student.device)
        print(f"teacher (AR, greedy) exact match:              {teacher_acc:.3f}")
        for name, threshold in [("static", None), ("threshold 0.9", 0.9)]:
            out = diffusion_generate(
                student, enc.input_ids, enc.attention_mask, max_new_tokens=max_new, threshold=threshold
            )
            texts = tokenizer.batch_decode(out.sequences[:, enc.input_ids.size(1) :], skip_special_tokens=False)
            acc = exact_match([extract_answer(t, tokenizer.eos_token) for t in texts], refs)
            print(
                f"student (diffusion, greedy, {name:>13}) exact match: {acc:.3f}, tokens/forward {out.tokens_per_forward:.2f}"
            )
    print(f"converted model saved to {args.output_dir}")


if __name__ == "__main__":
    main()
