"""
The sandbox: each call spawns a fresh guarded interpreter (~0.1 s), so the checks are chosen to be cheap:
harmless targets for the destructive functions (files under tmp_path, signal 0 to our own pid).
Every test runs twice: under OS isolation (skipped where bwrap cannot run) and with the in-process guards
alone, the fallback where no isolation is available; both must grade the same way.
The attacks that only OS isolation contains are in tests/test_sandbox.py.
"""

import ast
import errno
import glob
import gzip
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from nanochat import execution
from nanochat.common import REPO_DATA_DIR
from nanochat.execution import OUTPUT_LIMIT_BYTES, ExecutionResult, execute_code
from tasks.humaneval import HumanEval

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and Linux rlimits")


@pytest.fixture(autouse=True, params=["isolated", "guards only"])
def sandbox_mode(request, monkeypatch):
    if request.param == "isolated":
        problem = execution.isolation_problem()
        if problem:
            pytest.skip(f"no OS isolation here: {problem}")
    else:
        monkeypatch.setattr(execution, "_isolation", execution._Isolation(None, "turned off by this test"))
    return request.param


def processes_mentioning(text):
    """Live processes whose command line contains text (a zombie's command line is empty)."""
    pids = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(path.split("/")[2]))
        except OSError:
            pass  # ended meanwhile
    return pids


def wait_until_gone(text, seconds=3.0):
    deadline = time.time() + seconds
    while processes_mentioning(text) and time.time() < deadline:
        time.sleep(0.05)
    return processes_mentioning(text)


def test_happy_path_captures_stdout():
    result = execute_code("print('hello world')")
    assert result.success and result.error is None
    assert result.stdout == "hello world\n" and result.stderr == ""
    assert not result.timeout and not result.memory_exceeded


def test_exception_is_reported_and_stdout_kept():
    result = execute_code("print('before')\n1/0")
    assert not result.success
    assert result.error == "ZeroDivisionError: division by zero"
    assert "Traceback" in result.stderr and '"<llm>", line 2' in result.stderr
    assert result.stdout == "before\n"  # kept for debugging (the reference discarded it)


def test_syntax_error_is_reported():
    result = execute_code("def broken(:\n    pass")
    assert not result.success and result.error.startswith("SyntaxError")


def test_infinite_loop_times_out():
    t0 = time.time()
    result = execute_code("while True: pass", timeout=1.0)
    assert time.time() - t0 < 4
    assert result.timeout and not result.success
    assert result.error == "Execution timed out (process killed)"


has_call_filter = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.machine() not in execution.SECCOMP_ARCHES,
    reason="the call filter is a seccomp program for Linux on x86_64 and aarch64")


@has_call_filter
@pytest.mark.parametrize("start", [
    "posix.fork()", "posix.posix_spawn('/bin/true', ['true'], {})",
    "for _ in range(6):\n    posix.fork()",  # a fork bomb, bounded in case the ban ever failed
], ids=["fork", "posix_spawn", "fork bomb"])
def test_the_code_cannot_start_a_process(start):
    result = execute_code(f"import posix\n{start}\n", timeout=2.0)
    assert not result.success and not result.timeout
    assert result.error.startswith("PermissionError: [Errno 1] Operation not permitted")


@has_call_filter
def test_raw_calls_for_processes_and_memory_fail_and_threads_still_start():
    # what ctypes can call directly: fork, vfork and clone for a process fail, and so do memfd_create,
    # shmget (1 GiB, IPC_CREAT) and msgget (IPC_CREAT), which make memory outside RLIMIT_AS; clone3, whose
    # flags the filter cannot read, and x32 calls (on kernels that have them) do not exist; a thread (clone
    # with CLONE_THREAD) starts
    code = ("import ctypes, errno, threading\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "memory = {'x86_64': [(319, b'x', 0), (29, 0, 1 << 30, 0o1600), (68, 0, 0o1600)],\n"
            "          'aarch64': [(279, b'x', 0), (194, 0, 1 << 30, 0o1600), (186, 0, 0o1600)]}[MACHINE]\n"
            "calls = {'x86_64': [(57,), (58,), (56, 17, 0, 0, 0, 0), *memory, (435, 0, 0),\n"
            "                    (57 | 0x40000000,)],\n"
            "         'aarch64': [(220, 17, 0, 0, 0, 0), *memory, (435, 0, 0)]}[MACHINE]\n"
            "for call in calls:\n"
            "    print(libc.syscall(*call), errno.errorcode[ctypes.get_errno()])\n"
            "threading.Thread(target=print, args=('thread',)).start()\n")
    result = execute_code(f"MACHINE = {platform.machine()!r}\n{code}")
    assert result.success, result
    lines = result.stdout.splitlines()
    assert lines[-1] == "thread"
    x86_64, aarch64 = ["EPERM"] * 6 + ["ENOSYS"] * 2, ["EPERM"] * 4 + ["ENOSYS"]
    assert lines[:-1] == [f"-1 {name}" for name in {"x86_64": x86_64, "aarch64": aarch64}[platform.machine()]]


@has_call_filter
def test_the_code_cannot_make_memory_that_its_limit_does_not_count():
    result = execute_code("import os\nos.memfd_create('ram')\n")
    assert not result.success
    assert result.error.startswith("PermissionError: [Errno 1] Operation not permitted")


@has_call_filter
@pytest.mark.skipif(platform.machine() not in execution.SECCOMP_ARCHES, reason="the call numbers are Linux's")
def test_raw_calls_cannot_make_memory_that_its_limit_does_not_count():
    # memfd_secret (files of up to 16 MiB each, mapped a window at a time) and semget (SysV semaphore sets:
    # 32000 sets of 32000 semaphores a namespace, ~64 bytes each) hold memory that RLIMIT_AS does not count.
    # A set made anyway is removed at once: without isolation it would outlive the call
    code = ("import ctypes, errno\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "memfd_secret, semget = {'x86_64': (447, 64), 'aarch64': (447, 190)}[MACHINE]\n"
            "for made in (libc.syscall(memfd_secret, 0), libc.syscall(semget, 0, 1, 0o1600)):\n"
            "    print(made if made >= 0 else errno.errorcode[ctypes.get_errno()])\n"
            "libc.semctl(made, 0, 0)\n")  # IPC_RMID
    result = execute_code(f"MACHINE = {platform.machine()!r}\n{code}")
    assert result.success and result.stdout == "EPERM\nEPERM\n", result


KERNEL_HEADERS = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
                  "aarch64": "/usr/include/asm-generic/unistd.h"}


@pytest.mark.parametrize("machine", list(execution.SECCOMP_ARCHES))
def test_the_call_numbers_are_the_kernels(machine):
    if not os.path.exists(KERNEL_HEADERS[machine]):
        pytest.skip(f"the kernel's headers are not installed: {KERNEL_HEADERS[machine]} (linux-libc-dev)")
    with open(KERNEL_HEADERS[machine]) as f:
        numbers = {name: int(number) for name, number in re.findall(r"#define __NR(?:3264)?_(\w+)\s+(\d+)\b",
                                                                     f.read())}
    for name, number in execution.call_numbers(machine).items():  # fork: None on aarch64
        assert number == numbers.get(name), (machine, name)


@has_call_filter
def test_the_code_can_signal_only_itself():
    code = ("import posix, signal, threading\n"
            "posix.kill(posix.getpid(), 0)\n"  # itself: allowed, and so is a thread of its own
            "signal.pthread_kill(threading.get_ident(), 0)\n"
            "for name, pid in [('parent', posix.getppid()), ('all', -1), ('its group', 0)]:\n"
            "    try:\n        posix.kill(pid, 0)\n"
            "    except PermissionError:\n        print(name, 'denied')\n")
    result = execute_code(code)
    assert result.success, result
    assert result.stdout == "parent denied\nall denied\nits group denied\n"  # -1: all it may signal


@has_call_filter
def test_the_code_cannot_open_a_socket_and_asyncio_still_runs():
    result = execute_code("import socket\nsocket.socket(socket.AF_UNIX)\n")
    assert result.error.startswith("PermissionError: [Errno 1] Operation not permitted"), result
    code = "import asyncio\nasyncio.run(asyncio.sleep(0))\nprint('ran')\n"  # its event loop uses a socketpair
    assert execute_code(code).stdout == "ran\n"


@has_call_filter
def test_the_codes_socketpairs_reach_no_socket_of_the_hosts():
    # a datagram socketpair can send to any unix socket by its address (the host's, without isolation:
    # syslog's, a service's abstract one), and binding one takes an abstract name from the host's services
    name = f"\0nanochat_test_{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(name)
        server.settimeout(0.5)
        code = ("import socket\n"
                "for kind in (socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):\n"
                "    try:\n        print(socket.socketpair(type=kind)[0].sendto(b'pwned', NAME))\n"
                "    except OSError as e:\n        print(e.strerror)\n"
                "try:\n    print(socket.socketpair()[0].bind(NAME + 'x'))\n"
                "except OSError as e:\n    print(e.strerror)\n")
        result = execute_code(f"NAME = {name!r}\n{code}")
        with pytest.raises(socket.timeout):  # a datagram sent by the code would be waiting here
            server.recv(16)
    assert result.stdout == "Operation not permitted\n" * 3, result


@has_call_filter
def test_kernel_interfaces_and_other_processes_are_out_of_reach():
    # every denied call that does not start a process, made raw with arguments (-1) that the kernel would
    # refuse anyway, so nothing happens if the filter ever let one through: msgget and shmget get flags 0,
    # since -1 holds IPC_CREAT
    names = ["memfd_create", "shmget", "msgget", "setrlimit", "ptrace", "process_vm_readv",
             "process_vm_writev", "pidfd_getfd", "pidfd_send_signal", "tkill", "rt_sigqueueinfo",
             "rt_tgsigqueueinfo", "socket", "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf",
             "userfaultfd", "perf_event_open", "keyctl", "add_key", "request_key", "unshare", "setns",
             "mount", "umount2", "pivot_root", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount",
             "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot"]
    numbers = [execution.call_numbers(platform.machine())[name] for name in names]
    arguments = [(-1, 0, 0) if name in ("msgget", "shmget") else (-1,) * 5 for name in names]
    code = (f"import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"for number, arguments in zip({numbers}, {arguments}):\n"
            f"    print(libc.syscall(number, *arguments), errno.errorcode[ctypes.get_errno()])\n")
    result = execute_code(code)
    assert result.success, result
    assert dict(zip(names, result.stdout.splitlines())) == {name: "-1 EPERM" for name in names}


@has_call_filter
def test_the_code_cannot_use_up_what_its_user_may_hold_on_the_host():
    # posix timers and queued signals, POSIX message queues, inotify and fanotify instances: counted per user,
    # and what a sandbox holds counts for its parent user (root, say) too: at the limit, that user's processes
    # on the host could make none of them until the call ends. Well below the host's limits, and undone
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "timer = ctypes.c_long()\n"
            "timers = sum(libc.timer_create(1, None, ctypes.byref(timer)) == 0 for _ in range(2000))\n"
            "queue = libc.mq_open(b'/nanochat_test', 0o102, 0o600, None)\n"  # O_CREAT | O_RDWR
            "if queue >= 0:\n    libc.mq_unlink(b'/nanochat_test')\n"
            "print(timers, queue, libc.inotify_init1(0), libc.fanotify_init(0x200, 0))\n")  # FAN_REPORT_FID
    result = execute_code(code)
    assert result.success, result
    timers, queue, inotify, fanotify = map(int, result.stdout.split())
    assert timers <= execution.PENDING_SIGNALS_LIMIT and queue == inotify == fanotify == -1, result


@has_call_filter
def test_the_code_cannot_change_resource_limits():
    # as root without isolation, prlimit on the evaluator could lower its limits (open files: every later
    # call fails), and with CAP_SYS_RESOURCE the code could raise its own memory limit. Each call sets a
    # limit to the value it has, so nothing changes even if one got through; reading limits still works
    code = ("import ctypes, os, sys\nsys.modules.pop('resource')\nimport resource\n"
            "print(resource.getrlimit(resource.RLIMIT_CORE))\n"
            "for pid in (os.getppid(), 0):\n"
            "    try:\n"
            "        unchanged = resource.prlimit(pid, resource.RLIMIT_CORE)\n"
            "        resource.prlimit(pid, resource.RLIMIT_CORE, unchanged)\n"
            "        print('changed')\n"
            "    except PermissionError:\n        print('denied')\n"
            "libc = ctypes.CDLL(None, use_errno=True)\nlimits = (ctypes.c_ulong * 2)(0, 0)\n"
            f"print(libc.syscall({execution.call_numbers(platform.machine())['setrlimit']}, "
            "resource.RLIMIT_CORE, limits), ctypes.get_errno())\n")
    result = execute_code(code)
    assert result.success, result
    assert result.stdout == f"(0, 0)\ndenied\ndenied\n-1 {errno.EPERM}\n"


@linux_only
def test_under_isolation_no_other_process_is_within_reach(sandbox_mode):
    # bwrap's own init process in the code's PID namespace had no call filter and no memory limit: code
    # that wrote into it through /proc/1/mem could start processes and take memory without bound
    if sandbox_mode != "isolated":
        pytest.skip("without isolation the code sees the host's processes: only the user it runs as "
                    "(nobody, where it can) keeps it out of them")
    code = ("import posix\nopened = []\n"
            "for pid in [p for p in posix.listdir('/proc') if p.isdigit() and int(p) != posix.getpid()]:\n"
            "    try:\n        posix.close(posix.open(f'/proc/{pid}/mem', posix.O_RDWR))\n"
            "        opened.append(pid)\n"
            "    except OSError:\n        pass\n"
            "print(opened)\n")
    result = execute_code(code)
    assert result.success and result.stdout == "[]\n", result


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGUSR1", "SIGALRM"])
def test_a_signal_the_code_sends_itself_ends_it(name):
    # both modes alike: under isolation the code is its PID namespace's init, which the kernel spares
    # the signals it sends itself
    result = execute_code(f"import posix, signal\nposix.kill(posix.getpid(), signal.{name})\n"
                          "import time\ntime.sleep(0.5)\nprint('alive')\n")
    assert not result.success and result.error == f"Process killed by {name}", result
    assert "alive" not in result.stdout


@linux_only
def test_the_code_can_open_only_a_bounded_number_of_files():
    # every open pipe or socket can buffer memory outside RLIMIT_AS: their number is bounded
    code = ("import os\nends = []\n"
            "try:\n    while True:\n        ends += os.pipe()\n"
            "except OSError as e:\n    print(len(ends), e.strerror)\n")
    result = execute_code(code)
    assert result.success, result
    count, why = result.stdout.strip().split(" ", 1)
    assert int(count) <= execution.OPEN_FILES_LIMIT and why == "Too many open files"


@has_call_filter
@pytest.mark.skipif(platform.machine() != "x86_64", reason="i386 calls through int 0x80 exist on x86_64 only")
def test_a_fork_through_the_i386_abi_fails():
    # machine code that makes the i386 fork call (int 0x80), which a filter of x86_64 numbers alone would miss
    code = ("import ctypes, mmap\n"
            "page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            "page.write(bytes.fromhex('b802000000cd80c3'))  # mov eax, 2 (fork); int 0x80; ret\n"
            "address = ctypes.addressof(ctypes.c_char.from_buffer(page))\n"
            "print(ctypes.CFUNCTYPE(ctypes.c_int)(address)())\n")
    result = execute_code(code)
    assert result.success and result.stdout == f"{-errno.ENOSYS}\n", result  # one process, no such call


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the machine code is x86_64's")
def test_the_code_cannot_take_the_hosts_pids_with_threads():
    # threads start, and each takes a PID of the host's (32768 by default): started by raw clone calls
    # without a stack of their own, they cost no memory that RLIMIT_AS counts. Machine code: rdi times,
    # clone(CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD, no stack); the threads pause
    bomb = ("4989f94d85c97422bf000f010031f631d24531d24531c0b8380000000f054885c0740b780549ffc9ebd9"
            "4c89c8c3b8220000000f05ebf7")
    code = ("import ctypes, mmap, time\n"
            "page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            f"page.write(bytes.fromhex({bomb!r}))\n"
            "address = ctypes.addressof(ctypes.c_char.from_buffer(page))\n"
            "print(ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long)(address)(2000), flush=True)\n"
            "time.sleep(2)\n")
    result = execute_code(code, timeout=10.0)
    assert not result.success and not result.timeout, result
    assert result.error == f"Process killed: more than {execution.THREADS_LIMIT} threads", result


@linux_only
def test_timeout_kills_processes_started_by_the_code(monkeypatch):
    # the layer below the call filter (which covers Linux on x86_64 and aarch64 only): with the filter off,
    # posix.fork (the guard disables os.fork only) starts a child whose command line names the temp dir
    monkeypatch.setattr(execution, "CALL_FILTER", False)
    code = ("import posix, time\n"
            "print(posix.getcwd(), flush=True)\n"
            "if posix.fork() == 0:\n    time.sleep(30)\n"
            "while True: pass\n")
    result = execute_code(code, timeout=1.0)
    assert result.timeout
    workdir = result.stdout.strip()  # output written before the kill is kept
    assert workdir.startswith(os.path.realpath(tempfile.gettempdir()))
    survivors = wait_until_gone(workdir)
    for pid in survivors:
        os.kill(pid, 9)  # clean up before failing
    assert survivors == [], "processes started by the code survived the timeout"


@linux_only
def test_memory_bomb_is_stopped():
    result = execute_code("x = bytearray(1024 ** 3)")
    assert not result.success and result.memory_exceeded
    assert result.error.startswith("Memory limit exceeded")


@linux_only
def test_memory_limit_none_disables_the_limit():
    code = "x = bytearray(300 * 1024 ** 2); print(len(x))"  # over the 256 MB default
    assert execute_code(code, maximum_memory_bytes=None).stdout == f"{300 * 1024 ** 2}\n"
    assert execute_code(code).memory_exceeded


@pytest.mark.parametrize("call", [
    "os.system('echo pwned')",
    "subprocess.Popen(['ls'])",
    "subprocess.run(['ls'])",
    "os.kill(os.getpid(), 0)",  # signal 0 only probes: harmless even if the guard failed
    "os.killpg(os.getpgid(0), 0)",
    "os.fork()",
    "os.putenv('X', '1')",
    "os.chdir('/')",
    "os.getcwd()",
    "exit()",
    "quit()",
    "help()",
    "import resource",
    "import psutil",
])
def test_process_and_environment_functions_are_disabled(call):
    result = execute_code(f"import os, subprocess\n{call}\nprint('ran')")
    assert not result.success and "ran" not in result.stdout


@pytest.mark.parametrize("call", [
    "shutil.rmtree(DIR)",
    "shutil.move(FILE, DIR + '/moved')",
    "os.remove(FILE)",
    "os.unlink(FILE)",
    "os.rename(FILE, FILE + '.new')",
    "os.replace(FILE, FILE + '.new')",
    "os.truncate(FILE, 0)",
    "os.chmod(FILE, 0)",
    "os.rmdir(EMPTY)",
    "os.removedirs(EMPTY)",
])
def test_destructive_file_functions_are_disabled(call, tmp_path):
    target = tmp_path / "victim"
    target.mkdir()
    (target / "file.txt").write_text("keep me")
    (target / "empty").mkdir()
    code = (f"import os, shutil\nDIR = {str(target)!r}\nFILE = DIR + '/file.txt'\nEMPTY = DIR + '/empty'\n"
            f"{call}\nprint('ran')")
    result = execute_code(code)
    assert not result.success and result.error == "TypeError: 'NoneType' object is not callable"
    assert (target / "file.txt").read_text() == "keep me"
    assert (target / "empty").is_dir() and sorted(p.name for p in target.iterdir()) == ["empty", "file.txt"]


def test_stdin_is_unavailable():
    result = execute_code("input()")
    assert not result.success and result.error.startswith("OSError")


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("NANOCHAT_FAKE_SECRET", "hunter2")
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    result = execute_code("import os\nprint(os.environ.get('NANOCHAT_FAKE_SECRET'), os.environ.get('HF_TOKEN'))\n"
                          "print(sorted(os.environ))")
    assert result.success
    assert result.stdout.splitlines()[0] == "None None"
    assert "hunter2" not in result.stdout and "HF_TOKEN" not in result.stdout
    # an empty start in both modes: what is there, Python (LC_CTYPE), bwrap (PWD) and the guard set
    assert set(ast.literal_eval(result.stdout.splitlines()[1])) <= {"LC_CTYPE", "PWD", "OMP_NUM_THREADS"}


@linux_only
def test_writes_land_in_a_temp_dir_that_is_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = ("open('landmine.txt', 'w').write('x\\n')\n"
            "print(open('landmine.txt').read(), end='')\n"
            "import os\nprint(os.readlink('/proc/self/cwd'))")
    result = execute_code(code)
    assert result.success, result
    written, workdir = result.stdout.splitlines()
    assert written == "x"
    assert os.path.dirname(workdir) == os.path.realpath(tempfile.gettempdir())
    assert not os.path.exists(workdir)
    assert list(tmp_path.iterdir()) == []  # nothing written to the caller's cwd


def test_tricky_string_content():
    code = 'print("quote\' double\\" backslash\\\\ braces{} {0} %s")'
    result = execute_code(code)
    assert result.success and result.stdout == "quote' double\" backslash\\ braces{} {0} %s\n"


def test_fresh_globals_and_main_guard():
    result = execute_code("print('GUARD' in dir(), sorted(k for k in dir() if not k.startswith('__')))\n"
                          "if __name__ == '__main__':\n    print('main')")
    assert result.success and result.stdout == "False []\nmain\n"


def test_sys_exit_is_a_failure_even_with_status_0():
    for status in (0, 2):
        result = execute_code(f"import sys; sys.exit({status})")
        assert not result.success and result.error == f"SystemExit: {status}" and not result.timeout


# Success means the code ran to its end. Each of these leaves before the failing assert at the end
# (HumanEval's check()), most with exit status 0, which used to count as a pass.
EARLY_EXITS = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "raise SystemExit": "raise SystemExit",
    "os._exit(0)": "import os\nos._exit(0)",
    "atexit os._exit(0)": "import atexit, os\natexit.register(lambda: os._exit(0))",
    "signal": "import posix, signal\nposix.kill(posix.getpid(), signal.SIGTERM)",
    "thread os._exit(0)": "import os, threading\nthreading.Thread(target=os._exit, args=(0,)).start()\n"
                          "import time\ntime.sleep(1)",
    "forged result file": f"import os\nopen({execution.RESULT_FILENAME!r}, 'w').write('0' * 32)\nos._exit(0)",
    "nonce read back from stdin": "import os\nnonce = os.pread(0, 64, 0).split(b'\\n')[0]\n"
                                  f"os.write(os.open({execution.RESULT_FILENAME!r}, os.O_WRONLY), nonce)\n"
                                  "os._exit(0)",
}


@pytest.mark.parametrize("exit_code", EARLY_EXITS.values(), ids=EARLY_EXITS.keys())
def test_leaving_before_the_end_is_a_failure(exit_code):
    result = execute_code(f"{exit_code}\nassert False, 'the checks failed'")
    assert not result.success and result.error and not result.timeout, result


def test_rebinding_the_harness_globals_cannot_turn_a_failure_into_a_pass():
    # the harness is the child's __main__ module, which the code can import and change
    code = ("import __main__\n__main__.MemoryError = BaseException\n__main__.MEMORY_ERROR_EXIT_CODE = 0\n"
            "assert False, 'the checks failed'\n")
    result = execute_code(code)
    assert not result.success and result.error == "AssertionError: the checks failed", result


def test_success_needs_the_last_statement_to_finish():
    assert execute_code("import atexit, os\natexit.register(lambda: os._exit(1))\nprint('done')").success
    assert not execute_code("assert True\nraise KeyboardInterrupt").success


HUMANEVAL_CHEATS = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "atexit os._exit(0)": "import atexit, os\natexit.register(lambda: os._exit(0))",
}


@pytest.mark.parametrize("cheat", HUMANEVAL_CHEATS.values(), ids=HUMANEVAL_CHEATS.keys())
def test_humaneval_counts_a_pass_only_when_the_checks_ran_to_their_end(cheat):
    task = HumanEval.__new__(HumanEval)  # evaluate needs no data beyond the conversation
    with gzip.open(os.path.join(REPO_DATA_DIR, "tasks", "humaneval", "test.jsonl.gz"), "rt") as f:
        row = json.loads(f.readline())
    conversation = {"messages": [{"role": "user", "content": row["prompt"]}],
                    "entry_point": row["entry_point"], "test": row["test"]}
    wrong = row["prompt"] + "    return None\n"
    right = row["prompt"] + row["canonical_solution"]
    assert task.evaluate(conversation, right) is True
    assert task.evaluate(conversation, wrong) is False
    assert task.evaluate(conversation, f"{wrong}\n{cheat}\n") is False


def test_stdlib_imports_work():
    result = execute_code("import math, collections, re, json, heapq, socket\nprint(math.gcd(12, 18))")
    assert result.success and result.stdout == "6\n"


@linux_only
def test_output_is_capped():
    result = execute_code(f"import sys\nsys.stdout.write('x' * {OUTPUT_LIMIT_BYTES + 1024})")
    assert not result.success
    assert len(result.stdout) <= OUTPUT_LIMIT_BYTES


def test_invalid_timeout_raises():
    with pytest.raises(ValueError, match="timeout"):
        execute_code("pass", timeout=0)


def test_repr_lists_only_set_fields():
    assert repr(ExecutionResult(True, "hi\n", "")) == "ExecutionResult(success=True, stdout='hi\\n')"
    assert repr(ExecutionResult(False, "", "")) == "ExecutionResult(success=False)"
    full = ExecutionResult(False, "o", "e", error="boom", timeout=True, memory_exceeded=True)
    assert repr(full) == ("ExecutionResult(success=False, timeout=True, memory_exceeded=True, error='boom', "
                          "stdout='o', stderr='e')")


def test_importing_the_module_probes_nothing():
    code = "import nanochat.execution as e\nprint(e._isolation)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.stdout == "None\n" and done.stderr == ""


def test_without_isolation_it_warns_once_and_keeps_the_guards(monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")  # no bwrap to find
    monkeypatch.setattr(execution, "_isolation", None)  # probe again
    results = [execute_code("import os\nprint(os.kill)") for _ in range(2)]
    assert all(result.success and result.stdout == "None\n" for result in results)
    problem = execution.isolation_problem()
    warnings = capsys.readouterr().err
    assert problem and problem in warnings and "WITHOUT OS isolation" in warnings
    assert warnings.count("WARNING") == 1


def interpreter_nobody_can_run():
    """An interpreter of this Python version that user nobody can run (Debian's /usr/bin/python3.X, say), or
    None: a virtual environment's base interpreter often lives in root's home, which nobody cannot enter."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [execution._base_interpreter(), f"/usr/bin/{version}", f"/usr/local/bin/{version}"]
    probe = [sys.executable, "-c", "import os, sys; os.setgid(65534); os.setuid(65534); "
             "os.execv(sys.argv[1], [sys.argv[1], '-c', ''])"]
    for path in candidates:
        if os.path.exists(path) and subprocess.run([*probe, path], capture_output=True).returncode == 0:
            return path
    return None


needs_root = pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                                reason="the code changes user only under a root evaluator (Linux)")


@needs_root
def test_as_root_without_isolation_the_code_runs_as_nobody(monkeypatch, capsys):
    interpreter = interpreter_nobody_can_run()
    if interpreter is None:
        pytest.skip("no interpreter of this Python version that user nobody can run")
    monkeypatch.setattr(execution, "_base_interpreter", lambda: interpreter)
    monkeypatch.setenv("PATH", "/nonexistent")  # no bwrap to find
    monkeypatch.setattr(execution, "_isolation", None)  # probe again
    with tempfile.TemporaryDirectory() as folder:  # open to all: only the file's own mode protects it
        os.chmod(folder, 0o755)
        secret = os.path.join(folder, "secret")
        with open(secret, "w") as f:
            f.write("root only")
        os.chmod(secret, 0o600)
        result = execute_code(f"import posix\nprint(posix.getuid(), posix.getgid(), posix.getgroups())\n"
                              f"print(open({secret!r}).read())")
        assert result.stdout == f"{execution.SANDBOX_USER_ID} {execution.SANDBOX_USER_ID} []\n"
        assert result.error.startswith("PermissionError: [Errno 13] Permission denied")
        result = execute_code(f"open({os.path.join(folder, 'written')!r}, 'w')")
        assert not result.success and os.listdir(folder) == ["secret"]
    assert execute_code("open('mine', 'w').write('x')\nprint(open('mine').read())").stdout == "x\n"
    assert f"runs as user {execution.SANDBOX_USER_ID}" in capsys.readouterr().err


@needs_root
def test_as_root_with_an_interpreter_nobody_cannot_run_the_code_runs_as_root(monkeypatch, tmp_path, capsys):
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "python").symlink_to(execution._base_interpreter())
    monkeypatch.setattr(execution, "_base_interpreter", lambda: str(hidden / "python"))
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(execution, "_isolation", None)
    assert execute_code("import posix\nprint(posix.getuid())").stdout == "0\n"
    warning = capsys.readouterr().err
    assert f"runs as root (the interpreter {hidden / 'python'} does not run as user 65534" in warning


@linux_only
def test_a_bwrap_that_cannot_isolate_is_not_used(monkeypatch, tmp_path, capsys):
    fake = tmp_path / "bwrap"  # found, but fails like a bwrap without user namespaces
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(execution, "_isolation", None)
    assert execute_code("print('still runs')").stdout == "still runs\n"
    assert "No permissions to create new namespace" in execution.isolation_problem()
    assert "WITHOUT OS isolation" in capsys.readouterr().err
