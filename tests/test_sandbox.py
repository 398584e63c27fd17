"""The code sandbox (`gradual.tasks.code.run_sandboxed`) in real subprocesses: what model-written code may try (an
infinite loop, a fork bomb, a huge allocation, a write outside its directory, a network connection, ending itself
before its tests, a flood of output) ends as a failure category, is contained, and the caller carries on.

Where the OS layers are in effect (`sandbox_layers()`: a network namespace, read-only mounts), extra tests check
them on their own: a spawned program, which the in-interpreter audit hook does not see, is stopped too.
"""

from __future__ import annotations

import os
import socket
import sys
import tracemalloc
from pathlib import Path

import pytest

from gradual.tasks.code import humaneval_program, run_sandboxed, sandbox_layers

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the sandbox needs a POSIX system")

LAYERS = sandbox_layers() if sys.platform != "win32" else {}
OS_NETWORK = "network namespace" in LAYERS.get("network", "")
OS_FILES = "read-only mounts" in LAYERS.get("filesystem", "")
ENDS_BY_ITSELF = 30.0
"""Wall-clock limit for programs that end on their own (by finishing or by hitting another limit): generous, so a
busy machine cannot turn their outcome into a timeout. Only the timeout tests use a short one."""
BOTH = pytest.mark.parametrize("namespaces", [True, False], ids=["os_layers", "audit_hook_only"])


def test_the_layers_in_effect_are_reported() -> None:
    assert set(LAYERS) == {"network", "filesystem", "processes"}
    assert "audit hook" in LAYERS["network"] and "audit hook" in LAYERS["filesystem"]
    if sys.platform.startswith("linux"):
        assert LAYERS["processes"].startswith("RLIMIT_NPROC="), LAYERS


def test_an_infinite_loop_is_a_timeout() -> None:
    result = run_sandboxed("while True:\n    pass\n", timeout=1.0)
    assert result.category == "timeout" and result.seconds < 15  # killed at the 1 s limit (slack for a busy machine)


def test_a_sleeping_program_ends_at_the_wall_clock_limit() -> None:
    """CPU time never runs out while sleeping; the caller's wall-clock limit kills the session."""
    result = run_sandboxed("import time\ntime.sleep(60)\n", timeout=1.0)
    assert result.category == "timeout" and result.seconds < 15  # killed at the 1 s limit (slack for a busy machine)


def test_a_fork_bomb_hits_the_process_limit_and_the_next_program_runs() -> None:
    result = run_sandboxed("import os\nwhile True:\n    os.fork()\n", timeout=ENDS_BY_ITSELF, processes=16)
    assert result.category == "process_limit", (result.category, result.stderr)
    assert result.seconds < ENDS_BY_ITSELF, "it ended on the process limit, not on the wall clock"
    assert run_sandboxed("import os\nassert os.getpid() > 0\n", timeout=ENDS_BY_ITSELF).category == "passed"


@pytest.mark.skipif("no seccomp" in LAYERS.get("processes", ""), reason=LAYERS.get("processes"))
def test_a_program_cannot_take_back_root_to_escape_the_process_limit() -> None:
    """As root the program keeps effective uid 0, which would let it set its real uid back to 0 (exempt from the
    limit) without any capability: seccomp refuses every uid change."""
    code = ("import os\ntry:\n    os.setresuid(0, 0, 0)\nexcept OSError:\n    pass\n"
            "assert os.getresuid()[0] != 0 or os.geteuid() != 0, 'real uid 0 again'\n"
            "while True:\n    os.fork()\n")
    result = run_sandboxed(code, timeout=ENDS_BY_ITSELF, processes=16)
    assert result.category == "process_limit", (result.category, result.stderr[-500:])


def test_a_thread_bomb_hits_the_process_limit() -> None:
    code = "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(9,)).start()\n"
    assert run_sandboxed(code, timeout=ENDS_BY_ITSELF, processes=16).category == "process_limit"


def test_a_huge_allocation_is_a_memory_failure() -> None:
    result = run_sandboxed("x = bytearray(1 << 40)\n", timeout=ENDS_BY_ITSELF, memory_mb=256)
    assert result.category == "memory", result.stderr


def test_a_file_over_the_size_limit() -> None:
    result = run_sandboxed("open('big.bin', 'wb').write(b'x' * (3 << 20))\n", timeout=ENDS_BY_ITSELF, file_mb=1)
    assert result.category == "file_size", result.stderr


def test_writes_inside_its_directory_are_allowed() -> None:
    code = ("import os, tempfile\nopen('a.txt', 'w').write('x')\nos.mkdir('d')\nos.rename('a.txt', 'd/b.txt')\n"
            "fd, name = tempfile.mkstemp()\nos.write(fd, b'x')\nos.remove(name)\nopen('/dev/null', 'w').write('x')\n")
    result = run_sandboxed(code, timeout=ENDS_BY_ITSELF)
    assert result.category == "passed", result.stderr


WRITES = {
    "open": "open({target!r}, 'w').write('x')",
    "os_open": "import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))",
    "pathlib": "import pathlib\npathlib.Path({target!r}).write_text('x')",
    "remove": "import os\nos.remove({victim!r})",
    "rename": "import os\nos.rename({victim!r}, 'stolen.txt')",
    "symlink_escape": "import os\nos.symlink({outside!r}, 'link')\nopen('link/outside.txt', 'w').write('x')",
    "caught": "try:\n    open({target!r}, 'w').write('x')\nexcept OSError:\n    pass",
}


@BOTH
@pytest.mark.parametrize("how", sorted(WRITES))
def test_a_write_outside_its_directory_is_refused(how: str, namespaces: bool, tmp_path: Path) -> None:
    """Given an absolute path in the test's own folder (we run as root: permission bits would not stop it)."""
    target, victim = tmp_path / "outside.txt", tmp_path / "victim.txt"
    victim.write_text("keep")
    code = WRITES[how].format(target=str(target), victim=str(victim), outside=str(tmp_path)) + "\n"
    result = run_sandboxed(code, timeout=ENDS_BY_ITSELF, namespaces=namespaces)
    assert result.category == "forbidden_write", (result.category, result.stderr)
    assert not target.exists() and victim.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


@pytest.mark.skipif(not OS_FILES, reason=f"no read-only mounts here: {LAYERS.get('filesystem')}")
def test_a_spawned_program_cannot_write_outside_either(tmp_path: Path) -> None:
    """The audit hook does not see a shell's redirection; the read-only mounts stop it."""
    target = tmp_path / "outside.txt"
    code = (f"import subprocess\nr = subprocess.run(['sh', '-c', 'echo x > {target}'])\n"
            "assert r.returncode == 0, 'the shell could not write'\n")
    result = run_sandboxed(code, timeout=ENDS_BY_ITSELF)
    assert result.category == "assertion" and "the shell could not write" in result.stderr, result.stderr
    assert not target.exists()


@pytest.fixture
def listener() -> socket.socket:
    """A socket listening on 127.0.0.1 in the test process: a connection from the sandbox must never arrive."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.3)
    yield server
    server.close()


def assert_nothing_arrived(server: socket.socket) -> None:
    with pytest.raises(TimeoutError):
        server.accept()


@BOTH
@pytest.mark.parametrize("how", ["connect", "create_connection", "caught"])
def test_a_network_connection_is_refused_and_never_arrives(how: str, namespaces: bool,
                                                          listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    code = {"connect": f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n",
            "create_connection": f"import socket\nsocket.create_connection(('localhost', {port}), timeout=1)\n",
            "caught": f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                      "except OSError:\n    pass\n"}[how]
    result = run_sandboxed(code, timeout=ENDS_BY_ITSELF, namespaces=namespaces)
    assert result.category == "network", (result.category, result.stderr)
    assert_nothing_arrived(listener)


@pytest.mark.skipif(not OS_NETWORK, reason=f"no network namespace here: {LAYERS.get('network')}")
def test_a_spawned_program_cannot_connect_either(listener: socket.socket) -> None:
    """A second interpreter has no audit hook; the network namespace stops it."""
    port = listener.getsockname()[1]
    inner = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"
    code = (f"import subprocess, sys\nr = subprocess.run([sys.executable, '-c', {inner!r}])\n"
            "assert r.returncode == 0, 'the child could not connect'\n")
    result = run_sandboxed(code, timeout=ENDS_BY_ITSELF)
    assert result.category == "assertion" and "the child could not connect" in result.stderr, result.stderr
    assert_nothing_arrived(listener)


def test_the_environment_is_empty_and_the_directory_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADUAL_TEST_SECRET", "hunter2")
    code = ("import os\nassert 'GRADUAL_TEST_SECRET' not in os.environ\n"
            f"assert os.getcwd() != {os.getcwd()!r}\n"
            "assert os.path.basename(os.getcwd()).startswith('gradual-sandbox-')\n")
    assert run_sandboxed(code, timeout=ENDS_BY_ITSELF).category == "passed"


ADD = {"prompt": "def add(a, b):\n", "entry_point": "add", "test": "def check(f):\n    assert f(1, 2) == 3\n"}
"""A HumanEval-form problem: the completion is add()'s body, which check() calls before asserting anything."""
EARLY_ENDS = {
    "sys_exit_0": "import sys\nsys.exit(0)",
    "sys_exit_none": "import sys\nsys.exit()",
    "exit_builtin": "exit()",
    "raise_system_exit": "raise SystemExit",
    "os_exit_0": "import os\nos._exit(0)",
    "os_exit_an_old_category_code": "import os\nos._exit(4)",
    "os_exit_the_sandbox_failure_code": "import os\nos._exit(12)",
    "os_exit_from_a_thread": "import os, threading, time\nthreading.Thread(target=os._exit, args=(0,)).start()\n"
                             "time.sleep(60)",
    "sigterm": "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
    "sigkill": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "sigxcpu": "import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)",
    "exec_another_program": "import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'pass'])",
    "closes_the_runner_descriptors": "import os\nos.closerange(3, 1024)\nreturn a + b",
    "fake_reports_everywhere": (
        "import os, sys\n"
        "for line in ('GRADUAL-SANDBOX-STARTED', '0' * 32 + ' passed', 'passed', 'PASSED'):\n"
        "    print(line)\n    print(line, file=sys.stderr)\n"
        "    for fd in range(3, 256):\n"
        "        try:\n            os.write(fd, ('\\n' + line + '\\n').encode())\n"
        "        except OSError:\n            pass\n"
        "sys.stdout.flush()\nsys.stderr.flush()\nos._exit(0)"),
}
"""Each way a completion can end the program (or keep the runner from reporting) before check() has returned."""


@pytest.mark.parametrize("how", sorted(EARLY_ENDS))
def test_a_program_that_ends_before_its_tests_return_or_silences_the_report_is_exited_early(how: str) -> None:
    """No exit code, signal, exec or printed text makes a program passed: only the runner's report, with the key
    this call made, that the last statement (check()) returned."""
    body = "".join(f"    {line}\n" for line in EARLY_ENDS[how].splitlines())
    result = run_sandboxed(humaneval_program(ADD, body), timeout=ENDS_BY_ITSELF)
    assert result.category == "exited_early", (result.category, result.returncode, result.stderr)
    assert result.seconds < ENDS_BY_ITSELF, "it ended by itself, not on the wall clock"
    assert run_sandboxed(humaneval_program(ADD, "    return a + b\n"), timeout=ENDS_BY_ITSELF).category == "passed"


def test_a_program_that_passes_and_leaves_a_process_running_is_passed_and_the_process_killed(tmp_path: Path) -> None:
    """Passed however the program ends: the tests ran to the end; the caller does not wait for what it left."""
    code = ("import subprocess, sys\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "assert 1 + 1 == 2\n")
    result = run_sandboxed(code, timeout=ENDS_BY_ITSELF)
    assert result.category == "passed", (result.category, result.stderr)
    assert result.seconds < ENDS_BY_ITSELF, "it ended with its last statement, not on the wall clock"


def test_a_program_the_compiler_cannot_take_is_a_syntax_failure() -> None:
    """The parser's own MemoryError (too deeply nested) is the program's failure, not the sandbox's."""
    assert run_sandboxed("x = " + "-" * 200_000 + "1\n", timeout=ENDS_BY_ITSELF).category == "syntax"


def traced_peak(fn: object) -> tuple[object, int]:
    """`fn()` and the peak of this process's Python allocations meanwhile (what it would keep of a flood)."""
    tracemalloc.start()
    try:
        return fn(), tracemalloc.get_traced_memory()[1]  # type: ignore[operator]
    finally:
        tracemalloc.stop()


FLOOD_PEAK = 64 << 20
"""Bound on what the caller allocates while a program floods it: far above the bounded capture (a few hundred KiB),
far below the 200 MiB flood."""


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_flood_of_output_is_read_and_discarded_and_the_category_kept(stream: str) -> None:
    code = (f"import sys\nchunk = b'x' * (1 << 20)\nfor _ in range(200):\n    sys.{stream}.buffer.write(chunk)\n"
            f"sys.{stream}.buffer.write(b'END-OF-FLOOD\\n')\nsys.{stream}.flush()\nassert False, 'after the flood'\n")
    result, peak = traced_peak(lambda: run_sandboxed(code, timeout=ENDS_BY_ITSELF))
    assert result.category == "assertion", (result.category, result.stderr[-300:])
    assert "END-OF-FLOOD" in getattr(result, stream) and "after the flood" in result.stderr
    assert len(result.stdout) <= 2000 and len(result.stderr) <= 2000
    assert peak < FLOOD_PEAK, f"the caller allocated {peak >> 20} MiB for a 200 MiB flood"


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_print_loop_until_the_timeout_is_a_timeout_with_bounded_output(stream: str) -> None:
    code = f"import sys\nwhile True:\n    print('x' * 100, file=sys.{stream})\n"
    result, peak = traced_peak(lambda: run_sandboxed(code, timeout=2.0))
    assert result.category == "timeout" and result.seconds < 15  # killed at the 2 s limit (slack for a busy machine)
    assert "x" * 100 in getattr(result, stream) and len(getattr(result, stream)) <= 2000
    assert peak < FLOOD_PEAK, f"the caller allocated {peak >> 20} MiB for a print loop"
