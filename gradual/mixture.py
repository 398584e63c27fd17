"""The sources of the recovery mixture (`data.sources`): what each kind is, its settings, and the texts of the sources
that need no teacher.

Five kinds, combined by weight (each stage holds every source in proportion to its weight, `gradual.sampler`):

- `sgr`: `data.sgr`'s prompts answered by the teacher (the seed paper's recipe); (prompt, response) pairs.
- `tasks`: few-shot documents of built-in tasks' training problems in the evaluation's `Q: .../A: ...` format
  (`gradual.tasks.documents`); plain text. Measured on SmolLM2, forward KL on such text restored in-data retention
  far better than KL on SGR answers or generic text.
  With `answers: self` each document is instead the evaluation's few-shot prompt of one training problem answered by
  the original model itself (greedy, cached like SGR answers; `gradual.sgr.self_documents`): the seed paper's
  self-generated responses (arXiv 2602.01997) in the format of use, the reference answers discarded.
- `text`: plain text from a .txt/.jsonl file, a Hugging Face dataset, or the built-in calibration texts.
- `sdft`: built-in tasks' training prompts with the teacher's rewrite of the reference answer, kept when the task's
  scorer accepts it, else the reference (`gradual.sgr.pairs.sdft_pairs`); (prompt, response) pairs.
- `self_text`: broad text written by the original model itself: it continues short built-in openings of every kind
  (prose, news, code, recipes, letters, questions: `gradual/resources/openings.txt`), sampled, no dataset needed
  (`gradual.sgr.texts`; generated once and cached like SGR answers); plain text, pretraining-like data for
  distillation.

Pairs are learned on the response only; texts on every token. Under `model.recovery.loss: kd` a text needs no
generated answer at all: the original model's next-token distribution at every position is the target.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from gradual.errors import UsageError
from gradual.tasks.builtin import check_difficulty

KINDS = ("sgr", "tasks", "text", "sdft", "self_text")
SELF_TEXT_FIELDS = {"n_texts": 256, "max_new_tokens": 128, "temperature": 1.0, "top_p": 0.95, "seed": 0}
"""The settings only `self_text` takes, with their defaults."""
ANSWERS = ("reference", "self")
TEXT_FILE_SUFFIXES = (".txt", ".jsonl")


@dataclass
class DataSource:
    """One source of the recovery mixture; the fields a kind does not use keep their defaults.

    Attributes:
        kind: `sgr` (`data.sgr`'s prompts answered by the teacher), `tasks` (few-shot documents of built-in tasks'
            training problems), `text` (plain text), `sdft` (the teacher's accepted rewrites of built-in tasks'
            reference answers, else the references), or `self_text` (the teacher's sampled continuations of
            built-in openings).
        weight: the source's share of every stage's examples, relative to the other sources' weights (>= 0; 0
            leaves the source out). Default 1.
        tasks: `tasks`/`sdft`: built-in task names (empty, the default, = every built-in task). The `sgr` source's
            tasks are `data.sgr.tasks`.
        n_per_task: `tasks`: documents per task; `sdft`: prompts per task (>= 1, default 200).
        shots: `tasks`: worked examples per document (>= 1, default 5, the evaluation's default few-shot count).
        answers: `tasks`: whose answers the documents hold: `reference` (default: `shots` worked examples with their
            reference answers per document) or `self` (per training problem, the evaluation's few-shot prompt with
            `shots` worked examples, answered by `data.sgr.teacher` (the original model by default) greedily up to
            the end of its first line, as the evaluation decodes; generated once, through `data.sgr`'s backend and
            answer cache). Other values are refused.
        difficulty: `tasks`/`sdft`: problem difficulty, `small` or `large`; null (default) = `data.sgr.difficulty`.
        path: `text` only: null (default) = the built-in calibration texts (`gradual/resources/calibration.txt`);
            a path ending in .txt (one text a line) or .jsonl (field `text_field`) = a local file; anything else = a
            Hugging Face dataset name or folder (`hf_config`, `hf_split`, field `text_field`).
        text_field: `text` from .jsonl or a dataset: the field holding the text (default `text`).
        hf_config: `text` from a dataset: its configuration name (default null).
        hf_split: `text` from a dataset: its split (default `train`).
        max_texts: `text`: keep a seeded random subset of this many texts, in source order (>= 1; null = all).
        n_texts: `self_text`: texts generated (>= 1, default 256); text i continues opening i of seeded passes over
            the built-in openings (each pass a permutation), so openings repeat evenly and each draw is its own.
        max_new_tokens: `self_text`: the most tokens generated per text (>= 1, default 128).
        temperature: `self_text`: sampling temperature (finite, > 0; default 1: the model's own distribution).
        top_p: `self_text`: nucleus sampling mass, in (0, 1] (default 0.95: the least likely 5% cut off).
        seed: `self_text`: seeds the openings' order and every text's sampling (default 0).

    Problems are drawn as `data.sgr` draws its task prompts: training split, seed `data.sgr.seed`, refused if they
    share a question with the first `data.sgr.eval_n` evaluation problems of `data.sgr.eval_seed`. `sgr` and `sdft`
    share `data.sgr`'s teacher, decoding, backend, cache, system prompt and chat settings; `tasks` with `answers:
    self` shares its teacher, backend and cache (its decoding is the evaluation's, its prompts are not chat); so does
    `self_text` (its decoding is its own, its openings are raw text, not chat).
    """

    kind: str
    weight: float = 1.0
    tasks: list[str] = field(default_factory=list)
    n_per_task: int = 200
    shots: int = 5
    answers: str = "reference"
    difficulty: str | None = None
    path: str | None = None
    text_field: str = "text"
    hf_config: str | None = None
    hf_split: str = "train"
    max_texts: int | None = None
    n_texts: int = 256
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"data source kind={self.kind!r} is unknown; allowed: {', '.join(KINDS)}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise UsageError(f"data source {self.kind} weight={self.weight} is invalid; it must be finite and >= 0")
        for name in ("n_per_task", "shots"):
            if getattr(self, name) < 1:
                raise UsageError(f"data source {self.kind} {name}={getattr(self, name)} is invalid; it must be >= 1")
        if self.answers not in ANSWERS:
            raise UsageError(f"data source {self.kind} answers={self.answers!r} is unknown; allowed: "
                             f"{', '.join(ANSWERS)}")
        if self.answers != "reference" and self.kind != "tasks":
            raise UsageError(f"data source {self.kind} has answers={self.answers!r}, but only kind tasks takes answers")
        if self.max_texts is not None and self.max_texts < 1:
            raise UsageError(f"data source {self.kind} max_texts={self.max_texts} is invalid; it must be >= 1 or null")
        if self.difficulty is not None:
            check_difficulty(self.difficulty)
        if self.path is not None and self.kind != "text":
            raise UsageError(f"data source {self.kind} has path={self.path!r}, but only kind text reads a path"
                             + ("; the sgr source's prompts are data.sgr's" if self.kind == "sgr" else ""))
        if self.tasks and self.kind not in ("tasks", "sdft"):
            raise UsageError(f"data source {self.kind} has tasks={self.tasks}, but only kinds tasks and sdft take "
                             "tasks" + ("; the sgr source's are data.sgr.tasks" if self.kind == "sgr" else ""))
        self._check_self_text()

    def _check_self_text(self) -> None:
        """`self_text`'s own settings: valid values, and left at their defaults by every other kind."""
        if self.kind != "self_text":
            for name, default in SELF_TEXT_FIELDS.items():
                if getattr(self, name) != default:
                    raise UsageError(f"data source {self.kind} has {name}={getattr(self, name)!r}, but only kind "
                                     "self_text takes it")
            return
        for name in ("n_texts", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"data source self_text {name}={getattr(self, name)} is invalid; it must be >= 1")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UsageError(f"data source self_text temperature={self.temperature} is invalid; it must be finite "
                             "and > 0")
        if not 0 < self.top_p <= 1:  # NaN fails the comparison
            raise UsageError(f"data source self_text top_p={self.top_p} is invalid; it must be in (0, 1]")


def check_sources(sources: list[DataSource]) -> list[DataSource]:
    """The sources with weight > 0, after refusing (UsageError) an empty list, all-zero weights or two `sgr` sources
    (there is one `data.sgr`)."""
    if not sources:
        raise UsageError("data.sources is empty; give at least one source, or null for data.sgr alone")
    if sum(s.kind == "sgr" for s in sources) > 1:
        raise UsageError("data.sources lists kind sgr twice; there is one sgr source (its settings are data.sgr)")
    active = [s for s in sources if s.weight > 0]
    if not active:
        raise UsageError("every data source has weight 0; give at least one a positive weight")
    return active


def source_texts(source: DataSource, seed: int = 0) -> list[str]:
    """The texts of a `text` source (non-empty ones, in source order), `max_texts` of them at most (a subset seeded by
    `seed`). A missing file or a dataset that cannot be loaded is a UsageError."""
    from gradual.importance import calibration_texts

    if source.path is None:
        texts = calibration_texts(None, n=None)
    elif Path(source.path).suffix.lower() in TEXT_FILE_SUFFIXES:
        if not Path(source.path).is_file():
            raise UsageError(f"text source file {source.path!r} does not exist")
        texts = calibration_texts(source.path, n=None, field_name=source.text_field)
    else:
        from gradual.sgr.prompts import hf_rows

        rows = hf_rows(source.path, source.hf_config, source.hf_split)
        if rows and source.text_field not in rows[0]:
            raise UsageError(f"dataset {source.path!r} has no field {source.text_field!r}; its fields are: "
                             f"{', '.join(map(str, rows[0]))}")
        texts = [r[source.text_field] for r in rows if isinstance(r.get(source.text_field), str)
                 and r[source.text_field].strip()]
        if not texts:
            raise UsageError(f"dataset {source.path!r} has no non-empty text in field {source.text_field!r}")
    if source.max_texts is not None and source.max_texts < len(texts):
        keep = sorted(random.Random(seed).sample(range(len(texts)), source.max_texts))
        texts = [texts[i] for i in keep]
    return texts
