"""The program that runs model-written code inside the sandbox (`gradual.tasks.code.run_sandboxed`); standard library
only, copied into the sandbox's temporary directory and started as `python -I -B sandbox_runner.py setup <config>`.

Stage `setup` (a fresh single-threaded interpreter, so namespaces can be created) isolates itself with whatever the
OS allows, prints one line `GRADUAL-SANDBOX-LAYERS {...}` on stderr naming the layers in effect, and re-executes
itself as stage `run`:

- network: a new network namespace (`unshare(CLONE_NEWNET)`; as non-root inside a new user namespace that maps
  only the caller's own uid) has no interface but a loopback that is down, so no connection leaves it, for the
  program and anything it starts (ctypes, subprocesses) alike.
- filesystem: in a new mount namespace every mount is made read-only (`mount_setattr`, recursive) except a bind
  mount of the temporary directory: no write outside it succeeds, root or not, Python or not.
- processes: RLIMIT_NPROC. Linux does not enforce it for root, so as root the real uid becomes 65534 (nobody),
  the capability bounding set is emptied but for CAP_DAC_READ_SEARCH (so the interpreter under a private home can
  still be read) and a seccomp filter refuses every uid change (the effective uid stays 0, which would otherwise
  let the program set its real uid back to 0), before the re-exec: the limit then holds.
- resources: CPU time, address space, file size and core dumps (RLIMIT_CPU, _AS, _FSIZE, _CORE).

Stage `run` installs an audit hook (`sys.addaudithook`) that refuses, in this interpreter, opening a file for
writing or changing a path outside the temporary directory, and every network call (connect, bind, sendto,
name lookups); each refusal is remembered, so a program that catches the PermissionError still ends in that
category. The hook is the only network and write guard where the OS layers are unavailable; it is weaker: code
that escapes Python (ctypes, a spawned program) is not seen by it, nor where a path relative to a directory
descriptor (`dir_fd`) leads.

The verdict. The program runs in this interpreter, so whatever it can make the process do (end with exit code 0,
`sys.exit`, `os._exit`, a signal, an `exec` of another program, text on stdout or stderr) says nothing about its
tests. The caller therefore decides only from a report on a pipe of its own (`report_fd`): `setup` writes the layers
line, `run` writes `STARTED` just before the program and, once the program has ended, one line with a key the caller
put in another pipe (`key_fd`, never read before the program has ended) and the category. Passed needs that line
with the key and `passed`, which the runner writes only when the program's last statement returned; an ending that
leaves no such line is `exited_early` (the caller's limits and crash signals aside). Covered: any way the program
ends or writes by its own means. Not covered: a program that deliberately targets the runner inside its own
interpreter (reads the key pipe by its descriptor, patches the runner or walks its frames): nothing in one
interpreter can be hidden from code running in it, as under HumanEval's own harness.

Exit codes name the outcome (`EXIT_CODES`), for a reader of the process table; the caller does not trust them.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import sys
from typing import NoReturn

EXIT_CODES = {"passed": 0, "syntax": 3, "assertion": 4, "name_error": 5, "runtime_error": 6, "memory": 7,
              "process_limit": 8, "file_size": 9, "forbidden_write": 10, "network": 11, "exited_early": 13}
SETUP_FAILED = 12
MARKER = "GRADUAL-SANDBOX-LAYERS "
STARTED = "GRADUAL-SANDBOX-STARTED"
KEY_BYTES = 32
NOBODY = 65534

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture Linux added it to (5.12)
PR_CAPBSET_DROP, CAP_DAC_READ_SEARCH = 24, 2


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _call(fn: object, *args: object) -> bool:
    return fn(*args) == 0  # type: ignore[operator]


def _write(path: str, text: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(text)
        return True
    except OSError:
        return False


def _namespaces(libc: ctypes.CDLL, root: bool) -> bool:
    """A new network and mount namespace (inside a new user namespace when not root); False if the OS refuses."""
    if not hasattr(libc, "unshare"):
        return False
    if root:
        return _call(libc.unshare, CLONE_NEWNET | CLONE_NEWNS)
    uid, gid = os.getuid(), os.getgid()
    if not _call(libc.unshare, CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS):
        return False
    # a user namespace without a uid map could not even create a file; one that maps our own uid keeps us as we are
    return (_write("/proc/self/setgroups", "deny") and _write("/proc/self/uid_map", f"{uid} {uid} 1")
            and _write("/proc/self/gid_map", f"{gid} {gid} 1"))


def _try_namespaces(libc: ctypes.CDLL, root: bool) -> bool:
    """`_namespaces`, first tried in a forked child: a half-made user namespace (one the OS lets us create but not
    map, e.g. under AppArmor's restriction of unprivileged user namespaces) could not even create a file, and
    cannot be left again."""
    pid = os.fork()
    if pid == 0:
        os._exit(0 if _namespaces(libc, root) else 1)
    if os.waitpid(pid, 0)[1] != 0:
        return False
    return _namespaces(libc, root)


def _read_only_mounts(libc: ctypes.CDLL, folder: str) -> bool:
    """Every mount read-only except a bind mount of `folder`; private, so nothing propagates to the host."""
    def setattr_(path: str, attr: _MountAttr) -> bool:
        return libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE, ctypes.byref(attr),
                            ctypes.sizeof(attr)) == 0

    return (_call(libc.mount, None, b"/", None, MS_REC | MS_PRIVATE, None)
            and _call(libc.mount, folder.encode(), folder.encode(), None, MS_BIND | MS_REC, None)
            and setattr_("/", _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0))
            and setattr_(folder, _MountAttr(0, MOUNT_ATTR_RDONLY, 0, 0)))


def _set_limit(kind: int, value: int) -> int:
    """Set a resource limit (soft = hard = `value`), never above a hard limit the caller already has; the value set."""
    hard = resource.getrlimit(kind)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))
    return value


def _tasks_of(uid: int) -> int:
    """Threads (what RLIMIT_NPROC counts) of every process whose real uid is `uid`, from /proc/<pid>/status."""
    count = 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0
    for pid in pids:
        try:
            status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines()
                          if ":" in line)
            if int(status["Uid"].split()[0]) == uid:
                count += int(status.get("Threads", "1"))
        except (OSError, KeyError, ValueError):
            continue
    return count


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


UID_SYSCALLS = {  # setuid, setgid, setreuid, setregid, setgroups, setresuid, setresgid, setfsuid, setfsgid
    "x86_64": (0xC000003E, (105, 106, 113, 114, 116, 117, 119, 122, 123)),
    "aarch64": (0xC00000B7, (146, 144, 145, 143, 159, 147, 149, 151, 152)),
}
"""Per machine: the seccomp audit arch and the numbers of the system calls that change uids, gids or groups."""


def _forbid_uid_changes(libc: ctypes.CDLL) -> bool:
    """A seccomp filter that fails every uid/gid/groups change with EPERM (and any system call of another ABI, the
    way around it); False where the machine is not listed or the kernel refuses the filter."""
    import platform

    if platform.machine() not in UID_SYSCALLS:
        return False
    arch, numbers = UID_SYSCALLS[platform.machine()]
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO
    n = len(numbers)
    program = [(load, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, deny),  # another ABI: refused
               (load, 0, 0, 0), (jge, n + 1, 0, 0x40000000)]  # x32 numbers: refused
    program += [(jeq, n - i, 0, number) for i, number in enumerate(numbers)]
    program += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    filters = (_SockFilter * len(program))(*[_SockFilter(*f) for f in program])
    prog = _SockFprog(len(program), filters)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    return (libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) == 0
            and libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(prog), 0, 0) == 0)


def _process_limit(libc: ctypes.CDLL | None, root: bool, margin: int) -> str:
    """RLIMIT_NPROC at `margin` processes more than the (real) user already runs; as root, first become real uid
    nobody without the capabilities that would exempt it."""
    if root:
        if libc is None or not hasattr(libc, "prctl"):
            return "none (root, no prctl)"
        try:
            last = int(open("/proc/sys/kernel/cap_last_cap").read())
        except (OSError, ValueError):
            last = 40
        limit = _set_limit(resource.RLIMIT_NPROC, _tasks_of(NOBODY) + margin)
        try:
            os.setresuid(NOBODY, 0, 0)  # effective uid 0 keeps files readable; the real uid is what the limit counts
        except OSError:  # a user namespace that maps only root
            return "none (root, the real uid could not change)"
        for cap in range(last + 1):
            if cap != CAP_DAC_READ_SEARCH and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                return "none (root, capabilities not dropped)"
        # while its effective uid is 0 a process may set its real uid back to 0 without any capability
        if not _forbid_uid_changes(libc):
            return f"RLIMIT_NPROC={limit} (real uid {NOBODY}, capabilities dropped; no seccomp here: a program can " \
                   "restore real uid 0 and escape it)"
        return f"RLIMIT_NPROC={limit} (real uid {NOBODY}, capabilities dropped, uid changes refused by seccomp)"
    if not os.path.isdir("/proc"):
        return "none (no /proc to count the user's processes by)"
    limit = _set_limit(resource.RLIMIT_NPROC, _tasks_of(os.getuid()) + margin)
    return f"RLIMIT_NPROC={limit}"


def setup(config: dict) -> None:
    folder = os.path.realpath(config["folder"])
    libc = _libc() if sys.platform.startswith("linux") else None
    root = os.geteuid() == 0
    layers = {"network": "audit hook", "filesystem": "audit hook"}
    if libc is not None and config["namespaces"] and (_try_namespaces(libc, root)
                                                     or (root and _try_namespaces(libc, False))):
        layers["network"] = "network namespace + audit hook"
        if _read_only_mounts(libc, folder):
            layers["filesystem"] = "read-only mounts + audit hook"
        os.chdir(folder)  # the working directory was the folder under the bind mount, now read-only
    for kind, value in ((resource.RLIMIT_CPU, config["cpu_seconds"]), (resource.RLIMIT_AS, config["memory_bytes"]),
                        (resource.RLIMIT_FSIZE, config["file_bytes"]), (resource.RLIMIT_CORE, 0)):
        _set_limit(kind, value)
    layers["processes"] = _process_limit(libc, root, config["process_margin"])
    os.write(config["report_fd"], (MARKER + json.dumps(layers) + "\n").encode())
    os.execv(sys.executable, [sys.executable, "-I", "-B", os.path.abspath(__file__), "run", folder,
                              str(config["key_fd"]), str(config["report_fd"])])


# ---------------------------------------------------------------------------------------------------------------
# Stage `run`: the audit hook, then the program
# ---------------------------------------------------------------------------------------------------------------

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.remove": 1, "os.rename": 2, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
               "os.truncate": 1, "os.symlink": 2, "os.link": 2, "os.utime": 1, "os.mkfifo": 1, "os.mknod": 1,
               "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.copytree": 2, "shutil.move": 2,
               "os.removexattr": 1, "os.setxattr": 1}
"""Audit events that change a path, with how many leading arguments are paths (the rest are modes, fds, ...)."""
NETWORK_EVENTS = {"socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                  "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo"}
ALLOWED_WRITES = ("/dev/null",)


def install_hook(folder: str, violations: list[str]) -> None:
    """Refuse writes outside `folder` and any network call, in this interpreter; remember each refusal."""
    def inside(path: object) -> bool:
        if isinstance(path, int) or path is None:
            return True  # an already open file descriptor: opened under this same hook
        text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
        real = os.path.realpath(text)
        return real in ALLOWED_WRITES or real == folder or real.startswith(folder + os.sep)

    def refuse(kind: str, what: str) -> None:
        violations.append(kind)
        raise PermissionError(errno.EACCES, f"the sandbox refuses {what}")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS
            if writing and not inside(path):
                refuse("forbidden_write", f"writing {path!r} outside its directory")
        elif event in PATH_EVENTS:
            for path in args[:PATH_EVENTS[event]]:
                if not inside(path):
                    refuse("forbidden_write", f"{event} on {path!r} outside its directory")
        elif event in NETWORK_EVENTS:
            refuse("network", f"network access ({event})")

    sys.addaudithook(hook)


def category(exc: BaseException | None, violations: list[str]) -> str:
    """How the program ended: a refused write or network call first, then the exception it ended with."""
    if violations:
        return violations[0]
    if exc is None:
        return "passed"
    if isinstance(exc, SystemExit):
        return "exited_early"  # sys.exit(), exit(), raise SystemExit: whatever the code, the program did not finish
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, BlockingIOError) or (isinstance(exc, RuntimeError) and "can't start new thread" in str(exc)):
        return "process_limit"  # fork, a subprocess or a thread refused under RLIMIT_NPROC (EAGAIN)
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return "file_size"
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED):
        return "network"
    if isinstance(exc, AssertionError):
        return "assertion"
    if isinstance(exc, NameError):
        return "name_error"
    return "runtime_error"


def run(folder: str, key_fd: int, report_fd: int) -> None:
    """Run solution.py, then report its category with the caller's key (`report`)."""
    import traceback

    # bound before the program runs, so that it cannot swap them by patching os or this module
    me, getpid, read, write, exit_, decide = os.getpid(), os.getpid, os.read, os.write, os._exit, category
    verdicts = {name: f" {name}\n".encode() for name in EXIT_CODES}
    for fd in (key_fd, report_fd):
        os.set_inheritable(fd, False)  # a program it spawns gets neither

    def report(verdict: str) -> NoReturn:
        """The category after the caller's key, from this process only (a fork of the program never reports);
        the key is read only now, after the program has ended. Any failure here leaves no report: not passed."""
        try:
            if getpid() == me:
                write(report_fd, b"\n" + read(key_fd, KEY_BYTES) + verdicts[verdict])
        finally:
            exit_(EXIT_CODES[verdict])

    violations: list[str] = []
    source = open(os.path.join(folder, "solution.py"), encoding="utf-8").read()
    try:
        code = compile(source, "solution.py", "exec")
    except Exception:  # noqa: BLE001 - SyntaxError, and ValueError / MemoryError for what the parser cannot take
        traceback.print_exc()
        report("syntax")
    # the C library drops TMPDIR when the real and effective uid differ (root's sandbox): without it, tempfile
    # would probe /tmp first, a refused write
    os.environ["TMPDIR"] = folder
    install_hook(folder, violations)
    write(report_fd, (STARTED + "\n").encode())
    ended: BaseException | None = None
    try:
        exec(code, {"__name__": "__main__"})
    except BaseException as e:  # noqa: BLE001 - every way the program ends is a category
        ended = e
    verdict = decide(ended, violations)
    try:
        if ended is not None:
            traceback.print_exception(ended)
        ended = None
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - the program may have closed or replaced its streams
        pass
    report(verdict)


if __name__ == "__main__":
    try:
        if sys.argv[1] == "setup":
            setup(json.loads(sys.argv[2]))
        else:
            run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - the sandbox itself failed, not the program
        import traceback

        traceback.print_exc()
        os._exit(SETUP_FAILED)
