"""Token efficiency: held-out accuracy against training tokens for OPDLM, OPDLM_off and the BD3LM-SFT baseline.

Every arm starts from the same model (the shipped demo teacher, converted with `convert_to_dlm`: same weights, block-
causal attention, a mask token), trains on the same prompts (`opdlm_trl.demo.make_splits()["train"]`) and is scored
on the same fixed held-out prompts (greedy, static decoding: one token per forward), at log-spaced optimizer steps
including step 0:

- `OPDLM`: `OPDLMTrainer`, one noisy state per block taken from the student's own trajectory;
- `OPDLM_off`: `OPDLMTrainer(state_selection="random_mask")`, random masking of the student's own samples;
- `BD3LM-SFT`: `BD3LMTrainer`, the masked-diffusion cross-entropy on the reference completions. The teacher's greedy
  completions equal the references on the evaluated prompts (the script checks and prints the teacher's accuracy),
  so distilling the teacher's outputs and training on the ground truth are the same data here.

Training tokens are `trainer.state.num_input_tokens_seen` for every arm, i.e. `opdlm_trl.metrics.count_training_tokens`:
prompt tokens + completion tokens (including the EOS) of every row used in an update. The baseline gets a larger token
budget than the OPDLM arms (that is the point of the comparison).

    HF_HUB_OFFLINE=1 python benchmarks/token_efficiency.py              # the full run (see --help for the sizes)
    HF_HUB_OFFLINE=1 python benchmarks/token_efficiency.py --quick      # a 2-minute smoke run (1 seed, few steps)

Writes `benchmarks/results/token_efficiency.{md,json,png}` (or `--output_dir`) and prints the headline last: training
tokens to reach 95% of the teacher's held-out accuracy, baseline / OPDLM. Not a test; runs (arm, seed) jobs in
`--workers` processes of one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any


HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")  # convert_demo.py: the main job's evaluation helpers
ARMS = ("OPDLM", "OPDLM_off", "BD3LM-SFT")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training seeds (one run per arm each).")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="Arms to run.")
    p.add_argument("--opdlm_steps", type=int, default=3000, help="Optimizer steps of the OPDLM arms.")
    p.add_argument("--baseline_steps", type=int, default=6000, help="Optimizer steps of the baseline.")
    p.add_argument("--batch_size", type=int, default=8, help="Prompts (rows) per optimizer step, every arm.")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="Peak learning rate, every arm.")
    p.add_argument(
        "--lr_scheduler_type", default="cosine", help="Learning-rate schedule, every arm (to 0 at the end)."
    )
    p.add_argument("--warmup_steps", type=int, default=5, help="Warm-up steps, every arm.")
    p.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=[0.9, 0.7, 0.5],
        help="Dynamic-decoding thresholds evaluated at the end of training (exact match and tokens per forward).",
    )
    p.add_argument(
        "--levels",
        type=float,
        nargs="+",
        default=[0.25, 0.5, 0.75],
        help="Secondary fractions of the teacher's accuracy for the tokens-to-reach table (the headline uses --target).",
    )
    p.add_argument("--temperature", type=float, default=2.0, help="Rollout temperature of the OPDLM arms.")
    p.add_argument("--num_eval", type=int, default=200, help="Held-out prompts scored at every checkpoint.")
    p.add_argument("--num_checkpoints", type=int, default=8, help="Log-spaced checkpoints per run (plus step 0).")
    p.add_argument("--target", type=float, default=0.95, help="Fraction of the teacher's accuracy of the headline.")
    p.add_argument("--workers", type=int, default=2, help="Parallel processes (one torch thread each).")
    p.add_argument("--output_dir", default=os.path.join(HERE, "results"), help="Where the results are written.")
    p.add_argument("--quick", action="store_true", help="Smoke run: seed 0, 60/120 steps, 50 prompts.")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.opdlm_steps, args.baseline_steps, args.num_eval, args.num_checkpoints = [0], 60, 120, 50, 4
    return args


def checkpoint_steps(max_steps: int, count: int) -> list[int]:
    """Step 0 and `count` log-spaced steps up to `max_steps` (distinct integers, the last one `max_steps`).

    Args:
        max_steps: Last step.
        count: Number of checkpoints after step 0.

    Returns:
        Sorted steps, starting at 0.
    """
    first = max(1, max_steps // 2 ** (count - 1))
    steps = {0, max_steps}
    for i in range(count):
        steps.add(int(round(first * (max_steps / first) ** (i / max(count - 1, 1)))))
    return sorted(s for s in steps if 0 <= s <= max_steps)


# ----------------------------------------------------------------------------------------------------------------------
# One run (in a worker process)
# ----------------------------------------------------------------------------------------------------------------------


def _evaluate(model, tokenizer, prompts, references, threshold=None) -> tuple[float, float]:
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    from convert_demo import generate_student, score

    from opdlm_trl.demo import MAX_NEW_TOKENS

    predictions, tpf = generate_student(model, tokenizer, prompts, MAX_NEW_TOKENS, len(prompts), threshold)
    return score(predictions, references), tpf


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Trains one arm with one seed, scoring the held-out prompts at the checkpoint steps.

    Args:
        job: `arm`, `seed`, `steps` (checkpoint steps, the last one the run's length), `batch_size`, `learning_rate`,
            `temperature`, `num_eval`, `output_dir`.

    Returns:
        The job with `checkpoints` (a list of `{step, tokens, exact_match, seconds}`) and, for the last checkpoint,
        `final_dynamic` (exact match and tokens per forward with threshold 0.9).
    """
    import torch

    torch.set_num_threads(1)
    from transformers import TrainerCallback

    from opdlm_trl.demo import MAX_NEW_TOKENS, load_teacher, make_splits

    arm, seed, steps = job["arm"], job["seed"], job["steps"]
    splits = make_splits()
    test = splits["test"].select(range(job["num_eval"]))
    prompts, references = list(test["prompt"]), list(test["completion"])
    model, tokenizer = load_teacher()
    checkpoints: list[dict[str, Any]] = []
    start = time.perf_counter()

    class Checkpoints(TrainerCallback):
        def _record(self, state, model, tokenizer):
            accuracy, _ = _evaluate(model, tokenizer, prompts, references)
            checkpoints.append(
                {
                    "step": state.global_step,
                    "tokens": int(state.num_input_tokens_seen),
                    "exact_match": accuracy,
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )

        def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
            if 0 in steps and state.global_step == 0:
                self._record(state, model, processing_class)

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            if state.global_step in steps and state.global_step > 0:
                self._record(state, model, processing_class)

    common = dict(
        output_dir=os.path.join(job["output_dir"], "runs", f"{arm}-{seed}"),
        per_device_train_batch_size=job["batch_size"],
        max_steps=steps[-1],
        learning_rate=job["learning_rate"],
        lr_scheduler_type=job["lr_scheduler_type"],
        warmup_steps=job["warmup_steps"],
        max_grad_norm=1.0,
        seed=seed,
        bf16=False,
        use_cpu=True,
        activation_checkpointing=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=max(steps[-1] // 20, 1),
    )
    if arm == "BD3LM-SFT":
        from opdlm_trl.baseline import BD3LMConfig, BD3LMTrainer

        # Standard prompt-completion format: the completion is appended to the prompt as is (hence the space).
        train = splits["train"].map(lambda row: {"completion": " " + row["completion"]})
        args = BD3LMConfig(block_size=4, max_length=64, **common)
        trainer = BD3LMTrainer(
            model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[Checkpoints()]
        )
    else:
        from opdlm_trl.config import OPDLMConfig
        from opdlm_trl.trainer import OPDLMTrainer

        args = OPDLMConfig(
            block_size=4,
            steps_per_block=4,
            threshold=0.9,
            temperature=job["temperature"],
            max_prompt_length=64,
            max_completion_length=MAX_NEW_TOKENS,
            state_selection="one_state_per_block" if arm == "OPDLM" else "random_mask",
            **common,
        )
        trainer = OPDLMTrainer(
            model=model,
            args=args,
            train_dataset=splits["train"].select_columns(["prompt"]),
            processing_class=tokenizer,
            callbacks=[Checkpoints()],
        )
    trainer.train()
    final_static = checkpoints[-1]["exact_match"]
    dynamic = []
    for threshold in job["thresholds"]:
        accuracy, tpf = _evaluate(trainer.model, tokenizer, prompts, references, threshold=threshold)
        dynamic.append({"threshold": threshold, "exact_match": accuracy, "tokens_per_forward": tpf})
    job = dict(job)
    job["checkpoints"] = checkpoints
    job["final_dynamic"] = dynamic
    job["final_static"] = final_static
    job["train_seconds"] = round(time.perf_counter() - start, 1)
    print(
        f"[{arm} seed {seed}] done in {job['train_seconds']:.0f} s: "
        + ", ".join(f"{c['tokens']:,} tok -> {c['exact_match']:.3f}" for c in checkpoints),
        flush=True,
    )
    return job


# ----------------------------------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------------------------------


def tokens_to_reach(checkpoints: list[dict[str, Any]], level: float) -> float | None:
    """Training tokens at which the accuracy first reaches `level`, linearly interpolated between checkpoints.

    Returns:
        The token count, or `None` when the run never reaches it.
    """
    previous = None
    for point in checkpoints:
        if point["exact_match"] >= level:
            if previous is None or previous["exact_match"] >= level:
                return float(point["tokens"])
            fraction = (level - previous["exact_match"]) / (point["exact_match"] - previous["exact_match"])
            return previous["tokens"] + fraction * (point["tokens"] - previous["tokens"])
        previous = point
    return None


def summarize(
    jobs: list[dict[str, Any]], teacher_accuracy: float, target: float, levels: list[float] = ()
) -> dict[str, Any]:
    """Per arm: mean/min/max accuracy and mean tokens per checkpoint step, tokens to reach the target, budgets."""
    level = target * teacher_accuracy
    summary: dict[str, Any] = {"level": level, "arms": {}}
    for arm in ARMS:
        runs = [j for j in jobs if j["arm"] == arm]
        if not runs:
            continue
        steps = [c["step"] for c in runs[0]["checkpoints"]]
        table = []
        for i, step in enumerate(steps):
            points = [r["checkpoints"][i] for r in runs if i < len(r["checkpoints"])]
            accs = [p["exact_match"] for p in points]
            table.append(
                {
                    "step": step,
                    "tokens": sum(p["tokens"] for p in points) / len(points),
                    "mean": sum(accs) / len(accs),
                    "min": min(accs),
                    "max": max(accs),
                }
            )
        reach = [tokens_to_reach(r["checkpoints"], level) for r in runs]
        summary["arms"][arm] = {
            "table": table,
            "tokens_to_target": reach,
            "budget": sum(r["checkpoints"][-1]["tokens"] for r in runs) / len(runs),
            "final_mean": table[-1]["mean"],
            "final_dynamic": [
                {
                    "threshold": point["threshold"],
                    "exact_match": sum(r["final_dynamic"][i]["exact_match"] for r in runs) / len(runs),
                    "tokens_per_forward": sum(r["final_dynamic"][i]["tokens_per_forward"] for r in runs) / len(runs),
                }
                for i, point in enumerate(runs[0]["final_dynamic"])
            ],
            "tokens_to_levels": {
                str(fraction): [tokens_to_reach(r["checkpoints"], fraction * teacher_accuracy) for r in runs]
                for fraction in levels
            },
        }
    return summary


def _mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def headline(summary: dict[str, Any], target: float) -> str:
    """Training tokens to reach `target` of the teacher's accuracy, baseline / OPDLM (or a bound)."""
    arms = summary["arms"]
    if "OPDLM" not in arms or "BD3LM-SFT" not in arms:
        return "Headline needs the OPDLM and BD3LM-SFT arms."
    opdlm, base = arms["OPDLM"], arms["BD3LM-SFT"]
    o_tokens, b_tokens = _mean(opdlm["tokens_to_target"]), _mean(base["tokens_to_target"])
    pct = f"{100 * target:.0f}% of the teacher's held-out accuracy ({100 * summary['level']:.1f}% exact match)"
    if o_tokens is None:
        reached = sum(t is not None for t in opdlm["tokens_to_target"])
        return (
            f"HEADLINE: OPDLM did not reach {pct} in every seed within {opdlm['budget']:,.0f} training tokens "
            f"({reached}/{len(opdlm['tokens_to_target'])} seeds did; final mean {100 * opdlm['final_mean']:.1f}%); "
            f"the baseline reached {100 * base['final_mean']:.1f}% with {base['budget']:,.0f} tokens. No ratio."
        )
    if b_tokens is None:
        return (
            f"HEADLINE: training tokens to reach {pct}: OPDLM {o_tokens:,.0f} (mean over seeds); the BD3LM-SFT "
            f"baseline did not reach it within its budget of {base['budget']:,.0f} tokens (final mean "
            f"{100 * base['final_mean']:.1f}%): baseline / OPDLM > {base['budget'] / o_tokens:.1f}x"
        )
    return (
        f"HEADLINE: training tokens to reach {pct}: OPDLM {o_tokens:,.0f}, BD3LM-SFT {b_tokens:,.0f} (means over "
        f"seeds): baseline / OPDLM = {b_tokens / o_tokens:.1f}x"
    )


def level_ratios(summary: dict[str, Any], levels: list[float]) -> list[str]:
    """`"<level>: <ratio>x"` (baseline / OPDLM mean tokens to reach it) for every level both arms reached."""
    arms = summary["arms"]
    if "OPDLM" not in arms or "BD3LM-SFT" not in arms:
        return []
    out = []
    for fraction in levels:
        o = _mean(arms["OPDLM"]["tokens_to_levels"][str(fraction)])
        b = _mean(arms["BD3LM-SFT"]["tokens_to_levels"][str(fraction)])
        if o is None:
            out.append(f"{100 * fraction:.0f}%: OPDLM not reached")
        elif b is None:
            out.append(f"{100 * fraction:.0f}%: > {arms['BD3LM-SFT']['budget'] / o:.1f}x (baseline not reached)")
        else:
            out.append(f"{100 * fraction:.0f}%: {b / o:.1f}x")
    return out


def _fmt_tokens(value: float | None) -> str:
    return "not reached" if value is None else f"{value:,.0f}"


def markdown(summary, config, teacher_accuracy, head, wall) -> str:
    lines = [
        "# Token efficiency: OPDLM vs OPDLM_off vs BD3LM-SFT (demo task)",
        "",
        f"Held-out exact match (greedy, static decoding, {config['num_eval']} fixed prompts) against cumulative "
        f"training tokens, mean [min, max] over seeds {config['seeds']}. Teacher (autoregressive, greedy): "
        f"{100 * teacher_accuracy:.1f}%. Batch {config['batch_size']} rows per step, lr "
        f"{config['learning_rate']:g} ({config['lr_scheduler_type']}, {config['warmup_steps']} warm-up steps) for every "
        f"arm; OPDLM rollouts at temperature {config['temperature']:g}, threshold 0.9, "
        f"b = 4. Wall time {wall / 60:.1f} min ({config['workers']} worker processes).",
        "",
    ]
    for arm, data in summary["arms"].items():
        lines += [
            f"## {arm}",
            "",
            "| step | training tokens | exact match (mean) | min | max |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in data["table"]:
            lines.append(
                f"| {row['step']} | {row['tokens']:,.0f} | {100 * row['mean']:.1f}% | {100 * row['min']:.1f}% "
                f"| {100 * row['max']:.1f}% |"
            )
        lines.append("")
    lines += [
        f"## Tokens to reach {100 * config['target']:.0f}% of the teacher ({100 * summary['level']:.1f}% exact match)",
        "",
        "| arm | per seed | token budget (mean) | final exact match (mean) |",
        "|---|---|---:|---:|",
    ]
    for arm, data in summary["arms"].items():
        seeds = ", ".join(_fmt_tokens(v) for v in data["tokens_to_target"])
        lines.append(f"| {arm} | {seeds} | {data['budget']:,.0f} | {100 * data['final_mean']:.1f}% |")
    lines += [
        "",
        "## Tokens to reach lower fractions of the teacher's accuracy (mean over seeds; 'not reached' if any seed "
        "did not)",
        "",
        "| arm | "
        + " | ".join(f"{100 * f:.0f}% ({100 * f * teacher_accuracy:.1f}% EM)" for f in config["levels"])
        + " |",
        "|---|" + "---:|" * len(config["levels"]),
    ]
    for arm, data in summary["arms"].items():
        cells = [_fmt_tokens(_mean(data["tokens_to_levels"][str(f)])) for f in config["levels"]]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    ratios = level_ratios(summary, config["levels"])
    if ratios:
        lines += ["", "Baseline / OPDLM at these levels: " + ", ".join(ratios) + "."]
    lines += [
        "",
        "## End of training: dynamic decoding (parallel), mean over seeds",
        "",
        "| arm | static exact match | "
        + " | ".join(f"threshold {t:g}: exact match, tokens/forward" for t in config["thresholds"])
        + " |",
        "|---|---:|" + "---|" * len(config["thresholds"]),
    ]
    for arm, data in summary["arms"].items():
        cells = [f"{100 * d['exact_match']:.1f}%, {d['tokens_per_forward']:.2f}" for d in data["final_dynamic"]]
        lines.append(f"| {arm} | {100 * data['final_mean']:.1f}% | " + " | ".join(cells) + " |")
    lines += ["", head, ""]
    return "\n".join(lines)


def plot(summary, teacher_accuracy, target, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    nonzero = [r["tokens"] for d in summary["arms"].values() for r in d["table"] if r["tokens"] > 0]
    linthresh = min(nonzero) if nonzero else 1.0
    colors = {"OPDLM": "tab:blue", "OPDLM_off": "tab:orange", "BD3LM-SFT": "tab:gray"}
    for arm, data in summary["arms"].items():
        x = [r["tokens"] for r in data["table"]]
        ax.plot(x, [r["mean"] for r in data["table"]], marker="o", color=colors[arm], label=arm)
        ax.fill_between(
            x, [r["min"] for r in data["table"]], [r["max"] for r in data["table"]], color=colors[arm], alpha=0.2
        )
    ax.axhline(teacher_accuracy, color="black", linestyle="-", linewidth=1, label="teacher (AR, greedy)")
    ax.axhline(
        target * teacher_accuracy, color="black", linestyle="--", linewidth=1, label=f"{100 * target:.0f}% of teacher"
    )
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlim(left=0)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("training tokens (prompt + completion of every row used in an update; log scale, 0 = step 0)")
    ax.set_ylabel("held-out exact match (greedy, static)")
    ax.set_title("Demo task (sorting), 0.8M-parameter model: mean and min-max over seeds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()

    import torch

    from opdlm_trl.demo import MAX_NEW_TOKENS, generate_ar, load_teacher, make_splits

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    test = make_splits()["test"].select(range(args.num_eval))
    teacher, tokenizer = load_teacher()
    teacher_outputs = generate_ar(teacher, tokenizer, list(test["prompt"]), MAX_NEW_TOKENS)
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    from convert_demo import score

    teacher_accuracy = score(teacher_outputs, list(test["completion"]))
    print(f"Teacher (AR, greedy) exact match on {args.num_eval} held-out prompts: {100 * teacher_accuracy:.1f}%")

    jobs = []
    for seed in args.seeds:
        for arm in args.arms:
            max_steps = args.baseline_steps if arm == "BD3LM-SFT" else args.opdlm_steps
            jobs.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "steps": checkpoint_steps(max_steps, args.num_checkpoints),
                    "batch_size": args.batch_size,
                    "learning_rate": args.learning_rate,
                    "temperature": args.temperature,
                    "lr_scheduler_type": args.lr_scheduler_type,
                    "warmup_steps": args.warmup_steps,
                    "thresholds": args.thresholds,
                    "num_eval": args.num_eval,
                    "output_dir": args.output_dir,
                }
            )
    jobs.sort(key=lambda j: -j["steps"][-1] * (3 if j["arm"] != "BD3LM-SFT" else 1))  # longest first
    if args.workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(run_job, jobs))
    else:
        results = [run_job(job) for job in jobs]
    wall = time.perf_counter() - start

    summary = summarize(results, teacher_accuracy, args.target, args.levels)
    head = headline(summary, args.target)
    config = {k: v for k, v in vars(args).items() if k != "output_dir"}
    report = markdown(summary, config, teacher_accuracy, head, wall)
    with open(os.path.join(args.output_dir, "token_efficiency.md"), "w") as f:
        f.write(report)
    raw = {
        "config": config,
        "teacher_exact_match": teacher_accuracy,
        "teacher_equals_references": teacher_accuracy == 1.0,
        "summary": summary,
        "runs": sorted(results, key=lambda j: (ARMS.index(j["arm"]), j["seed"])),
        "wall_seconds": round(wall, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
    }
    with open(os.path.join(args.output_dir, "token_efficiency.json"), "w") as f:
        json.dump(raw, f, indent=1)
    plot(summary, teacher_accuracy, args.target, os.path.join(args.output_dir, "token_efficiency.png"))

    print(report)
    if "OPDLM" in summary["arms"]:
        opdlm = summary["arms"]["OPDLM"]
        dyn = ", ".join(
            f"threshold {d['threshold']:g}: {100 * d['exact_match']:.1f}% at {d['tokens_per_forward']:.2f} tokens/forward"
            for d in opdlm["final_dynamic"]
        )
        print(
            f"End of training: teacher {100 * teacher_accuracy:.1f}% vs OPDLM {100 * opdlm['final_mean']:.1f}% "
            f"(gap {100 * (teacher_accuracy - opdlm['final_mean']):.1f} points, static); {dyn}."
        )
    print(f"Wall time {wall / 60:.1f} min. Results in {args.output_dir}.")
    print(head)
    return raw


if __name__ == "__main__":
    main()
