"""What the SGR recovery data are built from: `SGRConfig` (the `data.sgr` settings) and `PromptItem` (one prompt)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gradual.errors import UsageError
from gradual.generation import DEFAULT_SYSTEM_PROMPT, DecodingConfig
from gradual.tasks.builtin import check_difficulty

SOURCES = ("tasks", "file", "hf")
RESPONSES = ("sgr", "dataset", "sgr_filtered")
BACKENDS = ("transformers", "vllm")
TEACHERS = ("original", "previous")


@dataclass
class PromptItem:
    """One user prompt; `reference` is the dataset's own answer when there is one, `task` names where it came from."""

    prompt: str
    reference: str | None = None
    task: str = ""


@dataclass
class SGRConfig:
    """Where the recovery prompts come from, how the teacher answers them, and which responses to train on.

    Attributes:
        source: where the prompts come from: `tasks` (default: built-in tasks' training split), `file` (`path` to a
            .jsonl/.json/.csv file) or `hf` (`path` = a Hugging Face dataset name or folder).
        tasks: `tasks` source: built-in task names (empty, the default, = every built-in task; see `gradual tasks`).
        difficulty: `tasks` source: problem sizes, `small` (default) or `large`, like the evaluation's
            `TaskEvaluation.difficulty`.
        n_per_task: `tasks` source: prompts per task (>= 1, default 200).
        seed: seed of the task prompts drawn and of a `max_prompts` subset (default 0).
        eval_n: the evaluation problems per task the training prompts must not share a question with (>= 1,
            default 500).
        eval_seed: the seed of those evaluation problems (default 0, the evaluation's default).
        path: `file`: a .jsonl, .json (a list of objects) or .csv file; `hf`: a dataset name or folder.
        prompt_field: `file`/`hf`: the field holding the prompt (default `prompt`).
        response_field: `file`/`hf`: the field holding the dataset's own answer, needed by `responses: dataset`
            (default null).
        hf_config: `hf`: the dataset's configuration name (default null).
        hf_split: `hf`: the dataset's split (default `train`).
        max_prompts: `file`/`hf`: keep a seeded random subset of this many prompts, in file order (>= 1; null, the
            default = all).
        system_prompt: the system message of the chat template, for generation and training alike (null = none;
            default "You are a helpful assistant.").
        chat: format prompts with the model's chat template (default true; false, or a model without a template:
            the plain prompt and a newline).
        decoding: how the teacher answers (default: sampled at temperature 0.9, top-p 0.95, up to 256 tokens).
        responses: what to train on: `sgr` (default: the teacher's answers, the paper's recipe), `dataset` (the
            source's own answers: a task's reference answer, or `response_field`; no teacher runs) or `sgr_filtered`
            (only the teacher answers the task's scorer accepts; `tasks` source only).
        teacher: who answers: `original` (default: the unpruned model, answers generated once and cached) or
            `previous` (the model the finished stages left, answering afresh before every stage).
        cache_dir: the answer cache's folder; null (default) = `<gradual cache>/sgr` (`$GRADUAL_CACHE`, default
            `~/.cache/gradual`).
        batch_size: prompts per generation batch (default 16; speed only, not the answers).
        chunk_size: prompts generated (and under DDP gathered and cached) at a time (>= 1, default 1024).
        backend: `transformers` (default: batched generation by the model in memory) or `vllm` (vLLM loads the
            teacher from disk; single process, GPU, `pip install gradual[vllm]`).
        vllm_args: `vllm`: further `vllm.LLM` arguments, e.g. {gpu_memory_utilization: 0.8}; part of the cache key
            (default: none).
    """

    source: str = "tasks"
    tasks: list[str] = field(default_factory=list)
    difficulty: str = "small"
    n_per_task: int = 200
    seed: int = 0
    eval_n: int = 500
    eval_seed: int = 0
    path: str | None = None
    prompt_field: str = "prompt"
    response_field: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    max_prompts: int | None = None
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    chat: bool = True
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    responses: str = "sgr"
    teacher: str = "original"
    cache_dir: str | None = None
    batch_size: int = 16
    chunk_size: int = 1024
    backend: str = "transformers"
    vllm_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value, allowed in (("source", self.source, SOURCES), ("responses", self.responses, RESPONSES),
                                     ("backend", self.backend, BACKENDS), ("teacher", self.teacher, TEACHERS)):
            if value not in allowed:
                raise UsageError(f"sgr {name}={value!r} is unknown; allowed: {', '.join(allowed)}")
        for name in ("n_per_task", "eval_n", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"sgr {name}={getattr(self, name)} is invalid; it must be >= 1")
        check_difficulty(self.difficulty)
        if self.max_prompts is not None and self.max_prompts < 1:
            raise UsageError(f"sgr max_prompts={self.max_prompts} is invalid; it must be >= 1 or null")
        if self.source in ("file", "hf") and not self.path:
            raise UsageError(f"sgr source={self.source!r} needs `path` (a file path or a dataset name)")
        if self.responses == "sgr_filtered" and self.source != "tasks":
            raise UsageError("sgr responses='sgr_filtered' needs source='tasks' (only built-in tasks have a scorer)")
        if self.responses == "dataset" and self.source != "tasks" and not self.response_field:
            raise UsageError(f"sgr responses='dataset' with source={self.source!r} needs `response_field`")
        if isinstance(self.decoding, dict):
            self.decoding = DecodingConfig(**self.decoding)
        temperature, top_p = self.decoding.temperature, self.decoding.top_p
        if not (math.isfinite(temperature) and temperature > 0 and 0 < top_p <= 1):  # NaN fails every comparison
            raise UsageError(f"sgr decoding temperature={temperature}, top_p={top_p} are invalid; need a finite "
                             "temperature > 0 and 0 < top_p <= 1 (also under do_sample: false, which ignores them)")

