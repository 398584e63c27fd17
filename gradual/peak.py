"""Measured peak memory of one recovery step, to check `gradual.footprint`'s estimate against: a random model
built from a config (no download), the run's own pieces (`lora.attach_lora` / `quantize_nf4`, `distill.Teacher`,
`RecoveryObjective`, AdamW), one forward, backward and optimizer step.

On CPU the step runs in a fresh process (`python -m gradual.peak`) and the peak is its resident set's high-water
mark (`VmHWM`, lowered to the resident set once the imports are done) minus the resident set then: the only
allocations after that are the step's. glibc is told to
serve every allocation above 64 KiB by mmap (`MALLOC_MMAP_THRESHOLD_`), so freed tensors leave the resident set at
once rather than staying in a heap whose size depends on allocation order: the figure is then stable run to run
(the profiler's memory view was not: it misses allocations made outside torch's allocator, e.g. bitsandbytes').
On CUDA it is `torch.cuda.max_memory_allocated` minus what was allocated before the step's models were built.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gradual.footprint import RunSettings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_step(config_dir: str | Path, s: RunSettings, device: str = "cpu", seed: int = 0) -> None:
    """One recovery step as `gradual fit` trains it, on random models of the config in `config_dir`: the student
    (NF4 under `s.quantize`, LoRA or full weights per `s.params`), the teacher when `s.teacher` is set, a batch of
    `s.batch` x `s.length` random tokens every one of which counts in the loss."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gradual.distill import Recovery, RecoveryObjective, Teacher
    from gradual.lora import LoraSettings, attach_lora, quantize_nf4

    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        student = AutoModelForCausalLM.from_config(config, dtype=DTYPES[s.dtype])
        teacher = (AutoModelForCausalLM.from_config(config, dtype=DTYPES[s.teacher_dtype])
                   if s.teacher is not None else None)
    student.config.use_cache = False
    if teacher is not None and s.teacher_quantize == "nf4":
        teacher = quantize_nf4(teacher, compute_dtype=DTYPES[s.act_dtype])
    if s.params == "lora":
        if s.quantize == "nf4":
            student = quantize_nf4(student, compute_dtype=DTYPES[s.act_dtype])
        student = attach_lora(student, LoraSettings(r=s.lora_r, alpha=2 * s.lora_r, dropout=s.lora_dropout,
                                                    target_modules=list(s.lora_targets) if s.lora_targets else None))
    else:
        for p in student.get_input_embeddings().parameters():
            p.requires_grad_(False)
        head = student.get_output_embeddings()
        for p in head.parameters() if head is not None else ():
            p.requires_grad_(False)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    objective = RecoveryObjective(Recovery(loss=s.loss, chunk_size=s.chunk),
                                  Teacher(teacher) if teacher is not None else None)
    ids = torch.randint(10, config.vocab_size, (s.batch, s.length), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[s.act_dtype],
                        enabled=s.act_dtype != s.dtype):
        loss, _ = objective(student, batch, list(range(config.num_hidden_layers)))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_cpu(config_dir: str | Path, s: RunSettings, timeout: float = 600) -> dict[str, Any]:
    """Run `run_step` on CPU in a fresh process; {"peak_bytes": the resident set's high-water mark during the step
    minus the resident set after imports, "baseline_bytes": the latter}.

    Raises:
        RuntimeError: the step's process failed (its stderr's last lines in the message).
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, "-m", "gradual.peak", str(config_dir), json.dumps(asdict(s))],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the measured step failed: {' | '.join(done.stderr.strip().splitlines()[-5:])}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_cuda(config_dir: str | Path, s: RunSettings) -> dict[str, Any]:
    """Run `run_step` on the current CUDA device in this process; {"peak_bytes": max_memory_allocated during the
    step minus what was allocated before it}."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run_step(config_dir, s, device="cuda")
    peak = torch.cuda.max_memory_allocated() - before
    torch.cuda.empty_cache()
    return {"peak_bytes": int(peak), "baseline_bytes": int(before)}


def _max_rss() -> int:
    """The resident set's high-water mark: `VmHWM` of /proc/self/status (which `_reset_max_rss` can lower), else
    `ru_maxrss` (never lowered)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_max_rss() -> None:
    """Lower the high-water mark to the resident set now (Linux >= 4.0: "5" to /proc/self/clear_refs), so a
    transient peak of the imports (bitsandbytes' libraries on some CPUs) cannot hide the step's own; where the
    kernel refuses, the mark stays and `_main` refuses a step that never rose above it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss() -> int:
    """The resident set now (Linux `/proc/self/statm`)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradual.peak", description=measure_cpu.__doc__)
    parser.add_argument("config_dir")
    parser.add_argument("settings", help="RunSettings as JSON")
    args = parser.parse_args(argv)
    fields = json.loads(args.settings)
    fields["plan"] = tuple(tuple(p) for p in fields["plan"])
    fields["lora_targets"] = tuple(fields["lora_targets"]) if fields["lora_targets"] else None
    s = RunSettings(**fields)
    torch.set_num_threads(1)
    import peft  # noqa: F401 - imported before the baseline: the step's own allocations are what is measured
    import transformers  # noqa: F401

    from gradual import distill, lora  # noqa: F401

    lora.import_bitsandbytes()
    from transformers import AutoModelForCausalLM  # noqa: F401

    _reset_max_rss()
    baseline, mark = _rss(), _max_rss()
    run_step(args.config_dir, s)
    peak = _max_rss()
    if peak <= mark and mark > baseline:  # the step never rose above the imports' own mark: its peak is unknown
        raise SystemExit(f"the step's peak stayed under the imports' ({mark} bytes); measure a larger step")
    print(json.dumps({"peak_bytes": peak - baseline, "baseline_bytes": baseline}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
