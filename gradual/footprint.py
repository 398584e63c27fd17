"""What a `gradual fit` run needs per device before it runs: memory, disk and recovery tokens, from the model's
config alone (no weights loaded), so a 7-8B run that cannot fit its GPUs is refused in a second instead of failing
with an out-of-memory error an hour in (`gradual plan`, `gradual fit --plan`).

The estimate counts what a recovery step holds at its peak, term by term:
- the student's weights (float, or NF4 codes with their block scales), the teacher's, and a `recovery.teacher:
  previous` copy;
- the trainable weights (LoRA adapters, or full weights), their gradients and AdamW's two moments;
- the activations the backward pass keeps at `data.batch_size` x `data.max_length` (every example assumed to fill
  `max_length`: an upper bound), counted per saved tensor of a gated-MLP decoder layer (no gradient checkpointing:
  the project has none) — `layer_activation_bytes` lists them;
- the loss's logits: student and teacher logits (B x T x V), their masked copies, and the float32 soft-max of one
  `recovery.chunk_size` chunk, in the forward or in the backward pass, whichever is larger (`logits_bytes`);
and, at each stage's end, the merged student in `model.dtype` (a QLoRA student is de-quantised to merge and
evaluate) beside the teacher and the evaluation's KV cache. It is checked against measured peaks on CPU
(`tests/test_footprint.py`: resident memory of one step in a subprocess) and, on a GPU, by `scripts/gpu_check.py`
(`torch.cuda.max_memory_allocated`). Not counted: the CUDA context and allocator slack (~1-2 GiB; hence the 90%
margin of `check_fit`), lm-eval's own batches, vLLM's share (`gpu_memory_utilization`), and the recovery-data
generation, which runs before training with no student in memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from gradual import tiny
from gradual.errors import UsageError

GIB = 1024 ** 3
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size: one absmax per 64 weights
NF4_NESTED_BLOCK = 256  # double quantisation: the absmaxes quantised to 8 bits in blocks of 256, one fp32 scale each
FIT_MARGIN = 0.9  # a plan above 90% of a device is "tight": the CUDA context and fragmentation are not counted
EVAL_PROMPT_TOKENS = 1024  # assumed prompt length of an evaluation batch (few-shot or chat), for its KV cache
EVAL_NEW_TOKENS = 256  # assumed generation budget when the evaluation leaves it to each task

# Configs of the models the 7-8B configs name, as their hub repositories hold them (config.json, the fields that
# size the model), so `gradual plan` works offline without a download. A local folder or the Hugging Face cache
# wins over this table.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16"),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, tie_word_embeddings=False,
        rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=131072, use_sliding_window=False,
        max_window_layers=28, bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16"),
    "mistralai/Mistral-7B-Instruct-v0.3": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=32768, max_position_embeddings=32768,
        tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None,
        bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16"),
    "smollm2-135m-instruct": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
        rms_norm_eps=1e-5, rope_theta=100000.0, bos_token_id=1, eos_token_id=2, torch_dtype="float32"),
    "gemma3-270m": dict(  # as the alias's conversion writes it (five sliding-window layers to one full)
        model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, vocab_size=262144, max_position_embeddings=32768, sliding_window=512,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, rms_norm_eps=1e-6, bos_token_id=2,
        eos_token_id=1, pad_token_id=0, torch_dtype="float32"),
}


# ---------------------------------------------------------------------------------------------------------------
# The model's shape, from its config
# ---------------------------------------------------------------------------------------------------------------

def model_config(name: str, trust_remote_code: bool = False) -> tuple[PretrainedConfig, str]:
    """(config, where it came from) for a model name: `tiny:<arch>`, a local folder holding config.json, an offline
    alias (its converted folder, else the built-in table), a hub id in the local Hugging Face cache (or online,
    without HF_HUB_OFFLINE), else the built-in table of the 7-8B models the configs name (`BUILTIN_CONFIGS`). No
    weights are read.

    Raises:
        UsageError: the config is nowhere to be read; the line names the model and the ways to give one.
    """
    from gradual import models

    if name.startswith(tiny.TINY_PREFIX):
        return tiny.tiny_config(*tiny.parse_tiny(name)), "tiny model"
    if name in models.GGUF_ALIASES:
        folder = models.cache_dir() / "models"
        converted = sorted(folder.glob(f"{name}-*")) if folder.is_dir() else []
        if converted and (converted[-1] / "config.json").is_file():
            return AutoConfig.from_pretrained(converted[-1]), str(converted[-1])
        return _builtin(name), "built-in table"
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UsageError(f"model {name!r} is a folder without config.json; the plan reads the model's config")
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code), f"{name}/config.json"
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code), "Hugging Face cache or hub"
    except (OSError, ValueError):
        if name in BUILTIN_CONFIGS:
            return _builtin(name), "built-in table (no local copy)"
        raise UsageError(f"cannot read the config of model {name!r}: not a local folder, not in the Hugging Face "
                         f"cache{' (HF_HUB_OFFLINE is set)' if os.environ.get('HF_HUB_OFFLINE') else ''} and not in "
                         f"the built-in table ({', '.join(BUILTIN_CONFIGS)}); give a folder holding its config.json"
                         ) from None


def _builtin(name: str) -> PretrainedConfig:
    fields = dict(BUILTIN_CONFIGS[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


@dataclass(frozen=True)
class Linear:
    """A linear projection of a decoder layer: its leaf name and shape (in, out features)."""

    name: str
    fan_in: int
    fan_out: int


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimate needs, counted on the model built from its config on the meta device.

    Attributes:
        embedding: parameters of the input embedding; head: of the output head (0 when tied to the embedding).
        per_layer: parameters of one decoder layer; linear_per_layer: those in its linear projections (what NF4
            quantises); outside: every other parameter (final norm, ...).
        linears: one decoder layer's projections; norms: its normalisations of width `hidden`.
    """

    name: str
    source: str
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    embedding: int
    head: int
    per_layer: int
    linear_per_layer: int
    outside: int
    linears: tuple[Linear, ...]
    norms: int

    def parameters(self, layers: int | None = None) -> int:
        """All parameters with `layers` decoder layers (default: all)."""
        n = self.layers if layers is None else layers
        return self.embedding + self.head + self.outside + n * self.per_layer

    def lora_parameters(self, r: int, targets: Sequence[str] | None) -> int:
        """One decoder layer's LoRA parameters: r x (in + out) per adapted projection (`targets`: leaf names;
        None = every projection, as `gradual.lora` does)."""
        chosen = [lin for lin in self.linears if targets is None or lin.name in targets]
        return sum(r * (lin.fan_in + lin.fan_out) for lin in chosen)


def model_shape(name: str, trust_remote_code: bool = False) -> ModelShape:
    """The model's `ModelShape` from its config (`model_config`), counted on the meta device: nothing allocated."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from gradual.surgery import decoder_layers

    config, source = model_config(name, trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    layers = decoder_layers(meta)
    layer = layers[0]
    linears = []
    for path, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears.append(Linear(path.rsplit(".", 1)[-1], module.in_features, module.out_features))
        elif isinstance(module, Conv1D):
            linears.append(Linear(path.rsplit(".", 1)[-1], module.weight.shape[0], module.weight.shape[1]))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or text.n_embd)
    heads = int(getattr(text, "num_attention_heads", 0) or text.n_head)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    intermediate = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
                       or getattr(text, "ffn_dim", None) or 4 * hidden)
    embedding, head = meta.get_input_embeddings(), meta.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    per_layer = sum(p.numel() for p in layer.parameters())
    total = sum(p.numel() for p in meta.parameters())
    head_n = 0 if tied or head is None else head.weight.numel()
    norms = sum(1 for m in layer.modules()
                if not list(m.children()) and not isinstance(m, torch.nn.Linear | Conv1D)
                and sum(p.numel() for p in m.parameters(recurse=False)) in (hidden, 2 * hidden))
    return ModelShape(
        name=name, source=source, model_type=config.model_type, layers=len(layers), hidden=hidden,
        intermediate=intermediate, heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=embedding.weight.shape[0],
        embedding=embedding.weight.numel(), head=head_n, per_layer=per_layer,
        linear_per_layer=sum(lin.fan_in * lin.fan_out for lin in linears),
        outside=total - embedding.weight.numel() - head_n - len(layers) * per_layer, linears=tuple(linears),
        norms=max(norms, 2))


# ---------------------------------------------------------------------------------------------------------------
# The terms
# ---------------------------------------------------------------------------------------------------------------

def nf4_bytes(weights: int, double_quant: bool = True) -> float:
    """Bytes of `weights` in bitsandbytes NF4: half a byte each, plus one absmax per 64 weights (fp32, or with
    double quantisation one byte plus one fp32 scale per 256 blocks)."""
    blocks = weights / NF4_BLOCK
    scales = blocks * 1 + blocks / NF4_NESTED_BLOCK * 4 if double_quant else blocks * 4
    return weights / 2 + scales


def weight_bytes(shape: ModelShape, layers: int, dtype_bytes: int, quantize: str | None) -> float:
    """The model's weights with `layers` decoder layers: every parameter in `dtype_bytes`, or under `nf4` the
    decoder layers' projections in NF4 and the rest (embeddings, head, norms, biases) in the float dtype."""
    total = shape.parameters(layers)
    if quantize != "nf4":
        return total * dtype_bytes
    quantised = layers * shape.linear_per_layer
    return nf4_bytes(quantised) + (total - quantised) * dtype_bytes


def layer_activation_bytes(shape: ModelShape, act: int, lora: bool, dropout: float, targets: Sequence[str] | None,
                           mask: int = 1) -> dict[str, float]:
    """Bytes one decoder layer keeps for the backward pass per token, by what keeps them (`act`: bytes of an
    activation element). Counted for a gated-MLP layer (Llama, Mistral, Qwen2/3, Gemma, Phi3), no gradient
    checkpointing; other architectures are sized by the same tensors of their widths (approximate):

    - each norm keeps its input in float32 (the RMSNorm up-casts), 4 x hidden;
    - attention keeps q and k after RoPE, v, and its output, with k and v repeated to every query head (what
      transformers does whenever a padding mask is passed), plus a float32 log-sum-exp per head;
    - the MLP keeps gate, act(gate) and up (3 x intermediate);
    - a trained projection keeps its input: with LoRA dropout each adapted projection its own dropped copy and its
      mask (`mask` bytes an element: 1 for CUDA's fused dropout, a bool; `act` on CPU, where torch keeps the scaled
      noise in the input's dtype — measured), without dropout each distinct input once (q/k/v share one, gate/up
      share one); the adapters' rank-r intermediates are left out (r << widths).
    """
    hq = shape.heads * shape.head_dim
    parts = {
        "norm inputs (float32)": shape.norms * 4 * shape.hidden,
        "attention q, k, v, output": 4 * hq * act + 4 * shape.heads,
        "MLP gate, act(gate), up": 3 * shape.intermediate * act,
    }
    trained = [lin for lin in shape.linears if not lora or targets is None or lin.name in targets]
    if lora and dropout > 0:
        parts["LoRA dropout copies + masks"] = sum(lin.fan_in * (act + mask) for lin in trained)
    else:
        inputs = {lin.fan_in if lin.fan_in != shape.hidden else -1: lin.fan_in for lin in trained}
        # inputs of width hidden: q/k/v share the first norm's output and gate/up the second's
        hidden_inputs = min(2, sum(1 for lin in trained if lin.fan_in == shape.hidden))
        width = sum(v for k, v in inputs.items() if k != -1) + hidden_inputs * shape.hidden
        parts["inputs of trained projections"] = width * act
    return parts


def logits_bytes(batch: int, length: int, vocab: int, act: int, teacher_act: int, loss: str, chunk: int,
                 distils: bool) -> dict[str, float]:
    """Bytes the loss needs at its peak on a [batch, length] step, by phase ("forward", "backward"), every position
    counted (an upper bound: prompt tokens of pairs do not count in the loss).

    Forward: the student's logits (B x T x V), under `kd` the teacher's, their masked copies ([n, V]) and one chunk's
    float32 soft-maxes. Backward (`forward_kl` recomputes each chunk under checkpointing): the two masked copies, the
    gradient of the student's copy twice over (the accumulated buffer and the next chunk's) and the chunk's
    recomputation with its gradients. A chunk costs ~5 x chunk x V x 4 bytes at the peak (measured on CPU: the
    step's peak grows by 5.2 x chunk x V x 4 from chunk 128 to 1024). `sft`: the logits, then in float32 their
    log-soft-max, its gradient and the scattered gradient of the logits (~B x T x V x (act + 12)).
    """
    tokens = batch * length
    c = min(chunk, tokens)
    fwd = bwd = 0.0
    if loss in ("kd", "kd+sft") and distils:
        fwd = tokens * vocab * 2 * (act + teacher_act) + 5 * c * vocab * 4
        bwd = tokens * vocab * (act + teacher_act + 2 * act) + 5 * c * vocab * 4
    if loss in ("sft", "kd+sft") or not distils:
        sft = tokens * vocab * (act + 3 * 4)
        fwd, bwd = fwd + sft, bwd + sft
    return {"forward": fwd, "backward": bwd}


# ---------------------------------------------------------------------------------------------------------------
# The settings the estimate reads, and the estimate
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSettings:
    """What of a `gradual fit` config sizes a run (`settings_from_config` reads them from a parsed config).

    Attributes:
        dtype: `model.dtype`; act_dtype: the activations' dtype (bfloat16 under bf16 precision);
        quantize: `model.quantize`; params: `recovery.params`; loss: `recovery.loss`; distils: whether an
        ordinary batch asks the teacher; teacher: `original`, `previous` or None (no teacher loaded);
        teacher_dtype / teacher_quantize: the original teacher's; chunk: `recovery.chunk_size`;
        plan: (layers removed, steps) per stage; batch, length, accumulate: `data.batch_size`, `data.max_length`
        (capped at the model's positions), `trainer.accumulate_grad_batches`; processes: DDP/FSDP ranks in all;
        sharded: FSDP (`ModelParallelStrategy`): the student's weights, gradients and optimizer state split over
        the ranks; keep: `StageCheckpoint.keep`; eval_batch / eval_new_tokens: the largest evaluation batch and
        its generation budget.
    """

    dtype: str = "float32"
    act_dtype: str = "float32"
    quantize: str | None = None
    params: str = "lora"
    lora_r: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] | None = None
    loss: str = "sft"
    distils: bool = False
    teacher: str | None = None
    teacher_dtype: str = "float32"
    teacher_quantize: str | None = None
    final_teacher: bool = False
    chunk: int = 1024
    plan: tuple[tuple[int, int], ...] = ((1, 1),)
    batch: int = 8
    length: int = 256
    accumulate: int = 1
    processes: int = 1
    sharded: bool = False
    accelerator: str = "cpu"
    keep: str = "last_good"
    eval_batch: int = 32
    eval_new_tokens: int = EVAL_NEW_TOKENS
    optimizer_states: int = 2


def _bytes_of(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)


@dataclass
class Footprint:
    """The estimate for one device (bytes), by phase: `training` (a recovery step at its peak, at the first
    training stage: the most layers) and `evaluation` (each stage's end: the merged student, the teacher, the
    evaluation's KV cache). `disk` is bytes per saved stage (after stage k, k = 1..), `tokens` the recovery tokens
    per stage (at most: every example filling `length`)."""

    shape: ModelShape
    settings: RunSettings
    training: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)
    disk: list[tuple[int, int, float]] = field(default_factory=list)  # (stage, layers, bytes)
    tokens: list[tuple[int, int]] = field(default_factory=list)  # (stage, tokens)
    trainable: int = 0
    train_layers: int = 0

    @property
    def peak(self) -> float:
        """Bytes one device needs at most: the larger phase."""
        return max(sum(self.training.values()), sum(self.evaluation.values()))


def estimate(shape: ModelShape, s: RunSettings) -> Footprint:
    """Bytes per device of a run with settings `s` on a model of shape `shape` (`Footprint`)."""
    act, e_w = _bytes_of(s.act_dtype), _bytes_of(s.dtype)
    removed, first = 0, None
    for k, steps in s.plan:
        removed += k
        if steps > 0 and first is None:
            first = shape.layers - removed
    train_layers = shape.layers - s.plan[0][0] if first is None else first
    fp = Footprint(shape=shape, settings=s, train_layers=train_layers)
    shard = s.processes if s.sharded else 1
    student = weight_bytes(shape, train_layers, e_w, s.quantize if s.params == "lora" else None)
    teacher = 0.0
    if s.teacher == "original" or s.final_teacher:
        teacher += weight_bytes(shape, shape.layers, _bytes_of(s.teacher_dtype), s.teacher_quantize)
    if s.teacher == "previous":
        teacher += weight_bytes(shape, train_layers + s.plan[0][0], e_w, None)
    if s.params == "lora":
        fp.trainable = train_layers * shape.lora_parameters(s.lora_r, s.lora_targets)
        state = fp.trainable * (4 + 4 + 4 * s.optimizer_states)  # fp32 adapters (peft up-casts them), grads, AdamW
        label = f"LoRA adapters (r {s.lora_r}, float32) + gradients + AdamW"
    else:
        per = shape.per_layer if s.params == "full" else shape.per_layer  # near_cut: bounded by full
        fp.trainable = train_layers * per + shape.outside
        state = fp.trainable * e_w * (2 + s.optimizer_states)  # weights' gradients and AdamW moments in their dtype
        label = f"{s.params} weights' gradients + AdamW ({s.dtype})"
    fp.training[f"student weights ({'nf4 + ' + s.dtype if s.quantize and s.params == 'lora' else s.dtype})"] = \
        student / shard
    if teacher:
        what = s.teacher_quantize or s.teacher_dtype
        fp.training[f"teacher weights ({what}{', + previous-stage copy' if s.teacher == 'previous' else ''})"] = teacher
    fp.training[label] = state / shard
    mask = act if s.accelerator == "cpu" else 1
    per_token = sum(layer_activation_bytes(shape, act, s.params == "lora", s.lora_dropout, s.lora_targets,
                                           mask).values())
    tokens = s.batch * s.length
    fp.training[f"activations ({s.batch} x {s.length} tokens, {s.act_dtype}, no checkpointing)"] = \
        tokens * (train_layers * per_token + 4 * shape.hidden)
    logits = logits_bytes(s.batch, s.length, shape.vocab, act, act, s.loss, s.chunk,
                          s.distils and s.teacher is not None)
    fp.training[f"{'KD' if s.distils else 'loss'} logits (chunk {min(s.chunk, tokens)} x {shape.vocab} vocab)"] = \
        max(logits.values())
    if s.distils and s.teacher is not None:
        fp.training["teacher forward (transient)"] = tokens * (3 * shape.intermediate + 4 * shape.hidden) * act
    kv = s.eval_batch * (EVAL_PROMPT_TOKENS + s.eval_new_tokens) * train_layers * 2 * shape.kv_heads * \
        shape.head_dim * e_w
    fp.evaluation = {f"merged student ({s.dtype})": weight_bytes(shape, train_layers, e_w, None)}
    if teacher:
        fp.evaluation["teacher weights"] = teacher
    fp.evaluation[f"evaluation KV cache ({s.eval_batch} x {EVAL_PROMPT_TOKENS}+{s.eval_new_tokens} tokens)"] = kv
    removed = 0
    for stage, (k, steps) in enumerate(s.plan, start=1):
        removed += k
        fp.disk.append((stage, shape.layers - removed, shape.parameters(shape.layers - removed) * e_w))
        fp.tokens.append((stage, steps * s.batch * s.accumulate * s.processes * s.length))
    return fp


# ---------------------------------------------------------------------------------------------------------------
# Devices and the verdict
# ---------------------------------------------------------------------------------------------------------------

def visible_memory(accelerator: str) -> tuple[list[int], str]:
    """(bytes per visible device, what they are): CUDA devices' total memory, or the machine's RAM for `cpu`
    (psutil when installed, else `os.sysconf`). An accelerator other than cpu with no CUDA device gives []."""
    if accelerator == "cpu":
        try:
            import psutil

            return [int(psutil.virtual_memory().total)], "RAM"
        except ImportError:
            return [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")], "RAM"
    if not torch.cuda.is_available():
        return [], "no CUDA device visible"
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return [p.total_memory for p in props], props[0].name


def check_fit(fp: Footprint, memory: Sequence[int], processes_per_pool: int = 1) -> tuple[str, bool | None]:
    """(verdict line, fits): whether each process's peak fits its device (`memory`: bytes per device; the smallest
    decides). CPU processes share one RAM: `processes_per_pool` of them are summed. None when there is nothing to
    check against."""
    if not memory:
        return ("not checked: no device of this kind visible here; give --device-memory GIB (e.g. 80) to check "
                "against a GPU you are not on"), None
    need = fp.peak * processes_per_pool
    have = min(memory)
    ratio = need / have
    what = f"{_gib(need)} of {_gib(have)} ({ratio:.0%})"
    if ratio > 1:
        return f"does not fit: needs {what}", False
    if ratio > FIT_MARGIN:
        return (f"tight: {what}; above {FIT_MARGIN:.0%}, where the CUDA context and allocator slack (not counted) may "
                "not fit"), True
    return f"fits: {what}", True


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= 0.1 * GIB else f"{n / 1024 ** 2:.0f} MiB"


def format_plan(fp: Footprint, device: str, verdict: str) -> list[str]:
    """The plan as `plan:` lines: the model and where its config came from, one table of the two phases per
    device, the verdict, disk per saved stage and recovery tokens per stage."""
    sh, s = fp.shape, fp.settings
    lines = [f"model {sh.name} ({sh.model_type}; config from {sh.source}): {sh.layers} layers, "
             f"{sh.parameters() / 1e9:.3g} B parameters; training at {fp.train_layers} layers "
             f"({sh.parameters(fp.train_layers) / 1e9:.3g} B), {_count(fp.trainable)} trainable",
             f"per device ({device}; {s.processes} process{'es' if s.processes != 1 else ''}"
             f"{', FSDP-sharded student' if s.sharded else ''}):"]
    width = max(len(k) for k in [*fp.training, *fp.evaluation]) + 2
    lines.append(f"  {'training step (peak)'.ljust(width)}{'':>10}")
    for key, value in fp.training.items():
        lines.append(f"    {key.ljust(width)}{_gib(value):>10}")
    lines.append(f"    {'total'.ljust(width)}{_gib(sum(fp.training.values())):>10}")
    lines.append(f"  {'evaluation / merge (each stage end)'.ljust(width)}")
    for key, value in fp.evaluation.items():
        lines.append(f"    {key.ljust(width)}{_gib(value):>10}")
    lines.append(f"    {'total'.ljust(width)}{_gib(sum(fp.evaluation.values())):>10}")
    lines.append(f"peak per device {_gib(fp.peak)} (estimated from the config, not measured): {verdict}")
    sizes = ", ".join(f"{stage}: {_gib(b)}" for stage, _, b in fp.disk)
    all_stages = sum(b for _, _, b in fp.disk) + (fp.disk[-1][2] if fp.disk else 0)
    keep = (f"keep: all: ~{_gib(all_stages)} with final/" if s.keep == "all" else
            f"keep: last_good: ~{_gib(3 * max(b for _, _, b in fp.disk))} at most (the kept stage, the one being "
            "written, final/)") if fp.disk else ""
    lines.append(f"disk per saved stage ({s.dtype} safetensors): {sizes}; {keep}")
    tokens = [t for _, t in fp.tokens]
    lines.append(f"recovery tokens per stage (<=, every example filling max_length {s.length}): "
                 + ", ".join(f"{stage}: {_tokens(t)}" for stage, t in fp.tokens)
                 + f"; {_tokens(sum(tokens))} in all")
    return [f"plan: {line}" for line in lines]


def _count(n: float) -> str:
    """A parameter count in B or M (6.76 B, not 6.76e+03 M)."""
    return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.3g} M"


def _tokens(n: int) -> str:
    return f"{n / 1e6:.3g} M" if n >= 1e6 else f"{n / 1e3:.3g} k" if n >= 1e3 else str(n)


def round_up(n: float, step: float = 0.5) -> float:
    """`n` rounded up to a multiple of `step` (for config comments)."""
    return math.ceil(n / step) * step


# ---------------------------------------------------------------------------------------------------------------
# From a parsed `gradual fit` config
# ---------------------------------------------------------------------------------------------------------------

def settings_from_config(config: dict[str, Any], shape: ModelShape, visible_gpus: int = 0) -> RunSettings:
    """The `RunSettings` of a parsed `gradual fit` config (plain dicts: `model`, `data`, `trainer`), with the plan
    of stages computed as `GradualModule` computes it; `visible_gpus` resolves `trainer.devices: -1 / auto`.

    Raises:
        UsageError: a schedule or recovery setting the run would refuse (`Schedule.validate`, `Recovery`).
    """
    from gradual.distill import Recovery
    from gradual.stages import Schedule

    model, data, trainer = config["model"], config["data"], config["trainer"]
    schedule = Schedule(**model["schedule"])
    schedule.validate()
    schedule.validate(list(range(shape.layers)))
    selection = model["selection"]
    protected = selection["protect_first"] + selection["protect_last"] if schedule.layers is None else 0
    plan = tuple(schedule.stages(shape.layers, protected))
    if not plan:
        raise UsageError(f"selection.protect_first={selection['protect_first']} and protect_last="
                         f"{selection['protect_last']} leave 0 of {shape.layers} layers to choose from")
    recovery = Recovery(**model["recovery"])
    dtype = model["dtype"]
    if dtype == "auto":
        dtype = str(getattr(model_config(model["model"])[0], "torch_dtype", "float32")).removeprefix("torch.")
    precision = str(trainer.get("precision") or "")
    act = "bfloat16" if precision.startswith("bf16") else "float16" if precision.startswith("16") else dtype
    accelerator = str(trainer.get("accelerator") or "auto")
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and visible_gpus > 0)
    devices = trainer.get("devices", "auto")
    if isinstance(devices, list):
        count = len(devices)
    elif isinstance(devices, str) and devices.strip("-").isdigit():
        count = int(devices)
    elif isinstance(devices, int):
        count = devices
    else:
        count = -1
    if count in (-1, 0):
        count = max(1, visible_gpus) if gpu else 1
    strategy = trainer.get("strategy")
    strategy_name = strategy.get("class_path", "") if isinstance(strategy, dict) else str(strategy or "")
    teacher = None
    if recovery.needs_teacher:
        teacher = recovery.teacher
    final = bool(model["schedule"].get("final_steps"))
    evals = [cb.get("init_args") or {} for cb in trainer.get("callbacks") or []
             if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("TaskEvaluation")]
    keep = [(cb.get("init_args") or {}).get("keep", "last_good") for cb in trainer.get("callbacks") or []
            if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("StageCheckpoint")]
    lora = model["lora"]
    from gradual.generation import max_positions

    positions = max_positions(model_config(model["model"], model.get("trust_remote_code", False))[0])
    length = min(data["max_length"], positions) if positions else data["max_length"]
    return RunSettings(
        dtype=dtype, act_dtype=act, quantize=model.get("quantize"), params=recovery.params, lora_r=lora["r"],
        lora_dropout=lora["dropout"], lora_targets=tuple(lora["target_modules"]) if lora["target_modules"] else None,
        loss=recovery.loss, distils=recovery.distils, teacher=teacher,
        teacher_dtype=recovery.teacher_dtype or dtype, teacher_quantize=recovery.teacher_quantize,
        final_teacher=final, chunk=recovery.chunk_size, plan=plan, batch=data["batch_size"], length=length,
        accumulate=int(trainer.get("accumulate_grad_batches") or 1),
        processes=count * int(trainer.get("num_nodes") or 1), sharded="ModelParallelStrategy" in strategy_name,
        accelerator="cuda" if gpu else "cpu", keep=keep[0] if keep else "last_good",
        eval_batch=max([int(e.get("batch_size", 32)) for e in evals] or [32]),
        eval_new_tokens=max([int(e.get("max_new_tokens") or EVAL_NEW_TOKENS) for e in evals] or [EVAL_NEW_TOKENS]))
