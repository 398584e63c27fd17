"""Recovery data: a pool of prompts answered by a teacher model (Self-Generated Responses), cached on disk.

The seed paper heals a pruned model by finetuning it on what the *unpruned* model answers to ordinary prompts
(sequence-level self-distillation), discarding the dataset's own answers. This package builds those
(prompt, response) pairs, one module per step:

- `config`: `SGRConfig` (the `data.sgr` settings) and `PromptItem`;
- `prompts`: prompts from the built-in tasks' training split (refused if it shares a question with the evaluation
  split), a local JSONL/JSON/CSV file, or a Hugging Face dataset;
- `teacher`: the teacher answers each prompt through its chat template (plain text plus a newline without one: the
  same prompt text the data module trains on, `generation.response_prompt`) with the paper's sampling defaults,
  batched (`gradual.generation.generate`) or through vLLM when asked; under DDP the prompts are split across ranks
  (`gradual.ranks.split_for_rank`) and the answers gathered back in order;
- `fingerprint` and `cache`: answers are cached as JSONL under `<cache_dir>/<fingerprint>.jsonl`, one record per
  prompt flushed as soon as its batch finishes, so an interrupted run resumes where it stopped and later stages
  reuse the original model's answers without generating again. The fingerprint covers everything that changes the
  answers: the teacher (its weights, or with vLLM the files it loads), the formatted prompts, what ends an answer
  (end and pad ids: chat models gain end-of-turn ids in `generation_config` without any weight change), chat
  template, system prompt, decoding, backend and its arguments;
- `pairs`: the training pairs; for comparisons the dataset's own answers ("dataset SFT") or only the teacher answers
  the task scorer accepts ("sgr_filtered") can be used instead; `sdft_pairs` (the `sdft` source of the recovery
  mixture, `gradual.mixture`) asks the same teacher, through the same generation and cache, to rewrite each task
  prompt's reference answer, and keeps a rewrite only if the task's scorer accepts it; `self_documents` (the `tasks`
  source with `answers: self`) has it answer the evaluation's few-shot prompts of training problems, greedily;
- `texts`: `self_texts` (the `self_text` source) has it continue built-in openings, sampled: broad text of its own.

Pairs hold the raw user prompt, not the formatted one: the data module applies the chat template again at
training time, so training and generation see the same conversation.

Teacher choice (`SGRConfig.teacher`) is read by the pruning loop, not here: `build_pairs` answers with whatever
model it is given. "original" means the loop passes the unpruned model (the same cache file serves every stage);
"previous" means it passes the healed model of the previous stage *before* this stage removes a layer. With
`backend: vllm` the teacher is what vLLM loads from disk (`model_id`: a folder, or a hub id pinned to one commit); no
model needs to be in memory.
"""

from gradual.sgr.config import BACKENDS, RESPONSES, SOURCES, TEACHERS, PromptItem, SGRConfig
from gradual.sgr.pairs import SDFT_TEMPLATE, accepts, build_pairs, sdft_pairs, self_documents
from gradual.sgr.prompts import hf_rows, load_prompts
from gradual.sgr.teacher import teacher_responses
from gradual.sgr.texts import self_text_items, self_texts

__all__ = ["BACKENDS", "RESPONSES", "SDFT_TEMPLATE", "SOURCES", "TEACHERS", "PromptItem", "SGRConfig", "accepts",
           "build_pairs", "hf_rows", "load_prompts", "sdft_pairs", "self_documents", "self_text_items", "self_texts",
           "teacher_responses"]
