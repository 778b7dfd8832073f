"""Multi-process training on CPU: two ranks run a few OPDLM steps on the tiny model with DDP, FSDP2 and (where
deepspeed is installed) DeepSpeed ZeRO-3, and must agree with each other and with DDP.

The ranks are started with `torchrun --standalone --nproc_per_node 2` (as `python -m torch.distributed.run`, so the
test does not depend on PATH). `accelerate launch --cpu --num_processes 2` is not used: with `--cpu`, accelerate's
launcher starts a single process (multi-CPU runs go through `mpirun` and a hostfile), so the "distributed" run would
silently be a one-process run. `accelerate launch --multi_gpu --num_processes 2` works on a CPU-only machine as well
(it calls torchrun underneath; the script sets `use_cpu=True`, which makes accelerate pick gloo); torchrun is the
direct form. FSDP2 and DeepSpeed run on CPU through a test-only shim of accelerate's backend choice (see
`distributed_script.py`); the training code they exercise is the real one.
"""

import json
import os
import subprocess
import sys

import pytest


SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_script.py")


def _launch(out_dir, *script_args, nproc=2):
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",  # gloo on CPU even on a GPU machine
        PYTHONWARNINGS="ignore",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        SCRIPT,
        str(out_dir),
        *script_args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]


RUN = ("--steps", "2", "--gradient_accumulation_steps", "2")  # 2 ranks x 2 micro-batches x 2 prompts per update


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The tiny model on disk: every run loads the same weights after its config (ZeRO-3 partitions them at load)."""
    from opdlm_trl.testing import make_model, make_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    make_model("qwen3", vocab_size=len(make_tokenizer())).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_checkpoint):
    return _launch(tmp_path_factory.mktemp("ddp"), *RUN, "--model", tiny_checkpoint)


def _check_agreement(runs, reference=None):
    """Ranks hold identical trained students and untouched teachers; with a reference run (DDP), the same rollouts
    and the same losses."""
    rank0, rank1 = runs
    assert rank0["student_sha256"] == rank1["student_sha256"] != rank0["initial_sha256"]
    for result in runs:
        assert result["teacher_unchanged"] and result["teacher_sha256"] == result["initial_sha256"]
        assert not result["teacher_requires_grad"]
    if reference is not None:
        assert rank0["initial_sha256"] == reference[0]["initial_sha256"]
        for result, ref in zip(runs, reference):
            assert result["local_tokens"] == ref["local_tokens"]  # same prompts and samples per rank
            assert result["local_loss_positions"] == ref["local_loss_positions"]
        assert rank0["losses"] == pytest.approx(reference[0]["losses"], rel=1e-5)
        assert rank0["num_input_tokens_seen"] == reference[0]["num_input_tokens_seen"]


def test_two_ranks_really_ran_ddp(ddp_run):
    for r, result in enumerate(ddp_run):
        assert result["rank"] == r and result["world_size"] == 2
        assert result["distributed_type"] == "DistributedType.MULTI_CPU"
        assert result["student_wrapped"] == "DistributedDataParallel"
        # The teacher is prepared in evaluation mode: on the device, never wrapped for training, no gradients.
        assert result["teacher_wrapped"] != "DistributedDataParallel"
        assert not result["teacher_requires_grad"]
    # Each rank sampled its own prompts (same seed, different data shards and per-process sampling seeds).
    assert ddp_run[0]["local_tokens"] != ddp_run[1]["local_tokens"]


def test_ranks_hold_identical_trained_students_and_untouched_teachers(ddp_run):
    rank0, rank1 = ddp_run
    assert rank0["initial_sha256"] == rank1["initial_sha256"]
    assert rank0["student_sha256"] != rank0["initial_sha256"], "the student did not change"
    assert rank0["student_sha256"] == rank1["student_sha256"], "the ranks' students diverged"
    _check_agreement(ddp_run)


def test_metrics_are_gathered_over_ranks(ddp_run):
    rank0, rank1 = ddp_run
    logs = [record for record in rank0["log_history"] if "loss" in record]
    assert len(logs) == 2 == len(rank0["local_tokens"]) == len(rank1["local_tokens"])  # one rollout per update
    # Training tokens: the sum over ranks of each rank's `count_training_tokens`, counted once.
    total = sum(rank0["local_tokens"]) + sum(rank1["local_tokens"])
    assert rank0["num_input_tokens_seen"] == rank1["num_input_tokens_seen"] == total
    seen = 0
    for step, record in enumerate(logs):
        seen += rank0["local_tokens"][step] + rank1["local_tokens"][step]
        assert record["num_tokens"] == seen
        lengths = rank0["local_lengths"][step] + rank1["local_lengths"][step]
        assert len(lengths) == 8  # 2 ranks x 2 micro-batches x 2 prompts
        assert record["completions/mean_length"] == pytest.approx(sum(lengths) / len(lengths))
        assert record["completions/min_length"] == min(lengths)
        assert record["completions/max_length"] == max(lengths)
        eos_rows = rank0["local_eos_rows"][step] + rank1["local_eos_rows"][step]
        assert record["completions/eos_fraction"] == pytest.approx(eos_rows / len(lengths))
        positions = rank0["local_loss_positions"][step] + rank1["local_loss_positions"][step]
        assert record["loss/masked_fraction"] == pytest.approx(positions / sum(lengths))
        assert record["rollout/tokens_per_forward"] > 0


def test_fsdp2_with_gradient_checkpointing_matches_ddp(tmp_path_factory, tiny_checkpoint, ddp_run):
    """FSDP2 (one unit per decoder layer; the teacher sharded as one unit, its LM head gathered by the loss), with
    gradient checkpointing recomputing the block-masked forward: the same losses as DDP without it."""
    out = tmp_path_factory.mktemp("fsdp2")
    runs = _launch(out, *RUN, "--model", tiny_checkpoint, "--fsdp2", "--gradient_checkpointing")
    for result in runs:
        assert result["distributed_type"] == "DistributedType.FSDP"
        assert result["student_wrapped"].startswith("FSDP") and result["teacher_wrapped"].startswith("FSDP")
    _check_agreement(runs, ddp_run)


@pytest.mark.parametrize("stage,top_k", [(3, None), (3, 5), (2, None)])
def test_deepspeed_matches_ddp(tmp_path_factory, tiny_checkpoint, ddp_run, stage, top_k):
    """ZeRO-3: the student is partitioned at load, the self-teacher is a partitioned copy (not a deep copy), the loss
    gathers both LM heads (full vocabulary: TRL's kernel; top-k: the position-chunked dense path). ZeRO-2: a full
    teacher copy per process. Runs where deepspeed is installed (CPU accelerator on a machine without CUDA)."""
    pytest.importorskip("deepspeed")
    extra = ["--teacher_top_k", str(top_k)] if top_k else []
    out = tmp_path_factory.mktemp(f"zero{stage}")
    runs = _launch(out, *RUN, "--model", tiny_checkpoint, "--zero_stage", str(stage), *extra)
    for result in runs:
        assert result["distributed_type"] == "DistributedType.DEEPSPEED"
        assert result["student_wrapped"] == result["teacher_wrapped"] == "DeepSpeedEngine"
    if top_k is None:
        _check_agreement(runs, ddp_run)
    else:
        _check_agreement(runs)


# ------------------------------------------------------------------------------------------------------------------
# Large vocabularies: the loss never holds [N, V] logits of both models
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("top_k,vocab_size", [(None, None), (5, None), (5, 47), (None, 47)])
def test_chunked_dense_divergence_equals_dense(divergence, top_k, vocab_size):
    """The position-chunked path (several chunks) gives the dense path's values, entropies and gradients, with biases,
    logit scales, soft-capping, temperature and a cut vocabulary."""
    import torch

    from opdlm_trl.losses import chunked_dense_divergence, dense_divergence_from_hidden

    gen = torch.Generator().manual_seed(0)
    n, hidden, vocab = 37, 16, 50
    h_s = torch.randn(n, hidden, generator=gen).requires_grad_()
    w_s = (0.5 * torch.randn(vocab, hidden, generator=gen)).requires_grad_()
    b_s = torch.randn(vocab, generator=gen).requires_grad_()
    h_t, w_t, b_t = (
        torch.randn(n, hidden, generator=gen),
        torch.randn(vocab, hidden, generator=gen),
        torch.randn(vocab),
    )
    kwargs = dict(
        student_bias=b_s,
        teacher_bias=b_t,
        divergence=divergence,
        beta=0.3,
        temperature=1.3,
        teacher_top_k=top_k,
        student_logit_scale=1.5,
        student_softcap=3.0,
        teacher_logit_scale=0.8,
        vocab_size=vocab_size,
    )
    weights = torch.randn(n, generator=gen)
    results = []
    for fn, extra in ((dense_divergence_from_hidden, {}), (chunked_dense_divergence, {"chunk_size": 4})):
        per_token, entropy = fn(h_s, w_s, h_t, w_t, **kwargs, **extra)
        grads = torch.autograd.grad((per_token * weights).sum(), (h_s, w_s, b_s))
        results.append((per_token.detach(), entropy, grads))
    (dense, dense_entropy, dense_grads), (chunked, chunked_entropy, chunked_grads) = results
    torch.testing.assert_close(chunked, dense, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(chunked_entropy, dense_entropy, atol=1e-6, rtol=1e-5)
    for got, want in zip(chunked_grads, dense_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    if vocab_size is not None:  # rows past the compared vocabulary get no gradient
        assert chunked_grads[1][vocab_size:].abs().max() == 0 and chunked_grads[2][vocab_size:].abs().max() == 0


def test_teacher_top_k_loss_projects_a_chunk_of_positions_at_a_time(tmp_path, monkeypatch):
    """The trainer's top-k loss goes through the chunked path: no projection ever covers more than one chunk of
    positions (forward or backward), and loss and gradients equal the all-positions computation."""
    import torch
    from datasets import Dataset

    from opdlm_trl import losses
    from opdlm_trl.config import OPDLMConfig
    from opdlm_trl.testing import make_model, make_tokenizer
    from opdlm_trl.trainer import OPDLMTrainer

    tok = make_tokenizer()
    args = OPDLMConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_completion_length=16,
        max_prompt_length=16,
        report_to="none",
        use_cpu=True,
        teacher_top_k=5,
        temperature=1.0,
    )
    trainer = OPDLMTrainer(
        model=make_model("qwen3", vocab_size=len(tok)).train(),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["abc", "hello", "12 + 7 =", "go"]}),
        processing_class=tok,
    )
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in ["abc", "hello", "12 + 7 =", "go"]])
    n_positions = int(inputs["loss_mask"].sum())
    assert n_positions > 8

    def loss_and_grad():
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        return loss.item(), trainer.model.get_output_embeddings().weight.grad.clone()

    rows_seen = []
    project = losses._project

    def spy(hidden, *args, **kwargs):
        rows_seen.append(hidden.shape[0])
        return project(hidden, *args, **kwargs)

    monkeypatch.setattr(losses, "_project", spy)
    monkeypatch.setattr(losses, "DENSE_CHUNK_ELEMENTS", 3 * len(tok))  # 3 positions per chunk
    chunked_loss, chunked_grad = loss_and_grad()
    assert rows_seen and max(rows_seen) <= 3
    monkeypatch.setattr(losses, "DENSE_CHUNK_ELEMENTS", 1 << 30)  # one chunk: every position at once
    rows_seen.clear()
    whole_loss, whole_grad = loss_and_grad()
    assert max(rows_seen) == n_positions
    assert chunked_loss == pytest.approx(whole_loss, rel=1e-6)
    torch.testing.assert_close(chunked_grad, whole_grad, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# The shipped accelerate configs
# ------------------------------------------------------------------------------------------------------------------

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "examples", "accelerate_configs")


@pytest.mark.parametrize(
    "name,distributed_type,stage,offload",
    [
        ("multi_gpu.yaml", "MULTI_GPU", None, None),
        ("zero2.yaml", "DEEPSPEED", 2, "none"),
        ("zero3.yaml", "DEEPSPEED", 3, "none"),
        ("zero3_offload.yaml", "DEEPSPEED", 3, "cpu"),
        ("fsdp2.yaml", "FSDP", None, None),
    ],
)
def test_accelerate_configs_load(name, distributed_type, stage, offload):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(os.path.join(CONFIGS, name))
    assert str(config.distributed_type).split(".")[-1] == distributed_type
    assert config.mixed_precision == "bf16" and config.use_cpu is False
    if stage is not None:
        assert config.deepspeed_config["zero_stage"] == stage
        assert config.deepspeed_config["offload_param_device"] == offload
        assert config.deepspeed_config["offload_optimizer_device"] == offload
    if name == "fsdp2.yaml":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False  # the self-teacher copies real weights
