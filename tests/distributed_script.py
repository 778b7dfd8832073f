"""A few OPDLM steps on the tiny model, one process per rank; run by `tests/test_distributed.py`.

    torchrun --standalone --nproc_per_node 2 tests/distributed_script.py OUT_DIR [--steps 3] [--gradient_accumulation_steps 2]
    accelerate launch --multi_gpu --num_processes 2 tests/distributed_script.py OUT_DIR   # the same, also on CPU
    torchrun --standalone --nproc_per_node 2 tests/distributed_script.py OUT_DIR --zero_stage 3   # needs deepspeed
    torchrun --standalone --nproc_per_node 2 tests/distributed_script.py OUT_DIR --fsdp2

By default the ranks train with DDP on CPU (gloo). With `--zero_stage 2|3` they train with DeepSpeed ZeRO
(`OPDLMConfig(deepspeed=...)`), with `--fsdp2` with FSDP2 (`fsdp="full_shard auto_wrap"`, `fsdp_config={"version":
2}`). On a machine without CUDA, DeepSpeed runs on its CPU accelerator (`DS_ACCELERATOR=cpu`, gloo) and FSDP2 on CPU
tensors with gloo, through a small shim (`_cpu_shim`) that makes accelerate accept them: accelerate only starts
DeepSpeed and FSDP on accelerators (on a CPU-only machine its process state finds no backend and counts one process). The model (`--model PATH`, or `make_model`) is
built after the config, as in a real script, so that under ZeRO-3 it is partitioned at construction
(`deepspeed.zero.Init`).

Every rank writes `OUT_DIR/rank{r}.json` with what the test compares across ranks:

- `student_sha256` / `initial_sha256`: hashes of the student's (gathered) state dict after training / before it (the
  student must have changed, identically on every rank);
- `teacher_unchanged`: whether every teacher tensor is bit-identical to the initial weights (and `teacher_wrapped`,
  the type the accelerator gave the teacher: it is prepared in evaluation mode, never wrapped for training);
- `local_tokens` / `local_lengths` / `local_eos_rows` / `local_loss_positions`: this rank's `count_training_tokens`,
  completion lengths, rows that reached an EOS and loss positions of every rollout, from the rank's own tensors;
- on rank 0, `log_history` (what the trainer logged: `num_tokens`, `completions/mean_length`, ...) and
  `num_input_tokens_seen`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from opdlm_trl.config import OPDLMConfig  # noqa: E402
from opdlm_trl.metrics import count_training_tokens  # noqa: E402
from opdlm_trl.testing import make_model, make_tokenizer  # noqa: E402
from opdlm_trl.trainer import OPDLMTrainer, _unwrap_hf  # noqa: E402


PROMPTS = [
    "what is 2+2?",
    "count: 1 2 3",
    "abc",
    "hello world",
    "x*y=?",
    "go",
    "7-3=",
    "one two",
    "a, b, c.",
    "sum 4 5",
    "hi",
    "zz top",
]


def _cpu_shim(engine: str) -> None:
    """Lets accelerate run DeepSpeed or FSDP2 on CPU processes (gloo) on a machine without CUDA (tests only).

    accelerate starts DeepSpeed and FSDP only on accelerators: on a CPU-only machine its process state finds no
    backend. The shim gives it gloo; for DeepSpeed (whose CPU accelerator then takes over the process group) as a
    multi-CPU run, for FSDP as a "multi-GPU" run whose device is the CPU (FSDP2 and gloo work on CPU tensors).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if engine == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    distributed_type = DistributedType.MULTI_CPU if engine == "deepspeed" else DistributedType.MULTI_GPU
    prepare_backend, set_device = PartialState._prepare_backend, PartialState.set_device

    def cpu_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", distributed_type
        return prepare_backend(self, cpu, sagemaker_dp, backend)

    def cpu_device(self):
        if self.device is None and self.distributed_type != DistributedType.NO:
            self.device = torch.device("cpu")
            return
        set_device(self)

    PartialState._prepare_backend = cpu_backend
    PartialState.set_device = cpu_device


def deepspeed_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        # torch's AdamW: DeepSpeed's fused CPU Adam would need a C++ build.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True},
        },
    }


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as whole CPU copies: ZeRO-3 partitions gathered first, FSDP2 `DTensor` shards gathered."""
    from torch.distributed.tensor import DTensor

    params = list(module.parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather:
        state = module.state_dict()
        state = {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in state.items()}
        return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict (sorted by name)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        tensor = tensor.contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class RecordingTrainer(OPDLMTrainer):
    """Records, on every rank, the training tokens and completion lengths of its own rollouts."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self.local_tokens.append(count_training_tokens(out["prompt_mask"], out["completion_mask"]))
            self.local_lengths.append(out["completion_mask"].sum(-1).tolist())
            eos_ids = torch.tensor(self.eos_token_ids, device=out["completion_ids"].device)
            eos = torch.isin(out["completion_ids"], eos_ids) & out["completion_mask"].bool()
            self.local_eos_rows.append(int(eos.any(-1).sum()))
            self.local_loss_positions.append(int(out["loss_mask"].sum()))
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--zero_stage", type=int, default=None, help="DeepSpeed ZeRO stage (2 or 3); default DDP.")
    parser.add_argument("--fsdp2", action="store_true", help="FSDP2 (full shard, one unit per decoder layer).")
    parser.add_argument("--teacher_top_k", type=int, default=None)
    parser.add_argument("--model", default=None, help="A saved causal LM folder; default: `make_model` (seed 0).")
    opts = parser.parse_args()

    torch.set_num_threads(1)
    deepspeed, fsdp = None, {}
    if opts.zero_stage is not None:
        deepspeed = deepspeed_config(opts.zero_stage)
    elif opts.fsdp2:
        fsdp = dict(
            fsdp="full_shard auto_wrap",
            fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["Qwen3DecoderLayer"]},
        )
    if (deepspeed or fsdp) and not torch.cuda.is_available():
        _cpu_shim("deepspeed" if deepspeed else "fsdp")
    args = OPDLMConfig(
        output_dir=os.path.join(opts.out_dir, "trainer"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=opts.gradient_accumulation_steps,
        max_steps=opts.steps,
        max_completion_length=8,
        max_prompt_length=16,
        learning_rate=1e-3,
        report_to="none",
        bf16=False,
        gradient_checkpointing=opts.gradient_checkpointing,
        save_strategy="no",
        use_cpu=not (deepspeed or fsdp),
        deepspeed=deepspeed,
        **fsdp,
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
        temperature=1.0,
        teacher_top_k=opts.teacher_top_k,
    )
    tok = make_tokenizer()
    # Built after the config: under ZeRO-3, transformers partitions it right here (`deepspeed.zero.Init`).
    if opts.model:
        model = AutoModelForCausalLM.from_pretrained(opts.model, attn_implementation="sdpa", dtype=torch.float32)
    else:
        model = make_model("qwen3", vocab_size=len(tok))
    model.train()
    initial = full_state(model)
    trainer = RecordingTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok
    )
    trainer.local_tokens, trainer.local_lengths, trainer.local_eos_rows, trainer.local_loss_positions = [], [], [], []
    trainer.train()

    rank = trainer.accelerator.process_index
    teacher = _unwrap_hf(trainer.teacher_model)
    teacher_state = full_state(teacher)
    result = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "student_wrapped": type(trainer.model_wrapped).__name__,
        "teacher_wrapped": type(trainer.teacher_model).__name__,
        "initial_sha256": state_sha256(initial),
        "student_sha256": state_sha256(full_state(_unwrap_hf(trainer.model))),
        "teacher_sha256": state_sha256(teacher_state),
        "teacher_unchanged": teacher_state.keys() == initial.keys()
        and all(torch.equal(teacher_state[name], initial[name]) for name in initial),
        "teacher_requires_grad": any(p.requires_grad for p in teacher.parameters()),
        "local_tokens": trainer.local_tokens,
        "local_lengths": trainer.local_lengths,
        "local_eos_rows": trainer.local_eos_rows,
        "local_loss_positions": trainer.local_loss_positions,
        "num_input_tokens_seen": trainer.state.num_input_tokens_seen,
        "losses": [record["loss"] for record in trainer.state.log_history if "loss" in record],
    }
    if rank == 0:
        result["log_history"] = trainer.state.log_history
    with open(os.path.join(opts.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    trainer.accelerator.wait_for_everyone()
    if hasattr(trainer, "end"):  # finish trackers, destroy the process group (transformers >= 5.18)
        trainer.end()


if __name__ == "__main__":
    main()
