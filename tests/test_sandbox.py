"""
The attack list against the sandbox: each attack must be contained by the OS isolation. The attacks get
around the in-process guard on purpose (posix.* instead of the disabled os.* functions, open(), sockets),
and the call filter is off, so they show what the isolation itself stops; without isolation they succeed,
which is why every test here skips, saying why, where bwrap cannot run. The call filter (no processes, no
memory outside RLIMIT_AS) has its own tests in test_execution.py.
"""

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from nanochat import execution
from nanochat.execution import execute_code
from test_execution import processes_mentioning

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET_NAME = "NANOCHAT_TEST_SECRET"
# an evaluating process of its own, so that an attack on "the parent" hits it rather than pytest
EVALUATOR = ("import json, sys\n"
             "from nanochat.execution import execute_code\n"
             "print(json.dumps(vars(execute_code(sys.stdin.read()))))\n")


@pytest.fixture(autouse=True)
def require_isolation(monkeypatch):
    problem = execution.isolation_problem()
    if problem:
        pytest.skip(f"no OS isolation here, so nothing to contain the attacks: {problem}")
    # the call filter (seccomp) would stop the process attacks first: here the isolation alone must hold
    monkeypatch.setattr(execution, "CALL_FILTER", False)


def run_in_evaluator(code, secret=""):
    """execute_code(code) in a separate evaluating process (with secret in its environment).
    Returns that process's exit status and output."""
    env = {**os.environ, SECRET_NAME: secret}
    done = subprocess.run([sys.executable, "-c", EVALUATOR], input=code, env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout


def test_cannot_read_etc_passwd():
    assert open("/etc/passwd").read().startswith("root:")  # there is something to steal
    result = execute_code("print(open('/etc/passwd').read())")
    assert "root:" not in result.stdout and not result.success


def test_cannot_read_the_repository():
    path = os.path.join(REPO_ROOT, "pyproject.toml")
    result = execute_code(f"print(open({path!r}).read())")
    assert "[project]" not in result.stdout and not result.success
    result = execute_code(f"import posix\nprint(posix.listdir({REPO_ROOT!r}))")
    assert "pyproject.toml" not in result.stdout and not result.success


def test_cannot_read_home_directories():
    result = execute_code("import posix\nprint(posix.listdir('/root'), posix.listdir('/home'))")
    assert not result.success


def test_cannot_write_outside_its_temp_dir(tmp_path):
    target = tmp_path / "written.txt"
    result = execute_code(f"open({str(target)!r}, 'w').write('pwned')")
    assert not target.exists() and not result.success


def test_cannot_delete_outside_its_temp_dir(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    result = execute_code(f"import posix\nposix.unlink({str(victim)!r})")
    assert victim.read_text() == "keep me" and not result.success


@pytest.mark.parametrize("launch", [
    "import posix\nassert posix.system(SHELL) == 0",
    "import os\npid = os.posix_spawn('/bin/sh', ['sh', '-c', SHELL], {})\nassert os.waitpid(pid, 0)[1] == 0",
], ids=["posix.system", "os.posix_spawn"])
def test_cannot_run_a_shell_command(launch, tmp_path):
    target = tmp_path / "shell_was_here"
    result = execute_code(f"SHELL = 'echo pwned > {target}'\n{launch}")
    assert not target.exists() and not result.success


def test_cannot_connect_to_a_local_server():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        result = execute_code(f"import socket\nconnection = socket.create_connection(('127.0.0.1', {port}))\n"
                              "connection.sendall(b'pwned')")
        server.settimeout(0.5)
        with pytest.raises(socket.timeout):  # a connection made by the code would be waiting here
            server.accept()
    assert not result.success


def test_cannot_fill_the_disk_or_the_memory_with_files():
    # files written in a loop until the timeout: the temp dir is a tmpfs of bounded size (bwrap >= 0.8), and
    # /dev, a tmpfs as well, is read-only. 16 files of 8 MiB: a missing bound shows without writing gigabytes
    code = ("import posix\nwritten, why = 0, 'no error'\n"
            "try:\n"
            "    for n in range(16):\n"
            "        with open(f'file{n}', 'wb') as f:\n"
            "            f.write(bytes(8 << 20))\n"
            "        written += 8 << 20\n"
            "except OSError as e:\n"
            "    why = e.strerror\n"
            "print(written, why)\n"
            "for path in ('/dev/shm/file', '/dev/file'):\n"
            "    try:\n        open(path, 'wb').close()\n        print(path, 'written')\n"
            "    except OSError as e:\n        print(path, e.strerror)\n"
            "open('/dev/null', 'w').write('the device nodes stay writable')\n")
    result = execute_code(code)
    assert result.success, result
    lines = result.stdout.splitlines()
    assert lines[1:] == ["/dev/shm/file Read-only file system", "/dev/file Read-only file system"]
    if "--size" not in execution._get_isolation().bwrap_arguments:
        pytest.skip("this bwrap (< 0.8) has no --size: the temp dir is the host's, unbounded")
    written, why = lines[0].split(" ", 1)
    assert int(written) <= execution.WORKDIR_LIMIT_BYTES and why == "No space left on device"


def test_cannot_fill_the_memory_with_empty_files():
    # the tmpfs's size counts what files hold, not the files: each empty one (or hard link) takes ~1 KiB of
    # the host's memory. 20000 of them: a missing bound shows without taking gigabytes
    if "--size" not in execution._get_isolation().bwrap_arguments:
        pytest.skip("this bwrap (< 0.8) has no --size: the temp dir is the host's")
    code = ("import posix, time\n"
            "for n in range(20000):\n"
            "    posix.close(posix.open(f'file{n}', posix.O_CREAT | posix.O_WRONLY))\n"
            "time.sleep(1)\n")
    result = execute_code(code, timeout=10.0)
    assert not result.success and not result.timeout, result
    assert result.error == f"Process killed: more than {execution.WORKDIR_FILES_LIMIT} files", result


def test_cannot_read_the_parents_secrets():
    secret = "nanochat-secret-" + secrets.token_hex(8)
    # the attacker knows the variable's name (think HF_TOKEN); only matching entries are printed
    code = ("import glob, posix\n"
            "found = []\n"
            "for path in [f'/proc/{posix.getppid()}/environ'] + glob.glob('/proc/*/environ'):\n"
            "    try:\n        entries = open(path, 'rb').read().split(bytes(1))\n"
            "    except OSError:\n        continue\n"
            f"    found += [e.decode() for e in entries if e.startswith(b'{SECRET_NAME}=')]\n"
            "print(found)\n")
    status, output = run_in_evaluator(code, secret)
    assert status == 0 and '"success": true' in output  # the reads ran, and found nothing
    assert secret not in output


def test_cannot_kill_the_evaluating_process():
    status, output = run_in_evaluator(f"import posix\nposix.kill(posix.getppid(), {int(signal.SIGKILL)})\n")
    assert status == 0 and '"success"' in output  # the evaluator lived to report


@pytest.mark.parametrize("ending", ["", "while True: pass\n"], ids=["runs to its end", "times out"])
def test_leaves_no_process_running_after_it_returns(ending):
    code = ("import posix, time\n"
            "print(posix.getcwd(), flush=True)\n"
            "if posix.fork() == 0:\n"
            "    posix.setsid()\n"  # out of the process group the parent would kill
            "    time.sleep(60)\n"
            "    posix._exit(0)\n" + ending)
    result = execute_code(code, timeout=1.0)
    assert result.success != bool(ending) and result.timeout == bool(ending), result
    workdir = result.stdout.strip()  # the daemon's command line names the temp dir
    assert workdir.startswith(os.path.realpath(tempfile.gettempdir()))
    survivors = processes_mentioning(workdir)  # at once: none may outlive the call, even for a moment
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)  # clean up before failing
    assert survivors == [], "a process started by the code outlived execute_code"
