"""Shared test setup: offline hub access and tiny-model fixtures (per-file fixtures live in their own files)."""

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from gradual.tiny import tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tok():
    """One byte-level tiny tokenizer for the session (treat as read-only)."""
    return tiny_tokenizer()


@pytest.fixture
def make_tiny():
    """Factory: `make_tiny("gemma3", num_layers=6)` builds a fresh, seeded tiny random model."""

    def make(arch: str, num_layers: int = 4, seed: int = 0):
        return tiny_model(arch, num_layers=num_layers, seed=seed)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from more threads, and on a shared machine extra threads only spin."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """bitsandbytes creates 4-bit layers as on a CPU with avx512_bf16 (whose eval forwards would repack them unless
    gradual pins them), so the guarantees about 4-bit layers are tested on every CPU; on such a CPU it changes
    nothing."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
