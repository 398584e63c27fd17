"""Test helpers that inject faults into real `gradual fit` runs: a pause inside a stage's save (so a test can SIGKILL
the process there), weights poisoned with NaN/inf, and local lm-eval tasks that raise or score 0.

Subprocess runs import this module with `tests/` on PYTHONPATH (as `rank_probe`); in-process runs append the
callbacks to the trainer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from rank_probe import write_successor_rows

from gradual import surgery

BROKEN_TASK = "gradual_broken_mc"
ZERO_TASK = "gradual_zero"


class PauseInSave(Callback):
    """Make stage `stage`'s save stop half-way: after the model's weights are written into the stage's temporary
    folder and before the folder is renamed into place, write `marker` and sleep, so the test kills the process
    exactly there. Only the first run pauses (the marker then exists), so the same config resumes."""

    def __init__(self, stage: int, marker: str) -> None:
        self.stage, self.marker = stage, Path(marker)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.marker.exists():
            return
        export = pl_module.export

        def export_then_pause(path: str | Path) -> None:
            export(path)
            if pl_module.record.stage == self.stage:
                self.marker.write_text(json.dumps({"stage": self.stage, "folder": str(path)}))
                time.sleep(600)

        pl_module.export = export_then_pause


class PoisonWeights(Callback):
    """Set one weight of the current model to `value` (nan or inf) in stage `stage`: a frozen base weight before
    its first batch (`when="start"`: every loss of the stage is non-finite), or a LoRA weight after its last batch
    (`when="end"`: every loss was finite, the merged weights are not)."""

    def __init__(self, stage: int, value: float, when: str = "start") -> None:
        self.stage, self.value, self.when = stage, value, when
        self.lora_b: dict[int, list[float]] = {}

    def _poison(self, pl_module: L.LightningModule, lora: bool) -> None:
        layer = surgery.decoder_layers(pl_module.model)[1]
        weight = next(p for n, p in layer.named_parameters()
                      if n.endswith("weight") and p.dim() == 2 and ("lora_B" in n if lora else "lora_" not in n))
        with torch.no_grad():
            weight.view(-1)[0] = self.value

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.when == "start" and pl_module.stage == self.stage and batch_idx == 0:
            self._poison(pl_module, lora=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Runs before the module's own hook merges the adapters (Lightning calls callbacks first). Records the
        largest |LoRA B| after each batch's optimizer step (0 at init, NaN after a step on a NaN loss)."""
        b = [p.detach().abs().max() for n, p in pl_module.model.named_parameters() if "lora_B" in n]
        self.lora_b.setdefault(pl_module.stage, []).append(float(torch.stack(b).max()))
        last = pl_module.record.steps * trainer.accumulate_grad_batches - 1
        if self.when == "end" and pl_module.stage == self.stage and batch_idx == last:
            self._poison(pl_module, lora=True)


class BreakLmEvalTask(Callback):
    """From train start on (after the baseline was scored by the evaluations listed before it), the broken task's
    `process_results` raises, as a metric backend or dataset that goes away mid-run."""

    def __init__(self, root: str) -> None:
        self.flag = Path(root) / "broken"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flag.touch()


def write_fault_lm_eval_tasks(root: Path) -> Path:
    """Two local lm-eval tasks on 8 "what comes after n" questions: `BROKEN_TASK` (multiple choice, acc) whose
    `process_results` raises once a `broken` file exists next to it, and `ZERO_TASK` (generation, exact match
    against a target no 4-token answer can equal: its score is always 0)."""
    data = write_successor_rows(root)
    (root / "fault_utils.py").write_text(
        "from pathlib import Path\n\n\n"
        "def process_results(doc, results):\n"
        "    if Path(__file__).with_name('broken').exists():\n"
        "        raise RuntimeError('metric backend went away')\n"
        "    lls = [ll for ll, _ in results]\n"
        "    return {'acc': float(max(range(len(lls)), key=lls.__getitem__) == doc['label'])}\n")
    head = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n" \
           "doc_to_text: \"Q: {{question}}\\nA:\"\n"
    (root / "broken_mc.yaml").write_text(
        f"task: {BROKEN_TASK}\n{head}output_type: multiple_choice\ndoc_to_choice: \"{{{{choices}}}}\"\n"
        "doc_to_target: label\nprocess_results: !function fault_utils.process_results\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (root / "zero.yaml").write_text(
        f"task: {ZERO_TASK}\n{head}output_type: generate_until\ndoc_to_target: \"@@never@@\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return root
