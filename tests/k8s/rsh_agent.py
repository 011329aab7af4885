#!/usr/bin/env python3
"""OpenMPI's remote shell for pods that are network namespaces: ``ssh HOST COMMAND`` without ssh.

OpenMPI's ``mpirun`` starts its daemon (``orted``) on every host of the hostfile by running
``<plm_rsh_agent> HOST COMMAND...``. Point the agent here and the command runs in HOST's network
namespace on this machine instead::

    OMPI_MCA_plm_rsh_agent="/usr/bin/python3 /path/to/rsh_agent.py" mpirun --hostfile H ...

The host -> namespace mapping is a JSON object ``{"host": "netns-name", ...}`` given either
inline in ``DSNB_RSH_NETNS`` or in the file named by ``DSNB_RSH_NETNS_FILE`` (the inline one
wins). HOST is looked up by its full name first, then by its first label, so the mapping may
name pods (``job-worker-1``) while the hostfile names their DNS names (``job-worker-1.job.ml.svc``).

What the command gets, as from ``ssh``:

* ``COMMAND...`` joined with spaces and run by ``/bin/sh -c`` (OpenMPI quotes its arguments
  for a remote shell);
* a login-like environment (PATH, HOME, USER, LOGNAME, SHELL, LANG; PATH from
  ``DSNB_RSH_LOGIN_PATH`` when set, as an image's would be), not the caller's: what a
  rank needs must be exported with ``mpirun -x``, as on a real cluster (the two mapping
  variables are kept too, so that a daemon can start others when OpenMPI tree-spawns);
* the hostname HOST's first label (a private UTS namespace, as a pod has), ``/etc/hosts`` from
  ``/etc/netns/<ns>/hosts`` (``ip netns exec`` mounts it);
* stdin, stdout and stderr passed through, and the command's exit status as the agent's
  (128 + N when killed by signal N, as a shell reports it);
* the image's contents, as far as they matter here: ``DSNB_RSH_IMAGE_LACKS`` (JSON, host -> paths)
  names the directories HOST's image has not (the job's code, on a pod that runs another image),
  hidden under an empty tmpfs in a private mount namespace;
* the pod's volumes, as sshd in the pod's container sees them: ``DSNB_RSH_MOUNTS`` (JSON, host ->
  ``[host folder, kind, mount path]``) bind-mounts each folder at its path in that mount namespace,
  read-only for kind ``files`` (ConfigMaps and Secrets, as the kubelet mounts them).

The command runs under a small init (this program with ``--init``), PID 1 of a private PID
namespace (``unshare --pid --fork``, with that namespace's own ``/proc`` in a private mount
namespace, as a pod has), which ties its lifetime to the agent's. The init stays
until every process of the namespace has exited, daemons included (``orted --daemonize``, which
``mpirun`` asks for when tree spawn is off), so the agent does too. When the agent goes away,
even by SIGKILL, ``unshare`` is killed, the init gets SIGTERM and passes it to every process of
the namespace (``orted`` then stops its ranks and cleans up), SIGKILL follows after
``KILL_GRACE`` seconds, and when the init exits the kernel kills whatever is left. A SIGTERM,
SIGINT or SIGHUP sent to the agent does the same. On its own, ``orted`` also exits when its
connection to ``mpirun`` drops.

HOST must resolve where the agent runs (in the launcher's namespace, through its ``/etc/hosts``),
as for ssh; a name only the mapping knows is refused.

Leading ssh-style options (``-o X``, ``-x``, ...; e.g. from ``OMPI_MCA_plm_rsh_args``) are ignored.
Exit status 255 (as ssh) when the host does not resolve, has no namespace, or the arguments
are wrong.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import socket
import subprocess
import sys

LOGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# ssh options that take a value (from ssh(1)); any other leading "-..." is a flag.
OPTIONS_WITH_VALUE = {"-B", "-b", "-c", "-D", "-E", "-e", "-F", "-I", "-i", "-J", "-L", "-l", "-m",
                      "-O", "-o", "-p", "-Q", "-R", "-S", "-W", "-w"}
PR_SET_PDEATHSIG = 1
KILL_GRACE = 10  # seconds between SIGTERM and SIGKILL for what is left in a namespace


def fail(message: str) -> int:
    print(f"rsh_agent: {message}", file=sys.stderr, flush=True)
    return 255


def load_mapping() -> dict[str, str]:
    """The host -> network namespace mapping from DSNB_RSH_NETNS or DSNB_RSH_NETNS_FILE."""
    text = os.environ.get("DSNB_RSH_NETNS")
    if not text:
        path = os.environ.get("DSNB_RSH_NETNS_FILE")
        if not path:
            raise ValueError("set DSNB_RSH_NETNS (a JSON object host -> netns) or DSNB_RSH_NETNS_FILE")
        with open(path) as f:
            text = f.read()
    mapping = json.loads(text)
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise ValueError("the host -> netns mapping must be a JSON object of strings")
    return mapping


def split_argv(argv: list[str]) -> tuple[str, list[str]]:
    """(HOST, COMMAND words) from ``[ssh options...] HOST COMMAND...``."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in OPTIONS_WITH_VALUE else 1
    if i >= len(argv) - 1:
        raise ValueError("usage: rsh_agent.py [ssh options] HOST COMMAND...")
    return argv[i], argv[i + 1:]


def login_environment() -> dict[str, str]:
    """What a non-interactive ssh session starts with."""
    user = os.environ.get("USER") or ("root" if os.geteuid() == 0 else str(os.geteuid()))
    # The "image's" PATH: where the machine the test plays keeps python3 with torch (a venv).
    env = {"PATH": os.environ.get("DSNB_RSH_LOGIN_PATH", LOGIN_PATH), "HOME": os.environ.get("HOME", "/root"), "USER": user, "LOGNAME": user,
           "SHELL": "/bin/sh"}
    # LANG as ssh's AcceptEnv passes it; the mapping so that a daemon can start others (tree spawn).
    for name in ("LANG", "DSNB_RSH_NETNS", "DSNB_RSH_NETNS_FILE", "DSNB_RSH_LOGIN_PATH", "DSNB_RSH_IMAGE_LACKS", "DSNB_RSH_MOUNTS"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def die_with_parent(signum: int) -> None:
    """In a child, before exec: be sent ``signum`` when the parent dies (kept across exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def exit_status(code: int) -> int:
    """A shell's exit status for a ``Popen.returncode`` (128 + N when killed by signal N)."""
    return 128 - code if code < 0 else code


def run_init(label: str, command: str, hidden: list[str] | None = None, mounts: list[list[str]] | None = None) -> int:
    """PID 1 of the command's PID namespace: set the hostname, run the command, stay until all is gone.

    A daemon the command leaves behind (``orted --daemonize``, which ``mpirun`` asks for when
    tree spawn is off) is reparented to this init, which waits for it: the agent lives as
    long as anything it started, so killing the agent still stops everything. SIGTERM, SIGINT
    and SIGHUP go to every process of the namespace, then SIGKILL after ``KILL_GRACE`` seconds.
    Returns the command's own exit status.
    """
    socket.sethostname(label)
    for path in hidden or []:  # what this pod's image has not (a private mount namespace: the host is unchanged)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", path], check=True)
    for source, kind, target in mounts or []:  # the pod's volumes
        os.makedirs(target, exist_ok=True)
        subprocess.run(["mount", "--bind", source, target], check=True)
        if kind == "files":
            subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)

    def signal_all(signum: int) -> None:
        try:
            os.kill(-1, signum)  # in a PID namespace: every process of it but this one
        except ProcessLookupError:
            pass

    def forward(signum: int, _frame: object) -> None:
        signal_all(signum)
        signal.alarm(KILL_GRACE)

    # Before the command starts: PID 1 ignores a signal it has no handler for.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    signal.signal(signal.SIGALRM, lambda _signum, _frame: signal_all(signal.SIGKILL))
    child = subprocess.Popen(["/bin/sh", "-c", command])
    status = 255
    while True:  # as init, reap orphans too, until no process is left
        try:
            pid, code = os.wait()
        except ChildProcessError:
            return status
        if pid == child.pid:
            status = exit_status(-os.WTERMSIG(code) if os.WIFSIGNALED(code) else os.WEXITSTATUS(code))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--init"] and len(argv) == 5:
        return run_init(argv[1], argv[2], json.loads(argv[3]), json.loads(argv[4]))
    try:
        host, words = split_argv(argv)
        mapping = load_mapping()
    except (OSError, ValueError) as error:
        return fail(str(error))
    try:  # as ssh would: the launcher's own DNS (its /etc/hosts here) must know HOST
        socket.getaddrinfo(host, None)
    except OSError as error:
        return fail(f"Could not resolve hostname {host}: {error.strerror or error}")
    label = host.split(".", 1)[0]
    netns = mapping.get(host) or mapping.get(label)
    if not netns:
        return fail(f"{host}: no network namespace for this host (known: {', '.join(sorted(mapping))})")

    # unshare --fork makes the --init stage PID 1 of a new PID namespace, and --kill-child sends
    # it SIGTERM when unshare dies; unshare itself gets SIGKILL when this process dies.
    hidden = json.loads(os.environ.get("DSNB_RSH_IMAGE_LACKS") or "{}").get(label, [])
    mounts = json.loads(os.environ.get("DSNB_RSH_MOUNTS") or "{}").get(label, [])
    # --mount-proc: the command's processes see their own PID namespace in /proc, as a pod's do (else a
    # process reading /proc/self by its pid, as psutil does, finds another one, or none).
    child_argv = ["ip", "netns", "exec", netns, "unshare", "--uts", "--pid", "--fork", "--kill-child=SIGTERM",
                  "--mount", "--propagation", "private", "--mount-proc",
                  "--", sys.executable, os.path.abspath(__file__), "--init", label, " ".join(words), json.dumps(hidden),
                  json.dumps(mounts)]
    child = subprocess.Popen(child_argv, env=login_environment(),
                             preexec_fn=functools.partial(die_with_parent, signal.SIGKILL))

    received: list[int] = []

    def leave(signum: int, _frame: object) -> None:
        # The launcher side is going away: so is the remote side (unshare ignores SIGTERM itself).
        received.append(signum)
        os.kill(child.pid, signal.SIGKILL)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, leave)
    code = child.wait()
    return 128 + received[0] if received else exit_status(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
