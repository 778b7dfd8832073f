"""The `opdlm` command line. Two subprocess runs (`generate`, `train`); the rest calls `main()` in-process."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets import Dataset, DatasetDict

from opdlm_trl import convert_to_dlm, diffusion_generate
from opdlm_trl import hub as hub_module
from opdlm_trl.cli import COMMANDS, main
from opdlm_trl.hub import load_dlm, save_dlm
from opdlm_trl.testing import make_model, make_tokenizer


REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["12+3=", "ab", "hello", "z 9"]
HAS_BASELINE = importlib.util.find_spec("opdlm_trl.baseline") is not None


def _run_cli(*args, cwd=REPO_ROOT, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    return subprocess.run(
        [sys.executable, "-m", "opdlm_trl.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = make_tokenizer()
    model, tok = convert_to_dlm(make_model("qwen3", vocab_size=len(tok)), tok, block_size=4)
    return Path(save_dlm(model, tok, tmp_path_factory.mktemp("cli") / "tiny-dlm"))


def _greedy_completions(folder, prompts, max_new_tokens, **kwargs):
    model, tok = load_dlm(folder)
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = diffusion_generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=max_new_tokens, **kwargs)
    return tok.batch_decode(out.sequences[:, enc.input_ids.shape[1] :], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------------
# Subprocess runs
# ----------------------------------------------------------------------------------------------------------------------


def test_generate_subprocess(saved, tmp_path):
    output_file = tmp_path / "out.jsonl"
    proc = _run_cli(
        "generate",
        "--model_name_or_path", saved,
        "--prompt", PROMPTS[0], PROMPTS[1],
        "--max_new_tokens", 8,
        "--threshold", 0.5,
        "--steps_per_block", 2,
        "--output_format", "jsonl",
        "--output_file", output_file,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    expected = _greedy_completions(saved, PROMPTS[:2], 8, threshold=0.5, steps_per_block=2)
    assert [r["prompt"] for r in records] == PROMPTS[:2]
    assert [r["completion"] for r in records] == expected
    assert "tokens_per_forward=" in proc.stderr
    saved_records = [json.loads(line) for line in output_file.read_text().splitlines()]
    assert [r["completion"] for r in saved_records] == expected and saved_records[0]["nfe"] > 0


def test_train_subprocess_with_yaml_config(tmp_path):
    """`opdlm train` on a plain tiny causal LM: every OPDLMConfig field is a flag, `--config` reads YAML."""
    tok = make_tokenizer()
    make_model("qwen3", vocab_size=len(tok)).save_pretrained(tmp_path / "causal")
    tok.save_pretrained(tmp_path / "causal")
    DatasetDict({"train": Dataset.from_dict({"prompt": PROMPTS})}).save_to_disk(tmp_path / "prompts")
    (tmp_path / "recipe.yaml").write_text(
        "max_steps: 1\nper_device_train_batch_size: 2\nmax_completion_length: 8\nmax_prompt_length: 16\n"
        "report_to: none\nsave_strategy: 'no'\nuse_cpu: true\nlogging_steps: 1\nsteps_per_block: 2\n"
    )
    proc = _run_cli(
        "train",
        "--config", tmp_path / "recipe.yaml",
        "--model_name_or_path", tmp_path / "causal",
        "--dataset_name", tmp_path / "prompts",
        "--output_dir", tmp_path / "out",
        "--block_size", 4,
        "--threshold", 0.9,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dlm_block_size"] == 4 and config["dlm_attention"] == "block_causal"
    model, out_tok = load_dlm(tmp_path / "out")
    assert out_tok.mask_token == "<|reserved_special_token_0|>" and model.config.dlm_block_size == 4
    from opdlm_trl.hub import DLMHubMixin
    from opdlm_trl.trainer import OPDLMTrainer

    if issubclass(OPDLMTrainer, DLMHubMixin):  # the trainer saves the Hub layout once it inherits the mixin
        assert (tmp_path / "out" / "custom_generate" / "generate.py").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# In-process runs
# ----------------------------------------------------------------------------------------------------------------------


def test_eval_exact_match(saved, tmp_path, capsys):
    predictions = _greedy_completions(saved, PROMPTS, 8)
    completions = [f"  {predictions[0]} ", predictions[1], predictions[2] + "x", "definitely wrong"]
    DatasetDict({"test": Dataset.from_dict({"prompt": PROMPTS, "completion": completions})}).save_to_disk(
        tmp_path / "data"
    )
    output_file = tmp_path / "eval.json"
    args = ["eval", "--model_name_or_path", saved, "--dataset_name", tmp_path / "data", "--max_new_tokens", 8]
    assert main([*map(str, args), "--batch_size", "3", "--output_file", str(output_file)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["exact_match"] == 0.5 and metrics["num_examples"] == 4
    assert metrics["tokens_per_forward"] == pytest.approx(1.0) and metrics["nfe"] > 0
    written = json.loads(output_file.read_text())
    assert [row["correct"] for row in written["predictions"]] == [True, True, False, False]
    # --num_examples and a missing column
    assert main([*map(str, args), "--num_examples", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["exact_match"] == 1.0
    with pytest.raises(SystemExit) as error:
        main([*map(str, args), "--completion_column", "answer"])
    assert error.value.code == 2 and "'answer'" in capsys.readouterr().err


def test_train_accepts_an_a2d_checkpoint(tmp_path, capsys):
    """The paper's released format (model_type a2d-qwen3, remote code in auto_map) trains without remote code."""
    tok = make_tokenizer(with_reserved=False)
    tok.add_tokens(["<|MASK|>"], special_tokens=True)
    make_model("qwen3", vocab_size=len(tok) + 3).save_pretrained(tmp_path / "a2d")
    tok.save_pretrained(tmp_path / "a2d")
    config = json.loads((tmp_path / "a2d" / "config.json").read_text())
    config.update(model_type="a2d-qwen3", architectures=["A2DQwen3LMHeadModel"], auto_map={"AutoConfig": "m.C"})
    (tmp_path / "a2d" / "config.json").write_text(json.dumps(config))
    Dataset.from_dict({"prompt": PROMPTS}).to_json(tmp_path / "prompts.jsonl")
    args = ["train", "--model_name_or_path", tmp_path / "a2d", "--dataset_name", tmp_path / "prompts.jsonl"]
    args += ["--output_dir", tmp_path / "out", "--max_steps", 1, "--per_device_train_batch_size", 2, "--use_cpu"]
    args += ["--max_completion_length", 8, "--max_prompt_length", 16, "--report_to", "none", "--save_strategy", "no"]
    assert main([str(a) for a in args]) == 0
    model, out_tok = load_dlm(tmp_path / "out")
    assert out_tok.mask_token == "<|MASK|>" and model.config.mask_token_id == out_tok.convert_tokens_to_ids("<|MASK|>")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen3"


class _FakeHfApi:
    calls: list = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kwargs):
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.calls.append(SimpleNamespace(repo_id=repo_id, files=files, commit_message=commit_message, **kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")


def test_push(saved, tmp_path, monkeypatch, capsys):
    _FakeHfApi.calls = []
    monkeypatch.setattr(hub_module, "HfApi", _FakeHfApi)
    # A saved diffusion-LM folder is uploaded as saved, its card pointing at the repo.
    assert main(["push", "--model_name_or_path", str(saved), "--repo_id", "user/tiny", "--commit_message", "v1"]) == 0
    call = _FakeHfApi.calls[-1]
    assert call.repo_id == "user/tiny" and call.commit_message == "v1"
    assert call.files["model.safetensors"] == (saved / "model.safetensors").read_bytes()
    assert b'model_id = "user/tiny"' in call.files["README.md"]
    assert "https://huggingface.co/user/tiny/commit/abc" in capsys.readouterr().out
    # A plain causal LM is converted, saved with the decoding defaults, and uploaded.
    tok = make_tokenizer()
    make_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "causal")
    tok.save_pretrained(tmp_path / "causal")
    assert main(["push", "--model_name_or_path", str(tmp_path / "causal"), "--repo_id", "user/conv"]
                + ["--block_size", "8", "--threshold", "0.9", "--private", "true"]) == 0  # fmt: skip
    call = _FakeHfApi.calls[-1]
    generation = json.loads(call.files["generation_config.json"])
    assert generation["block_size"] == 8 and generation["threshold"] == 0.9
    assert json.loads(call.files["config.json"])["dlm_block_size"] == 8
    assert "custom_generate/sampler.py" in call.files and b"not trained yet" in call.files["README.md"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_diffusion_options(command, capsys):
    with pytest.raises(SystemExit) as error:
        main([command, "--help"])
    assert error.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines
    assert f"opdlm {command}" in text
    if command == "baseline" and not HAS_BASELINE:
        return
    expected = {
        "--block_size": "Block size",
        "--steps_per_block": "Denoising steps per block",
        "--threshold": "confidence exceeds",
    }
    if command in ("generate", "eval"):
        expected.update({"--confidence": "Confidence measure", "--temperature": "temperature", "--max_new_tokens": ""})
    if command == "train":
        expected.update({"--temperature": "", "--max_completion_length": "", "--dataset_name": ""})
    if command == "baseline":  # the SFT baseline decodes only for evaluation: its block size is what matters
        expected = {"--block_size": "", "--dataset_name": ""}
    for flag, help_fragment in expected.items():
        assert flag in text, flag
        assert help_fragment in text, help_fragment


@pytest.mark.parametrize("command", list(COMMANDS))
def test_unknown_flag_is_a_clear_error(command, saved, capsys):
    required = {
        "generate": ["--model_name_or_path", str(saved), "--prompt", "x"],
        "eval": ["--model_name_or_path", str(saved), "--dataset_name", "x"],
        "push": ["--model_name_or_path", str(saved), "--repo_id", "user/x"],
    }.get(command, [])
    with pytest.raises(SystemExit) as error:
        main([command, *required, "--not_a_flag", "3"])
    assert error.value.code == 2
    err = capsys.readouterr().err
    if command == "baseline" and not HAS_BASELINE:
        assert "baseline" in err
    else:
        assert "unrecognized arguments: --not_a_flag" in err
    # abbreviations are not accepted either
    if command == "generate":
        with pytest.raises(SystemExit):
            main([command, *required, "--block", "4"])
        assert "--block" in capsys.readouterr().err


def test_top_level_usage(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_generate_needs_a_prompt(saved, capsys):
    with pytest.raises(SystemExit) as error:
        main(["generate", "--model_name_or_path", str(saved)])
    assert error.value.code == 2 and "no prompt" in capsys.readouterr().err


def test_example_script_parser():
    """examples/scripts/opdlm.py parses OPDLMConfig flags like the CLI (TRL-style script)."""
    spec = importlib.util.spec_from_file_location("opdlm_example", REPO_ROOT / "examples" / "scripts" / "opdlm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.make_parser(prog="opdlm.py")
    script_args, training_args, model_args = parser.parse_args_and_config(
        ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o", "--block_size", "8",
         "--steps_per_block", "8", "--max_prompt_length", "16", "--use_cpu"]
    )  # fmt: skip
    assert training_args.block_size == 8 and model_args.model_name_or_path == "m" and script_args.dataset_name == "d"
