"""The code sandbox (`gradual.tasks.code.run_sandboxed`) in real subprocesses: what model-written code may try (an
infinite loop, a fork bomb, a huge allocation, a write outside its directory, a network connection) ends as a
failure category, is contained, and the caller carries on.

Where the OS layers are in effect (`sandbox_layers()`: a network namespace, read-only mounts), extra tests check
them on their own: a spawned program, which the in-interpreter audit hook does not see, is stopped too.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from gradual.tasks.code import run_sandboxed, sandbox_layers

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
