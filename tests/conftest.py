import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

from opdlm_trl.testing import make_model, make_tokenizer  # noqa: E402


torch.set_num_threads(1)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_dlm():
    """A converted tiny Qwen3 (hidden 32, 2 layers) and its tokenizer."""
    from opdlm_trl import convert_to_dlm

    tok = make_tokenizer()
    model = make_model("qwen3", vocab_size=len(tok))
    return convert_to_dlm(model, tok, block_size=4)
