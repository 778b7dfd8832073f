"""Trainer benchmark: OPDLM throughput against TRL's autoregressive on-policy distillation, and teacher memory.

Two measurements, each configuration in its own fresh subprocess (so neither memory nor warm caches leak between them),
on the same model, prompts, batch and completion length:

1. Throughput. Training tokens per second (prompt + completion tokens of the rows used in updates, as counted in
   `trainer.state.num_input_tokens_seen` by both trainers) of `OPDLMTrainer` (diffusion rollouts, b=4, 4 steps per
   block, threshold 0.9, temperature 1; one student forward on [prompt | x0 | x_t]) and of `trl.DistillationTrainer`
   (autoregressive rollouts with `generate`, forward KL), both full fine-tuning with the same frozen teacher (a copy of
   the initial weights). Measured between the end of the warm-up steps and the end of the run. Goal: ratio >= 0.7.

2. Memory. Peak resident memory (RSS) of a LoRA run, as a delta: the process's RSS is read after imports and data set
   creation, the kernel's peak-RSS counter is then reset (`echo 5 > /proc/self/clear_refs`; where that is not allowed,
   the lifetime peak `ru_maxrss` is used), the model is built and trained, and the delta is `VmHWM - baseline`. So the
   delta covers the weights, the teacher, activations, optimizer state and allocator slack of the training itself.
   Compared: (a) LoRA student with no teacher at all (the teacher forward is replaced by zeros: the floor),
   (b) LoRA student with the default self-teacher (the same base weights with the adapter disabled), (c) LoRA student
   with a separate full-precision teacher copy. Goal: (b) / (a) <= 1.15; (c) / (a) is the contrast.
   RSS includes allocator slack, so the workers run with `MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=0`
   (tensors of 128 KB and more are mmapped and returned to the system when freed): identical runs then agree within
   1%, instead of +-15% with glibc's defaults. The memory runs use a wider model (`--memory_hidden 1024`, about 95M
   parameters, 0.38 GB in fp32) so that the weights are a large part of the peak.

    HF_HUB_OFFLINE=1 python benchmarks/trainer_bench.py                 # about 4 minutes on 2 CPU cores
    HF_HUB_OFFLINE=1 python benchmarks/trainer_bench.py --model PATH    # a causal LM folder with its tokenizer
    HF_HUB_OFFLINE=1 python benchmarks/trainer_bench.py --demo --completion_length 17 --skip_memory
                                                       # the shipped (trained) demo teacher on its sorting prompts

Not a test: it prints a markdown table. Only the ratios are meaningful (timings on shared machines are noisy).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

from memory import peak_kb, reset_peak, rss_kb  # benchmarks/memory.py (the script's folder is on sys.path)


PROMPTS = [
    "what is 2+2?",
    "count: 1 2 3",
    "the quick brown fox",
    "hello world",
    "x*y=?",
    "sort 5 3 9 1 =",
    "7-3=",
    "one two three",
    "a, b, c.",
    "sum 4 5",
    "hi there",
    "zz top",
    "name a colour:",
    "12 + 7 =",
    "repeat: abc abc",
    "go on",
]


def _load(opts):
    import torch

    from opdlm_trl.testing import make_model, make_tokenizer

    if opts.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(opts.model, padding_side="left")
        return AutoModelForCausalLM.from_pretrained(opts.model, attn_implementation="sdpa"), tok
    tok = make_tokenizer()
    model = make_model(
        "qwen3",
        vocab_size=len(tok),
        hidden_size=opts.hidden,
        num_hidden_layers=opts.layers,
        num_attention_heads=max(opts.hidden // 64, 2),
        num_key_value_heads=max(opts.hidden // 128, 1),
        head_dim=64,
        intermediate_size=4 * opts.hidden,
        max_position_embeddings=1024,
    )
    if opts.head_scale != 1.0:  # sharper next-token distributions: a stand-in for a trained (confident) model
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(opts.head_scale)
    return model.train(), tok


def _args(opts, config_cls, **overrides):
    import torch

    kwargs = dict(
        output_dir=os.path.join(opts.tmp, "out"),
        per_device_train_batch_size=opts.batch_size,
        max_steps=opts.steps,
        max_completion_length=opts.completion_length,
        learning_rate=1e-5,
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
        temperature=1.0,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def worker(name: str, opts) -> dict:
    """Runs one configuration in this process and returns its measurements."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    torch.set_num_threads(opts.threads)
    prompts = PROMPTS
    if opts.demo:
        from opdlm_trl.demo.task import make_splits

        prompts = list(make_splits(num_train=512, num_test=8)["train"]["prompt"])
    dataset = Dataset.from_dict({"prompt": (prompts * 64)[: opts.batch_size * (opts.steps + 1)]})
    baseline = rss_kb()
    reset_ok = reset_peak()

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    clock = Clock()
    model, tok = _load(opts)
    result = {"name": name}
    if name == "distill":
        from trl import DistillationConfig, DistillationTrainer

        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        args = _args(opts, DistillationConfig, beta=0.0)
        trainer = DistillationTrainer(
            model=model,
            teacher_model=teacher,
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            callbacks=[clock],
        )
    else:
        from peft import LoraConfig

        from opdlm_trl.config import OPDLMConfig
        from opdlm_trl.trainer import OPDLMTrainer

        peft_config = None
        teacher = None
        if name.startswith("lora"):
            peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        if name == "lora_teacher_copy":
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
        args = _args(opts, OPDLMConfig, max_prompt_length=64)
        trainer = OPDLMTrainer(
            model=model,
            teacher_model=teacher,
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[clock],
        )
        if name == "lora_no_teacher":

            def no_teacher(unwrapped_student, prompt_ids, prompt_mask, x0, completion_mask):
                hf = unwrapped_student.get_base_model()
                hidden = torch.zeros(*x0.shape, hf.config.hidden_size, device=x0.device)
                return hidden, hf

            trainer._teacher_hidden_states = no_teacher
    trainer.train()
    result["peak_delta_mb"] = (peak_kb(reset_ok) - baseline) / 1024
    result["peak_reset"] = reset_ok
    warm = min(opts.warmup, len(clock.marks) - 1)
    (t0, n0), (t1, n1) = clock.marks[max(warm - 1, 0)], clock.marks[-1]
    result["tokens_per_s"] = (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")
    result["tokens"] = n1
    logs = [r for r in trainer.state.log_history if "loss" in r]
    for key in (
        "time/rollout",
        "time/teacher",
        "time/update",
        "rollout/tokens_per_forward",
        "completions/mean_length",
    ):
        values = [r[key] for r in logs[warm:] if r.get(key) is not None]
        if values:
            result[key] = sum(values) / len(values)
    result["params_m"] = sum(p.numel() for p in trainer.model.parameters()) / 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="A causal LM folder (with tokenizer); default: random tiny.")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="The shipped demo teacher (opdlm_trl/demo/teacher, trained, confident) on the demo task's prompts.",
    )
    parser.add_argument("--skip_memory", action="store_true", help="Only the throughput comparison.")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument(
        "--head_scale",
        type=float,
        default=1.0,
        help="Multiply the random model's LM head (sharper distributions, more tokens per diffusion forward).",
    )
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument(
        "--memory_hidden",
        type=int,
        default=1024,
        help="Hidden size of the memory runs (wider, so that the weights dominate the peak).",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--completion_length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="Steps of a throughput run.")
    parser.add_argument("--memory_steps", type=int, default=3, help="Steps of a memory run.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="Interleaved throughput runs per trainer (median).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription).")
    parser.add_argument("--tmp", default="/tmp/opdlm_trainer_bench")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.demo and not opts.model:
        from opdlm_trl.demo.task import TEACHER_PATH

        opts.model = TEACHER_PATH

    if opts.worker:
        print("RESULT " + json.dumps(worker(opts.worker, opts)), flush=True)
        return

    def run(name: str, steps: int, hidden: int, memory: bool = False) -> dict:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(opts.threads))
        if memory:
            # glibc: large blocks through mmap and no trimming delay, so freed tensors leave the RSS at once and the
            # peak RSS tracks live memory (without this, allocator slack makes peaks vary by +-15% between identical
            # runs). Not for the throughput runs: mmapping every tensor slows allocation down.
            env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
            env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
        argv = [*sys.argv[1:], "--worker", name, "--steps", str(steps), "--hidden", str(hidden)]
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True, env=env
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"worker {name} failed (exit {proc.returncode})")
        result = json.loads(lines[-1][len("RESULT ") :])
        print(f"{name}: {result}", file=sys.stderr)
        return result

    # Throughput: interleaved runs (the machine may be shared), median per trainer.
    runs = {"opdlm": [], "distill": []}
    for _ in range(opts.repeats):
        for name in runs:
            runs[name].append(run(name, opts.steps, opts.hidden))
    results = {name: sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2] for name, rs in runs.items()}
    if not opts.skip_memory:
        for name in ("lora_no_teacher", "lora_self_teacher", "lora_teacher_copy"):
            results[name] = run(name, opts.memory_steps, opts.memory_hidden, memory=True)

    opdlm, distill = results["opdlm"], results["distill"]
    ratio_tps = opdlm["tokens_per_s"] / distill["tokens_per_s"]
    model_desc = opts.model or (
        f"random Qwen3, hidden {opts.hidden}, {opts.layers} layers ({opdlm['params_m']:.1f}M params), LM head "
        f"x{8 * opts.head_scale:g}"
    )
    if not opts.skip_memory:
        model_desc += (
            f"; memory runs: hidden {opts.memory_hidden} ({results['lora_no_teacher']['params_m']:.1f}M params incl. "
            f"LoRA), {opts.memory_steps} steps"
        )
    print(
        f"\nModel: {model_desc}; batch {opts.batch_size}, completion <= {opts.completion_length} tokens; throughput: "
        f"median of {opts.repeats} interleaved runs of {opts.steps} steps ({opts.warmup} warm-up); "
        f"{opts.threads} torch thread(s); {'CUDA' if _cuda() else 'CPU'}.\n"
    )
    print("| measurement | value | goal |")
    print("| --- | --- | --- |")
    print(f"| OPDLMTrainer training tokens/s | {opdlm['tokens_per_s']:.1f} | |")
    print(f"| DistillationTrainer (AR, same teacher) training tokens/s | {distill['tokens_per_s']:.1f} | |")
    print(f"| **throughput ratio OPDLM / AR distillation** | **{ratio_tps:.2f}** | >= 0.7 |")
    print(
        f"| OPDLM step split rollout / teacher / update (s) | {opdlm.get('time/rollout', 0):.3f} / "
        f"{opdlm.get('time/teacher', 0):.3f} / {opdlm.get('time/update', 0):.3f} | |"
    )
    print(
        f"| OPDLM rollout tokens per forward, mean completion length | "
        f"{opdlm.get('rollout/tokens_per_forward', 0):.2f}, {opdlm.get('completions/mean_length', 0):.1f} | |"
    )
    if opts.skip_memory:
        return
    floor = results["lora_no_teacher"]["peak_delta_mb"]
    ratio_self = results["lora_self_teacher"]["peak_delta_mb"] / floor
    ratio_copy = results["lora_teacher_copy"]["peak_delta_mb"] / floor
    print(f"| peak RSS delta, LoRA student, no teacher (MB) | {floor:.0f} | |")
    print(
        f"| peak RSS delta, LoRA + self-teacher (adapter disabled) (MB) | "
        f"{results['lora_self_teacher']['peak_delta_mb']:.0f} | |"
    )
    print(
        f"| peak RSS delta, LoRA + separate fp32 teacher copy (MB) | "
        f"{results['lora_teacher_copy']['peak_delta_mb']:.0f} | |"
    )
    print(f"| **memory ratio self-teacher / no teacher** | **{ratio_self:.2f}** | <= 1.15 |")
    print(f"| memory ratio teacher copy / no teacher (contrast) | {ratio_copy:.2f} | |")
    if not all(r.get("peak_reset") for r in results.values()):
        print("\n(peak RSS counter could not be reset: lifetime peaks were used)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
