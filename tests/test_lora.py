"""LoRA / QLoRA: targets, exact merges, repeated attach/merge around surgery, CPU QLoRA training, 4-bit layers that
no forward changes, optimizer."""

import copy
import subprocess
import sys
import weakref
from collections.abc import Callable

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.bnb import Linear4bit as Lora4bit
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from gradual.errors import UsageError
from gradual.lora import (
    LoraSettings,
    attach_lora,
    default_target_modules,
    dequantize,
    disable_cpu_repacking,
    merge_lora,
    quantize_nf4,
)
from gradual.models import load_model, save_model
from gradual.surgery import ORIGINAL_LAYERS_KEY, decoder_layers, remove_layers
from gradual.tiny import tiny_model

EXPECTED_TARGETS = {
    "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
    "gpt_neox": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
}
PER_LAYER = {"llama": 7, "gpt2": 4, "gpt_neox": 4}  # GPT-2 has two modules named c_proj


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(10, 250, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


def _train(model: PeftModel, ids: torch.Tensor, steps: int = 4) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _lora_paths(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("arch", sorted(EXPECTED_TARGETS))
def test_default_targets_are_the_decoder_projections_only(arch):
    model = tiny_model(arch, num_layers=2)
    assert default_target_modules(model) == EXPECTED_TARGETS[arch]
    peft_model = attach_lora(model)
    layer_modules = {id(m) for m in decoder_layers(peft_model).modules()}
    adapted = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    assert len(adapted) == 2 * PER_LAYER[arch]
    assert all(id(m) in layer_modules for m in adapted)
    assert not isinstance(peft_model.get_output_embeddings(), LoraLayer)
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    if arch == "gpt2":
        assert all(isinstance(m.get_base_layer(), Conv1D) and m.fan_in_fan_out for m in adapted)


def test_a_same_named_projection_outside_the_layers_is_not_adapted():
    model = tiny_model("llama", num_layers=2)
    model.model.q_proj = nn.Linear(64, 64)  # as if an architecture had one outside its decoder layers
    adapted = _lora_paths(attach_lora(model))
    assert len(adapted) == 2 * 7 and not any(p.endswith("model.model.q_proj") for p in adapted)


def test_bad_settings_and_targets_are_usage_errors():
    with pytest.raises(UsageError, match="lm_head"):
        attach_lora(tiny_model("llama", num_layers=2), LoraSettings(target_modules=["lm_head"]))
    with pytest.raises(UsageError, match="r=0"):
        LoraSettings(r=0)
    with pytest.raises(UsageError, match="dropout=1.5"):
        LoraSettings(dropout=1.5)
    only_q = attach_lora(tiny_model("llama", num_layers=2), LoraSettings(target_modules=["q_proj"]))
    assert [p.rsplit(".", 1)[-1] for p in _lora_paths(only_q)] == ["q_proj", "q_proj"]
    with pytest.raises(TypeError, match="merge_lora"):
        attach_lora(only_q)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_gives_the_adapter_logits_in_a_plain_model(arch):
    ids = _ids()
    model = tiny_model(arch, num_layers=2)
    base = _logits(model, ids)
    peft_model = attach_lora(model, LoraSettings(r=8, dropout=0.05))
    assert torch.allclose(_logits(peft_model, ids), base, atol=1e-6)  # B starts at zero
    _train(peft_model, ids)
    adapted = _logits(peft_model, ids)
    merged = merge_lora(peft_model)
    assert isinstance(merged, PreTrainedModel) and not isinstance(merged, PeftModel)
    assert not _lora_paths(merged) and not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(_logits(merged, ids), adapted, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-2


def test_repeated_attach_train_merge_around_layer_removal():
    ids = _ids(1)
    model = tiny_model("llama", num_layers=4)
    for cycle in range(3):
        peft_model = attach_lora(model, LoraSettings(r=4, dropout=0.0))
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        assert len(trainable) == 2 * 7 * (4 - cycle)
        before = _logits(peft_model, ids)
        _train(peft_model, ids, steps=2)
        adapted = _logits(peft_model, ids)
        model = merge_lora(peft_model)
        assert torch.allclose(_logits(model, ids), adapted, atol=1e-5)
        assert (adapted - before).abs().max() > 1e-3
        remove_layers(model, [1])
    assert getattr(model.config, ORIGINAL_LAYERS_KEY) == [0]
    assert model.config.num_hidden_layers == 1 and not _lora_paths(model)


@pytest.fixture
def nf4_model(avx512bf16_cpu):
    return load_model("tiny:llama", quantize="nf4")


def _all_lora_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def test_qlora_trains_on_cpu_after_an_eval_forward(nf4_model):
    ids = _ids(2)
    peft_model = attach_lora(nf4_model, LoraSettings(r=4))
    q_layers = [m for m in peft_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(q_layers) == 4 * 7 and not any(m.support_avx512bf16_for_cpu for m in q_layers)
    _logits(peft_model, ids)  # eval-mode forward: where bitsandbytes would repack on an avx512_bf16 CPU
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = _all_lora_grads(peft_model)
    assert len(grads) == 2 * 4 * 7 and all(g is not None for g in grads.values())
    assert all(g.abs().max() > 0 for n, g in grads.items() if "lora_B" in n)  # A's grad is 0 while B == 0


def test_already_repacked_weights_are_restored(nf4_model):
    """The repack itself is plain torch, so its undo is checked on any CPU (only the repacked matmul needs avx512)."""
    layers = [m for m in nf4_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = [(m.weight.data.clone(), dequantize_4bit(m.weight.data, m.weight.quant_state)) for m in layers]
    for m in layers:
        m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
    assert disable_cpu_repacking(nf4_model) == len(layers)
    for m, (codes, weight) in zip(layers, before, strict=True):
        assert not m.weight.quant_state.packing_format_for_cpu
        assert torch.equal(m.weight.data, codes)
        # bitsandbytes' repack stores the block scales in bfloat16, so they come back rounded (< 1% of the range)
        restored = dequantize_4bit(m.weight.data, m.weight.quant_state)
        assert (restored - weight).abs().max() < 0.01 * weight.abs().max()


def test_quantize_and_dequantize_round_trip():
    ids = _ids(5)
    for arch, plain_type in (("llama", nn.Linear), ("gpt2", Conv1D)):
        model = tiny_model(arch, num_layers=2)
        fp = _logits(model, ids)
        quantize_nf4(model)
        q_layers = [m for m in decoder_layers(model).modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(q_layers) == 2 * PER_LAYER[arch]
        assert type(model.get_output_embeddings()) is nn.Linear
        quantized = _logits(model, ids)
        assert (quantized - fp).abs().max() > 1e-3  # NF4 rounds
        dequantize(model, torch.float32)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        assert all(type(m) is plain_type for m in decoder_layers(model).modules()
                   if isinstance(m, (nn.Linear, Conv1D)))
        # a Linear4bit computing in fp32 is de-quantise + matmul, so the de-quantised model gives the same logits
        assert torch.allclose(_logits(model, ids), quantized, atol=1e-4)


def _q_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _layer_state(layer: nn.Module) -> dict[str, object]:
    """Everything a 4-bit layer computes from: packed codes, block scales (nested: their codes, scales and offset),
    the layout flags, and the bias."""
    qs = layer.weight.quant_state
    state: dict[str, object] = {"codes": layer.weight.data, "absmax": qs.absmax, "code": qs.code,
                                "meta": (qs.dtype, qs.nested, tuple(qs.shape), qs.blocksize, qs.quant_type,
                                         getattr(qs, "packing_format_for_cpu", False))}
    if qs.nested:
        state.update(offset=qs.offset, absmax2=qs.state2.absmax, code2=qs.state2.code)
    if layer.bias is not None:
        state["bias"] = layer.bias.data
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _assert_same_state(before: dict[str, object], after: dict[str, object]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == after[key].dtype and torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


def _every_kind_of_forward(model: nn.Module, ids: torch.Tensor) -> None:
    """Eval and train forwards, with and without grad, backward where there is a graph."""
    embeddings = model.get_input_embeddings()
    for training in (False, True, False):
        model.train(training)
        with torch.no_grad():
            model(input_ids=ids)  # eval + no grad: where bitsandbytes repacks on an avx512_bf16 CPU
        inputs = embeddings(ids).detach().requires_grad_()
        model(inputs_embeds=inputs, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()


NF4_BUILDS: dict[str, Callable[[], nn.Module]] = {
    "loader": lambda: load_model("tiny:llama", quantize="nf4"),
    "loader_bf16_biases": lambda: load_model("tiny:qwen2", dtype="bfloat16", quantize="nf4"),
    "quantize_nf4": lambda: quantize_nf4(tiny_model("gpt2", num_layers=2)),
    "attached": lambda: attach_lora(load_model("tiny:llama", quantize="nf4"), LoraSettings(r=4)),
    "merge_requantize": lambda: merge_lora(attach_lora(quantize_nf4(tiny_model("llama", num_layers=2))),
                                           requantize=True),
}


@pytest.mark.parametrize("build", sorted(NF4_BUILDS))
def test_no_forward_changes_a_4bit_layer(build, avx512bf16_cpu):
    """Every way gradual makes 4-bit layers: after any forwards each computes dequant(W4) @ x + b, bits unchanged."""
    assert bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu  # the fixture took effect: layers start repackable
    model = NF4_BUILDS[build]()
    layers = _q_layers(model)
    assert layers
    before = [_layer_state(m) for m in layers]
    _every_kind_of_forward(model, _ids(7))
    generator = torch.Generator().manual_seed(0)
    for layer, state in zip(layers, before, strict=True):
        compute = layer.compute_dtype
        in_compute = copy.copy(layer.weight.quant_state)  # de-quantise straight into the compute dtype
        in_compute.dtype = compute
        weight = dequantize_4bit(layer.weight.data, in_compute)
        bias = None if layer.bias is None else layer.bias.to(compute)
        for rows in (1, 3):  # bitsandbytes takes another kernel for a single row
            x = torch.randn(rows, layer.in_features, generator=generator).to(model.dtype)
            with torch.no_grad():
                out = layer(x)
            torch.testing.assert_close(out, nn.functional.linear(x.to(compute), weight, bias).to(x.dtype))
        _assert_same_state(state, _layer_state(layer))


@pytest.mark.parametrize("name,dtype", [("tiny:llama", "float32"), ("tiny:qwen2", "bfloat16")])
def test_a_dequantised_save_after_eval_forwards_is_a_fresh_dequantisation(name, dtype, avx512bf16_cpu, tmp_path):
    model = load_model(name, dtype=dtype, quantize="nf4")
    for seed in range(2):
        _logits(model, _ids(seed))
    save_model(dequantize(model), None, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    fresh = dequantize(load_model(name, dtype=dtype, quantize="nf4")).state_dict()
    assert saved.keys() == fresh.keys()
    assert all(saved[k].dtype == fresh[k].dtype and torch.equal(saved[k], fresh[k]) for k in saved)


def test_a_4bit_merge_holds_one_layer_update_at_a_time(nf4_model, monkeypatch):
    """peft computes each adapter update in float32 (an 8B model's would take ~28 GB at once): merge_lora folds each
    into its layer, and frees it, before it asks for the next."""
    ids = _ids(8)
    peft_model = attach_lora(nf4_model, LoraSettings(r=4, dropout=0.0))
    _train(peft_model, ids, steps=2)
    adapted = _logits(peft_model, ids)
    get_delta_weight = Lora4bit.get_delta_weight

    def adapters() -> int:
        return sum(isinstance(m, LoraLayer) for m in peft_model.modules())

    total, alive, calls = adapters(), [0], []

    def tracked(self: Lora4bit, adapter: str) -> torch.Tensor:
        calls.append((alive[0], total - adapters()))  # (updates still alive, layers already folded)
        delta = get_delta_weight(self, adapter)
        alive[0] += 1
        weakref.finalize(delta, lambda: alive.__setitem__(0, alive[0] - 1))
        return delta

    monkeypatch.setattr(Lora4bit, "get_delta_weight", tracked)
    merged = merge_lora(peft_model)
    assert total == 4 * 7 and calls == [(0, k) for k in range(total)] and alive == [0]
    assert (_logits(merged, ids) - adapted).abs().max() < 1e-4


def test_float_paths_never_import_bitsandbytes():
    """bitsandbytes (imported by peft) costs seconds and prints a CPU-kernel notice on some CPUs; commands that
    use no adapter and no 4-bit layer must not load it."""
    code = ("import sys; import gradual.cli, gradual.lightning_cli, gradual.module, gradual.callbacks, gradual.lora\n"
            "from gradual import importance, models\n"
            "model = models.load_model('tiny:llama')\n"
            "tok = models.load_tokenizer('tiny:llama')\n"
            "batches = importance.calibration_batches(tok, ['a b c', 'd e f'], batch_size=2, max_length=16)\n"
            "importance.score_layers(model, batches, 'block_influence')\n"
            "assert 'bitsandbytes' not in sys.modules and 'peft' not in sys.modules, 'imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_the_bitsandbytes_kernel_notice_is_not_shown():
    """On an avx512_bf16 CPU bitsandbytes announces at import that the CPU kernel of its repacked layout is missing;
    gradual never uses that layout, so the line is not the user's. Emulated here on any CPU by answering
    bitsandbytes' CPU-feature check with True while it imports."""
    code = """
import importlib.abc, sys

class AsOnAvx512bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "bitsandbytes.backends.cpu.ops":
            sys.modules["bitsandbytes.functional"].has_avx512bf16 = lambda: True
        return None

sys.meta_path.insert(0, AsOnAvx512bf16())
if sys.argv[1] == "plain":
    import bitsandbytes
else:
    from gradual.lora import attach_lora, merge_lora
    from gradual.models import load_model
    from gradual.tiny import tiny_model
    merge_lora(attach_lora(tiny_model("llama", num_layers=1)))
    load_model("tiny:llama:1", quantize="nf4")
"""
    def stderr(mode: str) -> str:
        proc = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    if "gemm_4bit_forward" not in stderr("plain"):
        pytest.skip("this bitsandbytes prints no CPU-kernel notice at import")
    assert "gemm_4bit_forward" not in stderr("gradual")


def test_a_requantised_model_gets_peft_4bit_lora_layers():
    """peft picks its 4-bit LoRA layer only for models flagged as loaded in 4 bits."""
    from peft.tuners.lora.bnb import Linear4bit as Lora4bit

    peft_model = attach_lora(quantize_nf4(tiny_model("llama", num_layers=2)), LoraSettings(r=4))
    adapted = [m for m in peft_model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert adapted and all(isinstance(m, Lora4bit) for m in adapted)


def test_merge_into_4bit_base_goes_through_a_dequantised_copy(nf4_model, tmp_path):
    ids = _ids(6)
    fp_error = (_logits(nf4_model, ids) - _logits(tiny_model("llama"), ids)).abs().max()
    remove_layers(nf4_model, [2])
    peft_model = attach_lora(nf4_model, LoraSettings(r=4, dropout=0.0))
    _train(peft_model, ids)
    adapted = _logits(peft_model, ids)

    naive = copy.deepcopy(peft_model).merge_and_unload()  # peft's own 4-bit merge re-rounds base + delta
    naive_error = (_logits(naive, ids) - adapted).abs().max()

    merged = merge_lora(peft_model)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert not hasattr(merged.config, "quantization_config")
    assert getattr(merged.config, ORIGINAL_LAYERS_KEY) == [0, 1, 3]
    merged_logits = _logits(merged, ids)
    assert (merged_logits - adapted).abs().max() < 1e-4 < naive_error

    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(reloaded.config, ORIGINAL_LAYERS_KEY) == [0, 1, 3]
    assert torch.allclose(_logits(reloaded, ids), merged_logits, atol=1e-6)

    requantized = quantize_nf4(merged)  # for the next QLoRA stage: a fresh, lossy NF4 rounding
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in requantized.modules()) == 3 * 7
    requantized_error = (_logits(requantized, ids) - merged_logits).abs().max()
    assert 1e-4 < requantized_error < 2 * fp_error
    cycle = merge_lora(attach_lora(requantized), requantize=True)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in cycle.modules()) == 3 * 7
    half = merge_lora(attach_lora(cycle), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert torch.isfinite(_logits(half, ids).float()).all()
