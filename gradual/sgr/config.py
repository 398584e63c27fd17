"""What the SGR recovery data are built from: `SGRConfig` (the `data.sgr` settings) and `PromptItem` (one prompt)."""

from __future__ import annotations

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

    source: "tasks" (built-in tasks' training split at `difficulty`, "small" or "large" like the evaluation's
    `TaskEvaluation.difficulty`; `tasks` empty = every built-in task), "file" (`path` to a .jsonl/.json/.csv with
    `prompt_field`), or "hf" (`path` = dataset name, `hf_config`, `hf_split`).
    responses: "sgr" (teacher answers, the paper's recipe), "dataset" (the source's own answers: a task's
    reference answer, or `response_field` of a file/dataset), "sgr_filtered" (teacher answers the task's scorer
    accepts; tasks only). `eval_n`/`eval_seed` name the evaluation split the training prompts must not overlap.
    `max_prompts` caps a file/hf source (a seeded random subset). `cache_dir` None disables the cache.
    `chunk_size` prompts are generated (and, under DDP, gathered) at a time. backend "vllm" loads the teacher from
    disk (single process, no in-memory model needed); `vllm_args` go to `vllm.LLM` and are part of the cache key.
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

