"""Saving, publishing and loading diffusion LMs (`opdlm_trl.hub`, `opdlm_trl.a2d`).

One subprocess (a fresh, isolated Python where `opdlm_trl` cannot be imported) loads the saved folder and the folder
that `push_to_hub` uploaded, checks greedy decoding, block-causal attention and runs the model cards' usage snippets.
"""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

import opdlm_trl
from opdlm_trl import causal_attention, convert_to_dlm, is_dlm
from opdlm_trl import hub as hub_module
from opdlm_trl.a2d import a2d_base_model_type, a2d_to_causal_config, find_mask_token, is_a2d_config
from opdlm_trl.hub import (
    CITATION,
    MODEL_CARD_TEMPLATE,
    build_model_card,
    custom_generate_files,
    detect_format,
    load_dlm,
    push_folder_to_hub,
    push_to_hub,
    save_dlm,
    usage_snippet,
)
from opdlm_trl.testing import make_model, make_tokenizer


REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "opdlm-test/tiny-dlm"
PROMPTS = ["12+3=", "a", "hello world"]
MAX_NEW_TOKENS = 8
CARD_KWARGS = dict(
    base_model="Qwen/Qwen3-0.6B",
    teacher_model="Qwen/Qwen3-4B",
    training_tokens=76_000_000,
    dataset_name="trl-lib/prompts",
    hyperparameters={"learning_rate": 1e-5, "block_size": 4, "divergence": "forward_kl"},
    eval_results={"GSM8K": {"accuracy": 87.1, "tokens/forward": 1.0}, "MATH-500": {"accuracy": 71.2}},
    license="apache-2.0",
    example_prompt="12+3=",
    max_new_tokens=MAX_NEW_TOKENS,
)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"


class FakeHfApi:
    """Records `create_repo` / `upload_folder` and keeps a copy of every uploaded folder (symlinks followed)."""

    calls: list = []
    uploads: Path | None = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = sorted(
            filter_repo_objects(
                [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()],
                ignore_patterns=ignore_patterns,
            )
        )
        dest = self.uploads / f"upload-{len(self.calls)}"
        for name in files:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, dest / name)
        self.calls.append(
            ("upload_folder", repo_id, {"files": files, "commit_message": commit_message, "copy": dest, **kwargs})
        )
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0")


@pytest.fixture(scope="module")
def dlm():
    tok = make_tokenizer()
    model = make_model("qwen3", vocab_size=len(tok))
    return convert_to_dlm(model, tok, block_size=4)


@pytest.fixture(scope="module")
def reference_outputs(dlm):
    """Greedy completions of the in-memory model (batched, left-padded)."""
    model, tok = dlm
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    return model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS).tolist()


@pytest.fixture(scope="module")
def saved(dlm, tmp_path_factory):
    model, tok = dlm
    return Path(save_dlm(model, tok, tmp_path_factory.mktemp("saved") / "tiny-dlm", repo_id=REPO_ID, **CARD_KWARGS))


@pytest.fixture(scope="module")
def saved_chat(dlm, tmp_path_factory):
    """Same model, tokenizer with a chat template (the card's snippet then uses it); saved without a repo id."""
    model, tok = dlm
    chat_tok = make_tokenizer()
    chat_tok.mask_token = tok.mask_token
    chat_tok.chat_template = CHAT_TEMPLATE
    return Path(save_dlm(model, chat_tok, tmp_path_factory.mktemp("saved_chat") / "chat-dlm", example_prompt="1+1"))


@pytest.fixture(scope="module")
def pushed(dlm, tmp_path_factory):
    """`push_to_hub` with a recording HfApi: the calls and a copy of the uploaded folder."""
    model, tok = dlm
    FakeHfApi.calls = []
    FakeHfApi.uploads = tmp_path_factory.mktemp("uploads")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub_module, "HfApi", FakeHfApi)
        result = push_to_hub(model, tok, REPO_ID, private=True, commit_message="Add tiny DLM", **CARD_KWARGS)
    # save_dlm of the same in-memory state, right after the push: other tests of the module use the shared model and
    # tokenizer (a padded call changes what a fast tokenizer saves), so an earlier `saved` folder may differ.
    reference = save_dlm(model, tok, tmp_path_factory.mktemp("reference") / "tiny-dlm", repo_id=REPO_ID, **CARD_KWARGS)
    return SimpleNamespace(calls=list(FakeHfApi.calls), result=result, reference=Path(reference))


FRESH_PROCESS_CHECK = r"""
import sys
sys.modules["opdlm_trl"] = None  # the folder's code must not need the library
import contextlib, io, json, functools
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folders, snippets, prompts, max_new_tokens = json.loads(sys.argv[1])
results = {"folders": {}, "snippets": []}
for folder in folders:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])  # blocks (end-aligned, b=4): [0,1] [2..5] [6..9]
    changed = ids.clone()
    changed[0, -1] = 20
    with torch.no_grad():
        a, b = model(input_ids=ids).logits[0], model(input_ids=changed).logits[0]
    results["folders"][folder] = {
        "generate_module": model.generate.func.__module__ if isinstance(model.generate, functools.partial) else None,
        "sequences": out.tolist(),
        "earlier_blocks_unchanged": bool(torch.allclose(a[:6], b[:6], atol=1e-6)),
        "same_block_changed": bool(not torch.allclose(a[6:9], b[6:9], atol=1e-4)),
        "mask_token": tok.mask_token,
        "padding_side": tok.padding_side,
        "block_size": model.config.dlm_block_size,
    }
for snippet in snippets:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(snippet, "<model card snippet>", "exec"), {"__name__": "__main__"})
    results["snippets"].append(stdout.getvalue())
results["opdlm_trl_imported"] = sys.modules.get("opdlm_trl") is not None
print("RESULTS=" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def fresh_process(saved, saved_chat, pushed, tmp_path_factory):
    """Runs FRESH_PROCESS_CHECK once, in `python -I` from a directory outside the repository."""
    work = tmp_path_factory.mktemp("fresh")
    script = work / "check.py"
    script.write_text(FRESH_PROCESS_CHECK)
    uploaded = str(pushed.calls[-1][2]["copy"])
    snippets = [
        usage_snippet((saved / "README.md").read_text()).replace(REPO_ID, str(saved)),
        usage_snippet((saved_chat / "README.md").read_text()),  # saved locally: the snippet loads the folder as is
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(work / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    payload = json.dumps([[str(saved), uploaded], snippets, PROMPTS, MAX_NEW_TOKENS])
    proc = subprocess.run(
        [sys.executable, "-I", str(script), payload], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULTS="))
    return SimpleNamespace(saved=str(saved), uploaded=uploaded, **json.loads(line[len("RESULTS=") :]))


# ----------------------------------------------------------------------------------------------------------------------
# The saved folder
# ----------------------------------------------------------------------------------------------------------------------


def test_saved_folder_layout(saved, dlm):
    model, tok = dlm
    names = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "custom_generate/generate.py",
        "custom_generate/attention.py",
        "custom_generate/sampler.py",
        "custom_generate/requirements.txt",
    ):
        assert name in names
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["dlm_block_size"] == 4 and config["dlm_attention"] == "block_causal"
    assert config["mask_token_id"] == tok.mask_token_id
    assert "auto_map" not in config  # a normal folder of the base architecture
    generation = json.loads((saved / "generation_config.json").read_text())
    assert generation["block_size"] == 4 and generation["steps_per_block"] == 4
    assert generation["threshold"] is None and generation["confidence"] == "probability"
    assert generation["mask_token_id"] == tok.mask_token_id
    assert json.loads((saved / "tokenizer_config.json").read_text())["padding_side"] == "left"


def test_folder_code_is_the_library_code(saved):
    """attention.py / sampler.py are byte-identical copies: the published behaviour cannot drift."""
    for name in ("attention.py", "sampler.py"):
        assert (saved / "custom_generate" / name).read_bytes() == (Path(opdlm_trl.__file__).parent / name).read_bytes()
    assert (
        custom_generate_files()["custom_generate/generate.py"] == (saved / "custom_generate/generate.py").read_text()
    )


def test_folder_code_imports_only_torch_and_transformers(saved):
    allowed = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
    for path in (saved / "custom_generate").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"
    assert "opdlm_trl" not in (saved / "custom_generate" / "generate.py").read_text().split('"""')[-1]


def test_fresh_process_greedy_generate_matches_in_memory(fresh_process, reference_outputs):
    for folder in (fresh_process.saved, fresh_process.uploaded):
        result = fresh_process.folders[folder]
        assert result["generate_module"].startswith("transformers_modules.")  # the folder's custom_generate
        assert result["sequences"] == reference_outputs
        assert result["padding_side"] == "left"
        assert result["mask_token"] == "<|reserved_special_token_0|>"
    assert not fresh_process.opdlm_trl_imported


def test_fresh_process_forward_is_block_causal(fresh_process):
    for folder in (fresh_process.saved, fresh_process.uploaded):
        result = fresh_process.folders[folder]
        assert result["earlier_blocks_unchanged"]  # earlier blocks never see later ones
        assert result["same_block_changed"]  # bidirectional inside the block (a causal forward would not change)
        assert result["block_size"] == 4


def test_model_card_snippets_run_as_written(fresh_process, reference_outputs, dlm):
    _, tok = dlm
    plain, chat = fresh_process.snippets
    lines = plain.splitlines()
    assert len(lines) == 3 and lines[2].endswith("tokens per forward")
    # The first line is the greedy completion of "12+3=" (PROMPTS[0]) decoded as the snippet does.
    completion = tok.decode(torch.tensor(reference_outputs[0])[-MAX_NEW_TOKENS:], skip_special_tokens=True)
    assert lines[0] == completion
    assert chat.strip().endswith("tokens per forward")


def test_load_dlm_reads_our_format_without_remote_code(saved, dlm, reference_outputs):
    model, tok = load_dlm(saved)
    assert detect_format(str(saved)) == "opdlm"
    assert is_dlm(model) and model.config.dlm_block_size == 4
    assert model.generate.func.__module__ == "opdlm_trl.sampler"
    assert tok.mask_token == dlm[1].mask_token and tok.padding_side == "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS).tolist() == reference_outputs


def test_generation_defaults_are_honoured(dlm, tmp_path):
    """Diffusion defaults saved in generation_config.json drive `.generate()` of the loaded model."""
    from opdlm_trl.sampler import diffusion_generate

    model, tok = dlm
    save_dlm(model, tok, tmp_path / "m", model_card=False, steps_per_block=2, threshold=0.5, confidence="margin")
    generation = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert (generation["steps_per_block"], generation["threshold"], generation["confidence"]) == (2, 0.5, "margin")
    assert generation["_from_model_config"] is False
    loaded, _ = load_dlm(tmp_path / "m")
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    out = loaded.generate(**enc, max_new_tokens=12, return_dict_in_generate=True)
    expected = diffusion_generate(
        model,
        enc.input_ids,
        enc.attention_mask,
        max_new_tokens=12,
        steps_per_block=2,
        threshold=0.5,
        confidence="margin",
    )
    assert torch.equal(out.sequences, expected.sequences) and out.nfe == expected.nfe
    assert getattr(model.generation_config, "threshold", None) is None  # the in-memory model is not modified


def test_save_dlm_rejects_unconverted_and_causal_mode(dlm, tmp_path):
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="convert_to_dlm"):
        save_dlm(make_model("qwen3", vocab_size=len(tok)), tok, tmp_path / "x")
    model, tok = dlm
    with causal_attention(model), pytest.raises(RuntimeError, match="causal_attention"):
        save_dlm(model, tok, tmp_path / "y")


def test_save_dlm_merges_peft_adapters(dlm, tmp_path):
    peft = pytest.importorskip("peft")
    import copy

    model, tok = dlm
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a non-trivial adapter
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
    save_dlm(lora, tok, tmp_path / "merged", model_card=False)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    loaded, _ = load_dlm(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------------


def test_model_card_content(saved):
    text = (saved / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.base_model == "Qwen/Qwen3-0.6B" and card.data.license == "apache-2.0"
    assert {"opdlm", "diffusion-lm", "custom_generate"} <= set(card.data.tags)
    assert card.data.datasets == ["trl-lib/prompts"]
    assert "2606.06712" in text and CITATION in text
    assert "Data-Efficient Autoregressive-to-Diffusion Language Models via On-Policy Distillation" in text
    assert "| Block size | 4 |" in text
    assert "`<\\|reserved_special_token_0\\|>` (id 2)" in text  # pipes escaped inside the table
    assert "| Teacher | Qwen/Qwen3-4B |" in text
    assert "76,000,000 (0.076B)" in text
    assert "| `learning_rate` | 1e-05 |" in text and "| `divergence` | forward_kl |" in text
    assert "| Benchmark | accuracy | tokens/forward |" in text
    assert "| GSM8K | 87.1 | 1 |" in text and "| MATH-500 | 71.2 |  |" in text
    assert f'model_id = "{REPO_ID}"' in text and "trust_remote_code=True" in text


def test_model_card_without_optional_fields(dlm):
    model, tok = dlm
    text = str(build_model_card(model, tok, method="converted"))
    assert "## Evaluation" not in text and "Hyper-parameters" not in text and "Training tokens" not in text
    assert "the base model (self-distillation)" in text and "not trained yet" in text
    assert 'model_id = "model-dlm"' in text
    with pytest.raises(ValueError, match="method"):
        build_model_card(model, tok, method="nope")


def test_model_card_template_is_package_data():
    assert MODEL_CARD_TEMPLATE.is_file() and MODEL_CARD_TEMPLATE.parent.parent == Path(opdlm_trl.__file__).parent
    pointer = (REPO_ROOT / "model_cards" / "README.md").read_text()
    assert "opdlm_trl/templates/model_card.md.jinja" in pointer


# ----------------------------------------------------------------------------------------------------------------------
# Publishing
# ----------------------------------------------------------------------------------------------------------------------


def test_push_to_hub_calls(pushed):
    saved = pushed.reference
    (create, repo_id, create_kwargs), (upload, upload_repo, upload_kwargs) = pushed.calls
    assert (create, repo_id) == ("create_repo", REPO_ID)
    assert create_kwargs["private"] is True and create_kwargs["exist_ok"] is True
    assert (upload, upload_repo) == ("upload_folder", REPO_ID)
    assert upload_kwargs["commit_message"] == "Add tiny DLM"
    saved_files = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file())
    assert upload_kwargs["files"] == saved_files  # the same folder as save_dlm
    copy = upload_kwargs["copy"]
    for name in saved_files:
        if name != "README.md":  # framework versions aside, the card is identical too
            assert (copy / name).read_bytes() == (saved / name).read_bytes(), name
    assert f'model_id = "{REPO_ID}"' in (copy / "README.md").read_text()
    assert pushed.result.commit_url.startswith(f"https://huggingface.co/{REPO_ID}")


def test_push_folder_points_the_card_at_the_repo(saved_chat, monkeypatch, tmp_path):
    FakeHfApi.calls, FakeHfApi.uploads = [], tmp_path
    monkeypatch.setattr(hub_module, "HfApi", FakeHfApi)
    push_folder_to_hub(saved_chat, "user/chat-dlm")
    _, repo_id, kwargs = FakeHfApi.calls[-1]
    assert repo_id == "user/chat-dlm" and kwargs["commit_message"] == hub_module.DEFAULT_COMMIT_MESSAGE
    readme = (kwargs["copy"] / "README.md").read_text()
    assert 'model_id = "user/chat-dlm"' in readme and str(saved_chat) not in readme
    assert (kwargs["copy"] / "model.safetensors").read_bytes() == (saved_chat / "model.safetensors").read_bytes()
    assert str(saved_chat) in (saved_chat / "README.md").read_text()  # the local folder is untouched
    with pytest.raises(ValueError, match="save_dlm"):
        push_folder_to_hub(tmp_path, "user/x")


# ----------------------------------------------------------------------------------------------------------------------
# The dLLM a2d format (the paper authors' released checkpoints)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def a2d_folder(tmp_path_factory):
    """A tiny checkpoint in the a2d layout: Qwen3 weights and keys, `model_type: a2d-qwen3`, remote code in auto_map,
    and a `<|MASK|>` token in the vocabulary that the tokenizer does not register as its mask token."""
    folder = tmp_path_factory.mktemp("a2d") / "Qwen3-tiny-a2d"
    tok = make_tokenizer(with_reserved=False)
    tok.add_tokens(["<|MASK|>"], special_tokens=True)
    assert tok.mask_token is None
    model = make_model("qwen3", vocab_size=len(tok) + 3, tie_word_embeddings=True)  # padded vocabulary, as Qwen3's
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="a2d-qwen3",
        architectures=["A2DQwen3LMHeadModel"],
        auto_map={
            "AutoConfig": "modeling_qwen3.A2DQwen3Config",
            "AutoModel": "modeling_qwen3.A2DQwen3LMHeadModel",
            "AutoModelForMaskedLM": "modeling_qwen3.A2DQwen3LMHeadModel",
        },
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "modeling_qwen3.py").write_text("raise RuntimeError('remote code must not run')\n")
    return folder, model.state_dict(), tok.convert_tokens_to_ids("<|MASK|>")


def test_a2d_config_mapping(a2d_folder):
    folder, _, _ = a2d_folder
    config_dict = json.loads((folder / "config.json").read_text())
    assert is_a2d_config(config_dict) and not is_a2d_config({"model_type": "qwen3"})
    assert a2d_base_model_type(config_dict) == "qwen3"
    config = a2d_to_causal_config(config_dict)
    assert type(config).__name__ == "Qwen3Config" and not hasattr(config, "auto_map")
    assert config.architectures == ["Qwen3ForCausalLM"] and config.tie_word_embeddings
    with pytest.raises(ValueError, match="causal LM"):
        a2d_base_model_type({"model_type": "a2d-notamodel"})
    assert detect_format(str(folder)) == "a2d"


def test_load_dlm_a2d(a2d_folder):
    folder, state_dict, mask_id = a2d_folder
    model, tok = load_dlm(folder)
    assert type(model).__name__ == "Qwen3ForCausalLM" and is_dlm(model)
    assert tok.mask_token == "<|MASK|>" and tok.mask_token_id == mask_id == model.config.mask_token_id
    assert model.config.dlm_block_size == 4  # absent from the checkpoint: the default
    assert model.get_input_embeddings().weight.shape[0] == state_dict["model.embed_tokens.weight"].shape[0]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state_dict[name], rtol=0, atol=0)
    assert find_mask_token(tok) == "<|MASK|>"
    # Sampling and greedy decoding from the loaded model.
    enc = tok(["12+3=", "ab"], return_tensors="pt", padding=True)
    greedy = model.generate(**enc, max_new_tokens=6)
    torch.manual_seed(0)
    sampled = model.generate(**enc, max_new_tokens=6, do_sample=True, temperature=1.0, return_dict_in_generate=True)
    assert greedy.shape == sampled.sequences.shape == (2, enc.input_ids.shape[1] + 6)
    assert not (sampled.sequences[:, -6:] == mask_id).any() and sampled.nfe > 0
    model8, _ = load_dlm(folder, block_size=8)
    assert model8.config.dlm_block_size == 8


def test_opdlm_trainer_accepts_a2d_model_and_saves_the_hub_layout(a2d_folder, tmp_path, monkeypatch):
    """The released-format model trains with OPDLMTrainer; save_model / push_to_hub write the diffusion-LM folder."""
    pytest.importorskip("opdlm_trl.trainer")
    from datasets import Dataset

    from opdlm_trl.config import OPDLMConfig
    from opdlm_trl.hub import DLMHubMixin
    from opdlm_trl.trainer import OPDLMTrainer

    folder, _, _ = a2d_folder
    model, tok = load_dlm(folder)
    model.train()
    # Until trainer.py inherits the mixin itself, add it here (same MRO as `class OPDLMTrainer(DLMHubMixin, ...)`).
    trainer_cls = OPDLMTrainer if issubclass(OPDLMTrainer, DLMHubMixin) else type("T", (DLMHubMixin, OPDLMTrainer), {})
    args = OPDLMConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=2,
        max_completion_length=8,
        max_prompt_length=16,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
    )
    dataset = Dataset.from_dict({"prompt": ["12+3=", "ab", "c", "dd"]})
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tok)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    assert (out / "custom_generate" / "generate.py").is_file()
    assert json.loads((out / "generation_config.json").read_text())["mask_token_id"] == tok.mask_token_id
    text = (out / "README.md").read_text()
    assert "| `max_completion_length` | 8 |" in text and "Training tokens" in text
    reloaded, reloaded_tok = load_dlm(out)
    assert reloaded_tok.mask_token == "<|MASK|>" and reloaded.config.dlm_block_size == 4

    # trainer.push_to_hub() uploads that folder (TRL/transformers path: `hf_api().upload_folder(output_dir)`).
    import transformers.trainer

    FakeHfApi.calls, FakeHfApi.uploads = [], tmp_path / "uploads"
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeHfApi())
    trainer.hub_model_id = "user/tiny-opdlm"
    trainer.push_to_hub(commit_message="End of training")
    _, repo_id, kwargs = FakeHfApi.calls[-1]
    assert repo_id == "user/tiny-opdlm" and kwargs["commit_message"] == "End of training"
    assert {"custom_generate/generate.py", "config.json", "generation_config.json", "README.md"} <= set(
        kwargs["files"]
    )
    assert 'model_id = "user/tiny-opdlm"' in (kwargs["copy"] / "README.md").read_text()
