"""
Run untrusted, model-written Python (HumanEval completions) in a separate process.

Two layers:
- OS isolation (Linux, when bubblewrap works here): each call runs in fresh namespaces with no network,
  its own PID space (the code is its init, alone there; every process it starts dies with it), a
  read-only view of only the interpreter's installation and the system libraries (not the repository,
  home directories or the rest of /etc), one writable temp dir (a 64 MiB tmpfs of at most 10000 files with
  bwrap >= 0.8; /dev read-only), no capabilities, as user "nobody". Where that is unavailable (macOS, no
  bwrap, no user namespaces) a warning says so once, and only the second layer remains.
  bwrap adds a few tens of milliseconds to each call.
- In-process guards, always: a fresh interpreter with an empty environment, in its own session (the
  parent kills its process group at the wall-clock timeout), memory limits (RLIMIT_AS/DATA/STACK;
  skipped on macOS, which does not enforce RLIMIT_AS), no core dumps, few queued signals and posix timers
  and no POSIX message queue (which count for the parent user too), a size cap on every file the code
  writes (stdout and stderr included), stdin unavailable, destructive functions disabled
  (reliability_guard). These stop accidents, not adversaries: ctypes or the posix module get around them.
  On Linux (x86_64, aarch64) a seccomp filter, which nothing in the process can lift, also makes these
  calls fail (DENIED_CALLS): starting a process (threads still start, and the parent kills the code if
  more than THREADS_LIMIT run at once, as each takes a PID of the host's), so a fork bomb stays one process;
  making memory outside RLIMIT_AS (memfds, SysV shared memory, semaphores and message queues); changing
  resource limits (its own or another process's); signalling, tracing or reading another process; opening
  a socket (a stream socketpair stays); and the kernel interfaces a sandbox has no use for (io_uring, bpf,
  keyrings, mounts and namespaces, modules, ...). At most 256 open files bound what pipes buffer. Without
  OS isolation the code can still read and write what the user running it can: a root parent (a
  container, typically) therefore runs it as user "nobody" where that user can run the interpreter (the
  warning says which user it is).

success means the code ran to its end: after exec returns, the harness writes a per-call random nonce
to a result file, and the parent checks it. An exit (sys.exit(0), os._exit(0), an atexit handler), an
exception or a signal before that is a failure, whatever the exit status. The nonce is never in the
code's text or environment, so code cannot print or guess it; code that searches the harness's memory
for it can still forge a pass (nothing in the same process can prevent that).

The child is this very file run as a script (`python -I nanochat/execution.py <memory limit> <result
file>`) by the base interpreter (outside any virtual environment, which lives in the repository), with
the nonce and the code on its stdin, so the guard below is ordinary Python rather than a program in a string.
"""

import builtins
import errno
import faulthandler
import io
import json
import linecache
import os
import secrets
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import NamedTuple, Optional

OUTPUT_LIMIT_BYTES = 16 * 1024 * 1024  # per stream and per written file: an endless print loop stays harmless
MEMORY_ERROR_EXIT_CODE = 3  # how the child reports a MemoryError (Python itself exits 1 on an exception)
CODE_FILENAME = "<llm>"  # the name tracebacks give the executed code
RESULT_FILENAME = ".nanochat_result"  # in the temp dir: the harness writes the nonce there after the code ran
SANDBOX_HARNESS_PATH = "/nanochat_sandbox/execution.py"  # where this file appears inside the isolation
SANDBOX_USER_ID = 65534  # "nobody": the code runs as an unprivileged user inside its user namespace
# read-only inside the isolation besides the interpreter: the shared libraries Python and its modules load
SYSTEM_LIBRARY_PATHS = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32",
                        "/etc/ld.so.cache")
PROBE_TIMEOUT = 30.0  # seconds for the one trivial run that decides whether isolation works here
NAMESPACE_EXIT_TIMEOUT = 5.0  # seconds to wait for the kernel to end the processes the code left behind
# under bwrap >= 0.8 the code's temp dir is a tmpfs of this size: files written in a loop until the timeout
# would otherwise put gigabytes on the host's disk
WORKDIR_LIMIT_BYTES = 64 * 1024 * 1024
# ... and at most this many files (links, directories) there, each ~1 KiB of memory that its size does not
# count: the parent counts them with the threads (THREADS_CHECK_INTERVAL) and kills
WORKDIR_FILES_LIMIT = 10000
TIMEOUT_ERROR = "Execution timed out (process killed)"
WORKDIR = "@WORKDIR@"  # in the bwrap command line: where the per-call temp dir goes

# the reference's reliability guard, function for function
DISABLED_OS_FUNCTIONS = ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
                         "fork", "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink",
                         "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown",
                         "getcwd", "chdir")
DISABLED_SHUTIL_FUNCTIONS = ("rmtree", "move", "chown")
BLOCKED_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")
# a seccomp filter, where the machine is one of SECCOMP_ARCHES, denies DENIED_CALLS (EPERM). Tests turn it off
# to check the layers below it.
CALL_FILTER = True
SECCOMP_ARCHES = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # machine: AUDIT_ARCH_* of its native calls
# name: (x86_64 number, aarch64 number), from the kernel's asm/unistd_64.h and asm-generic/unistd.h.
# The filter reads the arguments of these: clone starts a thread (CLONE_THREAD) or a process (denied);
# clone3's flags are behind a pointer, so it gets ENOSYS and glibc falls back to clone; kill and tgkill
# may signal the code's own process only; prlimit64 may read limits (getrlimit) but not set them; socketpair
# makes stream sockets only (a datagram one can send to any unix socket by its address).
INSPECTED_CALLS = {"clone": (56, 220), "clone3": (435, 435), "kill": (62, 129), "tgkill": (234, 131),
                   "prlimit64": (302, 261), "socketpair": (53, 199)}
DENIED_CALLS = {
    # processes: a fork bomb would take the machine's PIDs and memory before the timeout
    "fork": (57, None), "vfork": (58, None),
    # memory outside RLIMIT_AS: memfds, SysV shared memory, semaphores and message queues fill RAM unbounded
    "memfd_create": (319, 279), "memfd_secret": (447, 447), "shmget": (29, 194), "semget": (64, 190),
    "msgget": (68, 186),
    # resource limits, the code's own or another process's: a root evaluator's code could raise its memory
    # limit (CAP_SYS_RESOURCE) or lower the evaluator's (its open files: every later call would fail)
    "setrlimit": (160, 164),
    # the host's other processes and its network, which the code shares where no namespaces isolate it
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "pidfd_getfd": (438, 438), "pidfd_send_signal": (424, 424), "tkill": (200, 130),
    "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240),
    "socket": (41, 198),  # socketpair stays: asyncio's event loop wakes itself through one
    "bind": (49, 200),  # a socketpair's socket could take an abstract name from the host's services
    # counted per user, the code's parent user's too: 128 of them leave that user's host processes none
    "inotify_init": (253, None), "inotify_init1": (294, 26), "fanotify_init": (300, 262),
    # kernel interfaces that no test of a function needs and where privilege escalations are found
    # (container runtimes' default seccomp profiles block them too)
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "bpf": (321, 280), "userfaultfd": (323, 282), "perf_event_open": (298, 241),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106), "reboot": (169, 142),
}
OPEN_FILES_LIMIT = 256  # RLIMIT_NOFILE: also bounds what pipes and sockets can buffer
# RLIMIT_SIGPENDING (posix timers and queued signals; RLIMIT_MSGQUEUE, POSIX message queues, is 0): these
# count for the code's parent user too, whose processes on the host could otherwise get none for the call
PENDING_SIGNALS_LIMIT = 64
# threads the code may run at once, each a PID of the host's: raw clone calls start them without memory that
# RLIMIT_AS counts, and RLIMIT_NPROC does not bind a root evaluator, so the parent counts them and kills
THREADS_LIMIT = 512
# seconds between counts while waiting for the child: a burst of raw clones can pass the limit by a few
# hundred before the kill
THREADS_CHECK_INTERVAL = 0.05
# signals that end a process unless it handles them: the kernel never delivers these to its PID
# namespace's init (the code under bwrap) from inside, so there the harness handles them by exiting
# 128 + N, which reads as that signal. Faults (SIGSEGV, ...) are forced and end it anyway.
TERMINATING_SIGNALS = ("SIGHUP", "SIGQUIT", "SIGABRT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGTERM",
                       "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR", "SIGXCPU")


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: Optional[str] = None
    timeout: bool = False
    memory_exceeded: bool = False

    def __repr__(self):  # only the fields that are set: most results are short
        shown = ("timeout", "memory_exceeded", "error", "stdout", "stderr")
        return "".join([f"ExecutionResult(success={self.success}",
                        *(f", {name}={getattr(self, name)!r}" for name in shown if getattr(self, name)), ")"])


# -----------------------------------------------------------------------------
# Parent side: OS isolation


class _Isolation(NamedTuple):
    bwrap_arguments: Optional[tuple]  # the bwrap command line up to the per-call temp dir; None: unavailable
    problem: str  # why isolation is unavailable ("" when it is available)
    run_as: Optional[int] = None  # without bwrap, as root: the user the code runs as (None: root itself)


_isolation: Optional[_Isolation] = None  # decided by the first call (not at import), then kept
_isolation_lock = threading.Lock()


def _base_interpreter():
    # outside any virtual environment: a venv lives in the repository, which the isolated child must not see
    # (and both modes then import the same modules)
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _readonly_paths():
    """What the isolated child sees, read-only: the interpreter, its installation prefix (unless that is
    the system's own /usr, which is too wide to show whole) and the system libraries."""
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)} - {"/", "/usr"}
    candidates = sorted({_base_interpreter(), *prefixes, *SYSTEM_LIBRARY_PATHS})
    kept = []
    for path in candidates:
        if os.path.lexists(path) and not any(path.startswith(parent + "/") for parent in kept):
            kept.append(path)
    return kept


def _bwrap_arguments(bwrap):
    user = str(SANDBOX_USER_ID)
    # --as-pid-1: the code is its PID namespace's init, with no bwrap process beside it that it could write
    # into through /proc/1/mem (one without the call filter and the memory limit)
    arguments = [bwrap, "--unshare-all", "--unshare-user", "--uid", user, "--gid", user, "--cap-drop", "ALL",
                 "--die-with-parent", "--as-pid-1", "--new-session", "--clearenv", "--proc", "/proc",
                 "--dev", "/dev"]
    help_text = subprocess.run([bwrap, "--help"], capture_output=True, text=True,
                               timeout=PROBE_TIMEOUT).stdout
    if "--disable-userns" in help_text:  # bwrap >= 0.8: no nested user namespace in which to regain powers
        arguments.append("--disable-userns")
    for path in _readonly_paths():
        if os.path.islink(path) and os.path.dirname(path) == "/":  # merged /usr: /lib -> usr/lib
            arguments += ["--symlink", os.readlink(path), path]
        else:
            arguments += ["--ro-bind", path, path]
    arguments += ["--ro-bind", os.path.abspath(__file__), SANDBOX_HARNESS_PATH]
    if "--size" in help_text:  # bwrap >= 0.8: a tmpfs of bounded size, with the host's result file in it
        result_path = f"{WORKDIR}/{RESULT_FILENAME}"
        arguments += ["--size", str(WORKDIR_LIMIT_BYTES), "--tmpfs", WORKDIR,
                      "--bind", result_path, result_path]
    else:
        arguments += ["--bind", WORKDIR, WORKDIR]
    # /dev is a tmpfs too (only its device nodes stay writable), which would hold files in memory unbounded
    return tuple(arguments + ["--chdir", WORKDIR, "--remount-ro", "/", "--remount-ro", "/dev"])


def _probe_isolation():
    """Runs a trivial program under bwrap; the isolation is used only if that works exactly."""
    if not sys.platform.startswith("linux"):
        return _Isolation(None, f"bubblewrap needs Linux, this is {sys.platform}")
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return _Isolation(None, "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)")
    try:
        arguments = _bwrap_arguments(bwrap)
        result = _execute("print('isolated')", PROBE_TIMEOUT, None, _Isolation(arguments, ""))
    except (OSError, subprocess.SubprocessError) as e:
        return _Isolation(None, f"{bwrap} does not run: {e}")
    if not (result.success and result.stdout == "isolated\n"):
        reason = _last_line(result.stderr) or result.error or f"unexpected output {result.stdout!r}"
        return _Isolation(None, f"{bwrap} cannot isolate here (no user namespaces?): {reason}")
    return _Isolation(arguments, "")


def _unprivileged_user():
    """(SANDBOX_USER_ID, "") where this process is root on Linux and a trivial run as that user works, so that
    code run without bwrap cannot read or write what only root can; else (None, why not)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return None, "" if sys.platform.startswith("linux") else "not Linux"
    try:
        result = _execute("print('unprivileged')", PROBE_TIMEOUT, None, _Isolation(None, "", SANDBOX_USER_ID))
        if result.success and result.stdout == "unprivileged\n":
            return SANDBOX_USER_ID, ""
        reason = _last_line(result.stderr) or result.error or f"unexpected output {result.stdout!r}"
    except (OSError, subprocess.SubprocessError) as e:
        reason = str(e)
    return None, f"the interpreter {_base_interpreter()} does not run as user {SANDBOX_USER_ID}: {reason}"


def _get_isolation():
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation = _probe_isolation()
            if _isolation.problem:
                run_as, why_not = _unprivileged_user()
                _isolation = _isolation._replace(run_as=run_as)
                user = (f"as user {run_as}" if run_as is not None else
                        f"as root ({why_not})" if os.geteuid() == 0 else "as the current user")
                print(f"WARNING: nanochat.execution runs model-written code WITHOUT OS isolation: "
                      f"{_isolation.problem}. Only in-process guards and the call filter remain: the code "
                      f"runs {user} and can read and write what that user can (and, off Linux "
                      f"x86_64/aarch64, use the network and start processes).", file=sys.stderr, flush=True)
        return _isolation


def isolation_problem() -> str:
    """Why model-written code runs without OS isolation here, or "" when it is isolated (probes once)."""
    return _get_isolation().problem


# -----------------------------------------------------------------------------
# Parent side: running the child


def _thread_count(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("Threads:")).split()[1])
    except (OSError, StopIteration, ValueError):  # ended, or not Linux
        return 0


def _over_limits(code_pid, tmpfs):
    """Why the code (process code_pid, its temp dir the tmpfs at that path, if any) must be killed now."""
    if _thread_count(code_pid) > THREADS_LIMIT:
        return f"Process killed: more than {THREADS_LIMIT} threads"
    try:  # the tmpfs in the code's mount namespace
        files = os.statvfs(f"/proc/{code_pid}/root{tmpfs}") if tmpfs else None
    except OSError:  # ended
        files = None
    if files and files.f_files - files.f_ffree > WORKDIR_FILES_LIMIT:
        return f"Process killed: more than {WORKDIR_FILES_LIMIT} files"
    return None


def _exited_within(process, timeout, code_pid, tmpfs=None):
    """None if the child exits within timeout seconds (it is left unreaped), else why it must be killed:
    the timeout, or _over_limits. Waits on a pidfd where there is
    one (Linux >= 5.3): Popen.wait with a timeout polls, which adds up to 50 ms to every call."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        try:
            process.wait(timeout=timeout)
            return None
        except subprocess.TimeoutExpired:
            return TIMEOUT_ERROR
    deadline = time.monotonic() + timeout
    try:  # readable once the child has exited
        while not select.select([pidfd], [], [], min(THREADS_CHECK_INTERVAL, timeout))[0]:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return TIMEOUT_ERROR
            why = _over_limits(code_pid, tmpfs)
            if why:
                return why
        return None
    finally:
        os.close(pidfd)


def _namespace_init(info_fd, deadline):
    """A pidfd and the pid of the init of bwrap's PID namespace, from the JSON bwrap writes to --info-fd as
    soon as it has cloned it (then bwrap closes the fd). None for either where it cannot be had."""
    info = b""
    try:
        while select.select([info_fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(info_fd, 4096)
            if not chunk:
                break
            info += chunk
        pid = json.loads(info)["child-pid"]
        return os.pidfd_open(pid), pid
    except (AttributeError, OSError, ValueError, KeyError):  # no pidfds, gone, or bwrap failed to start
        return None, None
    finally:
        os.close(info_fd)


def _end_namespace(init_pidfd, kill):
    """Wait until every process in the code's PID namespace has ended, killing them first if asked: bwrap
    can exit while the kernel is still killing the processes the code left behind, and none of them may
    outlive execute_code. The namespace's init exits only after all of them are gone."""
    try:
        if kill:
            signal.pidfd_send_signal(init_pidfd, signal.SIGKILL)  # the kernel then kills everything in it
        select.select([init_pidfd], [], [], NAMESPACE_EXIT_TIMEOUT)
    except OSError:
        pass  # ended already
    finally:
        os.close(init_pidfd)


def _wait_or_kill(process, timeout, init_pidfd=None, code_pid=None, tmpfs=None):
    """Wait up to timeout seconds for the child and, under bwrap, until its PID namespace is empty.
    Returns why it had to be killed (see _exited_within), or None."""
    try:  # without the init's pid, process is bwrap, whose root is the host's
        why = _exited_within(process, timeout, code_pid or process.pid, tmpfs if code_pid else None)
        if why is None:
            process.wait()  # reaps at once
        return why
    finally:
        if init_pidfd is not None:
            _end_namespace(init_pidfd, kill=process.returncode is None)
        if process.returncode is None:  # timed out, or we were interrupted while waiting
            # the child is not reaped yet, so its process group id cannot have been reused
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _read_capped(file):
    file.seek(0)
    return file.read(OUTPUT_LIMIT_BYTES).decode("utf-8", errors="replace")


def _ran_to_end(result_path, nonce):
    """Whether the harness wrote the nonce. Opened without following links or blocking: the code may
    have replaced the file with a symlink or a FIFO."""
    try:
        fd = os.open(result_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.read(fd, len(nonce) + 1) == nonce
    finally:
        os.close(fd)


def _last_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _signal_of(returncode, isolated):
    """The signal that ended the child, if any: Popen gives -N; bwrap exits with 128 + N."""
    number = -returncode if returncode < 0 else returncode - 128 if isolated and returncode > 128 else 0
    try:
        return signal.Signals(number).name if number else None
    except ValueError:
        return None


def _make_result(returncode, stdout, stderr, killed_why, ran_to_end, isolated):
    if killed_why:
        return ExecutionResult(False, stdout, stderr, error=killed_why, timeout=killed_why == TIMEOUT_ERROR)
    if ran_to_end and returncode == 0:
        return ExecutionResult(True, stdout, stderr)
    if returncode == MEMORY_ERROR_EXIT_CODE:
        return ExecutionResult(False, stdout, stderr, error=f"Memory limit exceeded: {_last_line(stderr)}",
                               memory_exceeded=True)
    signal_name = _signal_of(returncode, isolated)
    if signal_name:  # e.g. SIGSEGV in a C extension, or the code signalling itself
        return ExecutionResult(False, stdout, stderr, error=f"Process killed by {signal_name}")
    # exit status 0 without the nonce: os._exit(0) or an atexit handler ended the process early
    reason = "exited before the code ran to its end" if returncode == 0 else f"exit code {returncode}"
    return ExecutionResult(False, stdout, stderr, error=_last_line(stderr) or f"Execution failed ({reason})")


def _start_child(child_command, isolation, workdir, deadline, streams):
    """Start the child in workdir, under bwrap when given (workdir, or a bounded tmpfs in its place, is then
    its one writable place; the result file is the host's in either case). Returns the process and (a pidfd,
    the pid) of its PID namespace's init ((None, None) without bwrap, or where there is none to be had).
    Its own session, so that its whole process group can be killed; an empty environment, so that no secret
    of the parent reaches the code (under bwrap, also what the namespace's init shows in /proc/1/environ)."""
    popen_arguments = dict(cwd=workdir, env={}, start_new_session=True, **streams)
    if isolation.run_as is not None:
        popen_arguments.update(user=isolation.run_as, group=isolation.run_as, extra_groups=[])
    if isolation.bwrap_arguments is None:
        return subprocess.Popen(child_command, **popen_arguments), (None, None)
    info_read, info_write = os.pipe()
    bwrap_arguments = [a.replace(WORKDIR, workdir) for a in isolation.bwrap_arguments]
    command = [*bwrap_arguments, "--info-fd", str(info_write), *child_command]
    try:
        process = subprocess.Popen(command, pass_fds=(info_write,), **popen_arguments)
    except BaseException:
        os.close(info_read)
        raise
    finally:
        os.close(info_write)
    return process, _namespace_init(info_read, deadline)


def _execute(code, timeout, maximum_memory_bytes, isolation):
    nonce = secrets.token_hex(16).encode()  # per call, never in the code's text or environment
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="nanochat_exec_", ignore_cleanup_errors=True) as workdir, \
            tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as stdout, \
            tempfile.TemporaryFile() as stderr:
        stdin.write(nonce + b"\n" + code.encode("utf-8", errors="replace"))
        stdin.seek(0)
        result_path = os.path.join(workdir, RESULT_FILENAME)
        open(result_path, "wb").close()  # here, so that bwrap can bind it into a tmpfs workdir
        harness_path = SANDBOX_HARNESS_PATH if isolation.bwrap_arguments else os.path.abspath(__file__)
        if isolation.run_as is not None:  # the user's own temp dir, and a copy of this file it can read
            harness_path = shutil.copy(harness_path, workdir)
            for path in (workdir, result_path):
                os.chown(path, isolation.run_as, isolation.run_as)
        limit = "none" if maximum_memory_bytes is None else str(int(maximum_memory_bytes))
        # -I: ignore PYTHON* variables and user site, keep this file's folder off sys.path; -X utf8: UTF-8 I/O
        command = [_base_interpreter(), "-I", "-X", "utf8", harness_path, limit, result_path,
                   "filter" if CALL_FILTER else "no-filter"]
        process, init = _start_child(command, isolation, workdir, deadline,
                                     dict(stdin=stdin, stdout=stdout, stderr=stderr))
        tmpfs = workdir if "--size" in (isolation.bwrap_arguments or ()) else None
        killed_why = _wait_or_kill(process, max(0.0, deadline - time.monotonic()), *init, tmpfs)
        out, err = _read_capped(stdout), _read_capped(stderr)
        ran_to_end = _ran_to_end(result_path, nonce)
    return _make_result(process.returncode, out, err, killed_why, ran_to_end,
                        isolation.bwrap_arguments is not None)


def execute_code(code: str, timeout: float = 5.0,
                 maximum_memory_bytes: Optional[int] = 256 * 1024 * 1024) -> ExecutionResult:
    """Run code in a fresh guarded interpreter (OS-isolated where possible), in a temporary directory,
    for at most timeout seconds (wall clock). maximum_memory_bytes=None disables the memory limit.
    success means the code ran to its end (an early sys.exit(0) or os._exit(0) is a failure); error is
    then None, else the last line of the traceback or the reason."""
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    return _execute(code, timeout, maximum_memory_bytes, _get_isolation())


# -----------------------------------------------------------------------------
# Child side


def _set_resource_limits(maximum_memory_bytes):
    import resource  # POSIX only; imported here so the parent side never needs it

    limits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, OUTPUT_LIMIT_BYTES),
              (resource.RLIMIT_NOFILE, OPEN_FILES_LIMIT)]
    if sys.platform.startswith("linux"):
        limits += [(resource.RLIMIT_SIGPENDING, PENDING_SIGNALS_LIMIT), (resource.RLIMIT_MSGQUEUE, 0)]
    if maximum_memory_bytes is not None and sys.platform != "darwin":
        memory_limits = (resource.RLIMIT_AS, resource.RLIMIT_DATA, resource.RLIMIT_STACK)
        limits += [(r, maximum_memory_bytes) for r in memory_limits]
    for which, value in limits:
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)  # an unprivileged process cannot raise its hard limit
        resource.setrlimit(which, (value, value))


def call_numbers(machine):
    """{call name: its number on machine (None where it has no such call)}, of INSPECTED_CALLS and
    DENIED_CALLS; machine is one of SECCOMP_ARCHES."""
    column = list(SECCOMP_ARCHES).index(machine)
    return {name: numbers[column] for name, numbers in {**INSPECTED_CALLS, **DENIED_CALLS}.items()}


def _call_filter(machine, pid):
    """The seccomp program (classic BPF, 8 bytes a row) for process pid: DENIED_CALLS, clone without
    CLONE_THREAD, kill and tgkill of another process, prlimit64 with new limits and socketpair of another
    type than SOCK_STREAM fail with EPERM; clone3 fails with ENOSYS. Calls of another ABI (i386 via int
    0x80, x32) get ENOSYS: the interpreter makes none."""
    number = call_numbers(machine)
    rows = [("ld", 4), ("jeq", SECCOMP_ARCHES[machine], None, "nosys"), ("ld", 0)]  # arch at 4, nr at 0
    if machine == "x86_64":
        rows.append(("jge", 0x40000000, "nosys", None))  # the x32 ABI's numbers
    rows += [("jeq", number["clone3"], "nosys", None), ("jeq", number["kill"], "to self", None),
             ("jeq", number["tgkill"], "to self", None), ("jeq", number["prlimit64"], "read only", None),
             ("jeq", number["socketpair"], "stream", None),
             *[("jeq", number[name], "deny", None) for name in DENIED_CALLS if number[name] is not None],
             ("jeq", number["clone"], None, "allow"),
             ("ld", 16), ("jset", 0x00010000, "allow", "deny"),  # the flags of clone: CLONE_THREAD?
             ("to self",), ("ld", 16), ("jeq", pid, "allow", "deny"),  # the first argument's low 32 bits
             # the third argument, the new limits, is a NULL pointer (both halves 0)
             ("read only",), ("ld", 32), ("jeq", 0, None, "deny"), ("ld", 36), ("jeq", 0, "allow", "deny"),
             ("stream",), ("ld", 24), ("jset", 0xE, "deny", "allow"),  # the type (SOCK_STREAM: 1) and flags
             ("allow",), ("ret", 0x7FFF0000), ("deny",), ("ret", 0x00050000 | errno.EPERM),
             ("nosys",), ("ret", 0x00050000 | errno.ENOSYS)]
    label, program = {}, []
    for row in rows:  # a 1-tuple names the row after it
        if len(row) == 1:
            label[row[0]] = len(program)
        else:
            program.append(row)
    codes = {"ld": 0x20, "jeq": 0x15, "jge": 0x35, "jset": 0x45, "ret": 0x06}  # BPF_LD|BPF_W|BPF_ABS, ...
    code = b""
    for i, (op, k, *targets) in enumerate(program):
        jt, jf = [label[t] - i - 1 if t else 0 for t in targets] if targets else (0, 0)
        code += struct.pack("=HBBI", codes[op], jt, jf, k)
    return code


def _call_filter_installer():
    """A function that installs _call_filter in this process for good: it holds for all that the process
    runs (Linux x86_64/aarch64; elsewhere it does nothing, and the other layers remain). ctypes is loaded
    here, so that the filter can go in after the memory limit, which loading it could exceed."""
    import ctypes
    import platform
    if not sys.platform.startswith("linux") or platform.machine() not in SECCOMP_ARCHES:
        return lambda: None
    rows = _call_filter(platform.machine(), os.getpid())
    program = ctypes.create_string_buffer(rows, len(rows))
    fprog = struct.pack("@HP", len(rows) // 8, ctypes.addressof(program))  # struct sock_fprog
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong]

    def install(program=program):  # fprog points into program: it must live until the kernel copied it
        # PR_SET_NO_NEW_PRIVS (38), then PR_SET_SECCOMP (22) in SECCOMP_MODE_FILTER (2)
        if prctl(38, 1, None, 0, 0) != 0 or prctl(22, 2, fprog, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "the sandbox could not install its seccomp filter")
    return install


def reliability_guard(maximum_memory_bytes=None):
    """Limit resources and disable destructive functions in the current process. This breaks the
    process for any other use: call it only in the sandbox child, right before running the code."""
    _set_resource_limits(maximum_memory_bytes)
    faulthandler.disable()
    os.environ["OMP_NUM_THREADS"] = "1"  # before os.putenv, which setting it calls, is disabled
    disabled = {builtins: ("exit", "quit", "help"), os: DISABLED_OS_FUNCTIONS,
                shutil: DISABLED_SHUTIL_FUNCTIONS, subprocess: ("Popen",)}
    for module, names in disabled.items():
        for name in names:
            setattr(module, name, None)
    for name in BLOCKED_MODULES:
        sys.modules[name] = None  # import raises ModuleNotFoundError


class _NoInput(io.TextIOBase):  # whose readable() is False
    """stdin of the sandboxed code: reading raises, so the code can never wait for input."""

    def read(self, *args, **kwargs):
        raise OSError("stdin is not available in the sandbox")

    readline = readlines = read


def _exec_code(code, ran_to_end):
    """Run the code in fresh globals (main guards run), then flush what it printed: failing to (e.g. at the
    output size cap) fails the run. Returns ran_to_end (an object only the caller holds) if it ran to its
    end, else the exit status that tells the parent why not. This module is the child's __main__, whose
    globals the code can rebind: no name looked up after the code ran can turn a failure into a pass."""
    try:
        exec(compile(code, CODE_FILENAME, "exec"), {"__name__": "__main__"})
        sys.__stdout__.flush()
        sys.__stderr__.flush()
    except SystemExit as e:  # even sys.exit(0): the code after it (the checks) did not run
        print(f"SystemExit: {e.code}", file=sys.stderr)
        return 1
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # tb_next: leave out this frame
        return MEMORY_ERROR_EXIT_CODE if isinstance(e, MemoryError) else 1
    return ran_to_end


def _run_child(memory_limit_arg, result_path, filter_arg):
    """Run the code from stdin (after the nonce line) under the guard; if it ran to its end, write the nonce
    to result_path and exit at once. Returns the exit status otherwise."""
    nonce = sys.stdin.buffer.readline().rstrip(b"\n")
    code = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    sys.stdin = _NoInput()
    # fd 0 is still the file the nonce came in: code that read it again could write the nonce itself
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.close(null_fd)
    # the source, for tracebacks
    linecache.cache[CODE_FILENAME] = (len(code), None, code.splitlines(True), CODE_FILENAME)
    # taken before the code runs (the parent made the file)
    result_fd = os.open(result_path, os.O_WRONLY | os.O_NOFOLLOW)
    write, exit_now = os.write, os._exit  # held before the code runs: it may unset or replace them
    if os.getpid() == 1:
        for name in TERMINATING_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), lambda number, frame: exit_now(128 + number))
    install_call_filter = _call_filter_installer() if filter_arg == "filter" else lambda: None
    # the limits before the filter, which then keeps them from being changed
    reliability_guard(None if memory_limit_arg == "none" else int(memory_limit_arg))
    install_call_filter()
    ran_to_end = object()
    status = _exec_code(code, ran_to_end)
    if status is ran_to_end:
        write(result_fd, nonce)
        exit_now(0)  # the result is in: the code's atexit handlers and leftover threads cannot change it
    return status


if __name__ == "__main__":
    sys.exit(_run_child(*sys.argv[1:4]))
