"""The prepared GPU check (issue 21), under 8 minutes on one CUDA device in bf16, each step under its own time limit:

1. `bench`: scripts/bench.py --quick on the GPU in bf16                      -> bench-gpu.json
2. `fit`: a two-stage `gradual fit` of SmolLM2 with the demo recipe (LoRA + KD on task text), 8 steps a stage
3. `sgr_vllm`: a one-stage fit whose recovery data is an `sgr` source answered by vLLM
4. `plan`: `gradual.footprint`'s estimate of a QLoRA + NF4-teacher KD step against its measured
   `torch.cuda.max_memory_allocated` (a random Llama-shaped model, hidden 2048, 8 layers, vocab 32k, 2 x 1024 tokens)
5. `vllm_final`: the fit's `final/` loaded by vLLM (a generation), then by stock `lm_eval --model vllm` on a local
   8-item task (offline)
Results: OUT/gpu-check.json (each step's command, exit code, seconds, and what it measured), OUT/gpu-check.md, and
OUT/gpu-check.log (everything printed).

Usage: python scripts/gpu_check.py [--dry-run] [OUT]   (default OUT: $OUT, else ./gpu-check)
Exit codes: 0 no step failed (a step whose prerequisite is missing, e.g. vLLM, is skipped and listed as skipped; with
--dry-run: every prerequisite is there); 1 a step failed (or, with
--dry-run, a prerequisite is missing: each missing one is named on its own line); 2 no CUDA device (without
--dry-run: nothing runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
GPU = ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
       "--model.dtype", "bfloat16", "--model.overwrite", "true"]
PLAN_CASE = (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
             dict(batch=2, length=1024, loss="kd", teacher="original", distils=True, quantize="nf4",
                  teacher_quantize="nf4", dtype="bfloat16", act_dtype="bfloat16", teacher_dtype="bfloat16",
                  lora_r=16, accelerator="cuda"))
LM_EVAL_TASK = "gradual_gpu_check"
LM_EVAL = str(Path(PY).parent / "lm_eval") if (Path(PY).parent / "lm_eval").exists() else "lm_eval"  # the stock CLI


def steps(runs: Path, out: Path) -> list[tuple[str, int, list[str]]]:
    """(name, time limit in seconds, command) of every step, in order."""
    fit = [PY, "-m", "gradual", "fit", "--config", "configs/demo.yaml", *GPU, "--model.schedule.max_layers", "2",
           "--model.schedule.steps_per_stage", "8", "--model.run_dir", str(runs / "fit")]
    sgr = [PY, "-m", "gradual", "fit", "--config", "configs/demo.yaml", *GPU, "--model.schedule.max_layers", "1",
           "--model.schedule.steps_per_stage", "4", "--data.sources", '[{"kind": "sgr"}]',
           "--data.sgr.backend", "vllm", "--data.sgr.n_per_task", "8", "--data.sgr.decoding.max_new_tokens", "64",
           "--data.sgr.cache_dir", str(runs / "sgr-cache"),
           "--data.sgr.vllm_args", '{"gpu_memory_utilization": 0.3, "enforce_eager": true}',
           "--model.run_dir", str(runs / "fit-vllm")]
    final = runs / "fit" / "final"
    load = [PY, "-c", "from vllm import LLM, SamplingParams; import sys; llm = LLM(sys.argv[1], "
            "gpu_memory_utilization=0.3, enforce_eager=True); out = llm.generate(['Q: 2 + 3 = ?\\nA:'], "
            "SamplingParams(max_tokens=8, temperature=0)); print('vllm generated:', repr(out[0].outputs[0].text))",
            str(final)]
    lm_eval = [LM_EVAL, "--model", "vllm", "--model_args",
               f"pretrained={final},gpu_memory_utilization=0.3,enforce_eager=True,max_model_len=2048",
               "--include_path", str(runs / "lm-eval-tasks"), "--tasks", LM_EVAL_TASK, "--limit", "8",
               "--output_path", str(out / "lm-eval")]
    return [
        ("bench", 130, [PY, "scripts/bench.py", "--quick", "--device", "cuda", "--dtype", "bfloat16", "--threads",
                        "auto", "--out", str(out / "bench-gpu.json"),
                        "--details", str(out / "bench-gpu.details.json")]),
        ("fit", 110, fit),
        ("sgr_vllm", 80, sgr),
        ("plan", 50, [PY, str(Path(__file__).resolve()), "--measure-plan", str(out / "plan-check.json")]),
        ("vllm_final", 40, load),
        ("lm_eval_vllm", 50, lm_eval),
    ]


def prerequisites() -> dict[str, str | None]:
    """What the check needs, each None when present or a line saying what is missing."""
    import torch

    found: dict[str, str | None] = {
        "cuda": None if torch.cuda.is_available() else "no CUDA device: torch.cuda.is_available() is False",
        "vllm": None if importlib.util.find_spec("vllm") else "vLLM is not importable (pip install vllm)",
        "lm_eval": None if importlib.util.find_spec("lm_eval") else "lm_eval is not importable",
        "lm_eval command": None if shutil.which(LM_EVAL) else "the `lm_eval` command is not on PATH",
        "bitsandbytes": None if importlib.util.find_spec("bitsandbytes") else "bitsandbytes is not importable",
    }
    return found


def measure_plan(path: Path) -> int:
    """Step 4 in its own process: the estimate and the measured peak of one QLoRA KD step on CUDA, as JSON."""
    from transformers import LlamaConfig

    from gradual import footprint
    from gradual.peak import measure_cuda

    config, settings = PLAN_CASE
    with tempfile.TemporaryDirectory() as tmp:
        LlamaConfig(**config).save_pretrained(tmp)
        s = footprint.RunSettings(plan=((0, 1),), **settings)
        fp = footprint.estimate(footprint.model_shape(tmp), s)
        measured = measure_cuda(tmp, s)["peak_bytes"]
    estimated = sum(fp.training.values())
    result = {"estimated_bytes": estimated, "measured_bytes": measured, "ratio": estimated / measured,
              "within_20_percent": abs(estimated / measured - 1) <= 0.2,
              "terms": {k: v for k, v in fp.training.items()}, "config": config, "settings": settings}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"plan check: estimated {estimated / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB "
          f"(ratio {estimated / measured:.3f})")
    return 0 if result["within_20_percent"] else 1


def _lm_eval_task(folder: Path) -> None:
    """A local generate-until task of 8 sums (lm-eval reads it offline through --include_path)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "sums.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q: {a} + {a + 1} = ?\nA:", "answer": str(2 * a + 1)}) + "\n"
                            for a in range(1, 9)))
    (folder / f"{LM_EVAL_TASK}.yaml").write_text(
        f"task: {LM_EVAL_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the steps and check prerequisites; run none")
    parser.add_argument("--measure-plan", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT") or "gpu-check")
    args = parser.parse_args(argv)
    if args.measure_plan:
        return measure_plan(Path(args.measure_plan))
    os.chdir(ROOT)
    path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false", PYTHONPATH=path)
    out = Path(args.out).resolve()
    runs = Path(tempfile.mkdtemp(prefix="gradual-gpu-check-"))  # stage checkpoints stay out of OUT (large)
    missing = {k: v for k, v in prerequisites().items() if v}
    if args.dry_run:
        print(f"gpu_check: dry run: nothing runs; results would go to {out}")
        for name, limit, cmd in steps(runs, out):
            print(f"gpu_check: [{name}] (limit {limit} s) {subprocess.list2cmdline(cmd)}")
            if name in ("fit", "sgr_vllm"):  # the fit arguments must parse here already
                parsed = subprocess.run([*cmd, "--print_config"], capture_output=True, text=True, timeout=120)
                if parsed.returncode != 0:
                    missing[f"{name} arguments"] = (f"the {name} step's arguments do not parse: "
                                                    f"{parsed.stderr.strip().splitlines()[-1:]}")
                else:
                    print(f"gpu_check: [{name}] arguments parse")
        for line in missing.values():
            print(f"gpu_check: missing: {line}")
        shutil.rmtree(runs, ignore_errors=True)
        print("gpu_check: dry run " + ("ok: every prerequisite is there" if not missing else
                                       f"found {len(missing)} missing prerequisite(s)"))
        return 1 if missing else 0
    if "cuda" in missing:
        shutil.rmtree(runs, ignore_errors=True)
        print(f"gpu_check: {missing['cuda']}; this check needs a GPU (use --dry-run here)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    _lm_eval_task(runs / "lm-eval-tasks")
    results: list[dict[str, Any]] = []
    with open(out / "gpu-check.log", "w") as log:
        for name, limit, cmd in steps(runs, out):
            need = {"sgr_vllm": "vllm", "vllm_final": "vllm", "lm_eval_vllm": "lm_eval command"}.get(name)
            if need in missing or (name in ("vllm_final", "lm_eval_vllm") and not (runs / "fit" / "final").is_dir()):
                why = missing.get(need) or "the fit step left no final/"
                results.append({"step": name, "status": "skipped", "why": why})
                print(f"gpu_check: [{name}] skipped: {why}", file=log, flush=True)
                continue
            print(f"gpu_check: [{name}] {subprocess.list2cmdline(cmd)}", file=log, flush=True)
            print(f"gpu_check: [{name}] running (limit {limit} s; output in {out / 'gpu-check.log'})", flush=True)
            start = time.monotonic()
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
            except subprocess.TimeoutExpired:
                rc = 124
            seconds = time.monotonic() - start
            results.append({"step": name, "status": "passed" if rc == 0 else "failed", "exit": rc,
                            "seconds": round(seconds, 1), "limit_s": limit, "command": cmd})
            print(f"gpu_check: [{name}] exit {rc} after {seconds:.0f} s", file=log, flush=True)
    for name, file in (("fit", runs / "fit" / "results.json"), ("plan", out / "plan-check.json")):
        if file.is_file():
            next(r for r in results if r["step"] == name)["result"] = json.loads(file.read_text())
    import torch

    summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps": results,
               "total_s": round(sum(r.get("seconds", 0) for r in results), 1)}
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    rows = [f"| {r['step']} | {r['status']} | {r.get('seconds', '-')} | {r.get('why', '')} |" for r in results]
    plan = next((r.get("result") for r in results if r["step"] == "plan"), None)
    note = (f"\nPlan check: estimated {plan['estimated_bytes'] / 2**30:.2f} GiB, measured (max_memory_allocated) "
            f"{plan['measured_bytes'] / 2**30:.2f} GiB, ratio {plan['ratio']:.3f}.\n" if plan else "")
    (out / "gpu-check.md").write_text(f"# GPU check on {summary['device']}\n\n| step | status | seconds | note |\n"
                                      "|---|---|---|---|\n" + "\n".join(rows) + "\n" + note)
    shutil.rmtree(runs, ignore_errors=True)
    print((out / "gpu-check.md").read_text())
    return 0 if all(r["status"] != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
