"""The hostile sandbox battery (RELIABILITY.md S3, test 17): attacks on the sandbox and the host-side checks.

Each group function runs its attacks, checks the host, and returns one Attempt per attack;
tests/test_sandbox.py asserts that every attempt is contained and records the figures in
reliability-results.json (tests/reward_hacks.py holds the attacks on code_exec's verdicts).
`python tests/sandbox_battery.py` runs every group and rewrites the battery table in
docs/reliability.md from the results.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # run as a script from a clone

from rlft.rewards import sandbox  # noqa: E402

LIMITS = dict(timeout_s=2.0, memory_mb=256, max_procs=8, max_file_mb=4)
TMPFS_MB = max(8, 2 * LIMITS["max_file_mb"])  # the private tmpfs of a run (rlft/rewards/sandbox.py)
DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
BEGIN, END = "<!-- sandbox battery: begin -->", "<!-- sandbox battery: end -->"


@dataclass(frozen=True)
class Attempt:
    """One attack and whether the sandbox (or the verdict) contained it."""

    group: str
    name: str
    contained: bool
    detail: str = ""


def _run(code: str, **overrides: float) -> sandbox.SandboxResult:
    """Run one attack program with the battery's limits."""
    return sandbox.run_python(code, **{**LIMITS, **overrides})


def _lines(res: sandbox.SandboxResult) -> dict[str, str]:
    """`name: outcome` lines the attack programs print, as a dict."""
    return dict(line.split(": ", 1) for line in res.stdout.splitlines() if ": " in line)


# ---------------------------------------------------------------- 2. writes outside the private tmpfs

_PSEUDO_FS = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "securityfs", "debugfs", "tracefs", "bpf", "pstore",
              "fusectl", "configfs", "binfmt_misc", "autofs", "efivarfs", "selinuxfs", "nsfs"}


def world_writable_dirs() -> list[str]:
    """Every world-writable directory of the host, on every mounted file system but the pseudo ones (found now)."""
    points = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype not in _PSEUDO_FS:
            points.add(fields[4].encode().decode("unicode_escape"))
    found = set()
    for point in sorted(points):
        res = subprocess.run(["find", point, "-xdev", "-perm", "-0002", "-type", "d"], capture_output=True, text=True)
        found.update(line for line in res.stdout.splitlines() if line)
    return sorted(found)


_WRITER = '''
import os, shutil
for d in DIRS:
    try:
        os.mkdir(os.path.join(d, TOKEN + "-dir"))
        with open(os.path.join(d, TOKEN), "wb") as fh:
            fh.write(b"x" * 2**16)
        private = os.stat(d).st_dev == os.stat("/tmp/work").st_dev
        print("%s: wrote%s" % (d, " into the private tmpfs" if private else ""))
        if private:  # keep the quota for the next directory; anything else stays for the host to find
            shutil.rmtree(os.path.join(d, TOKEN + "-dir"))
            os.unlink(os.path.join(d, TOKEN))
    except OSError as exc:
        print("%s: refused (%s)" % (d, exc.strerror))
'''

_FILL = '''
import os
total = 0
try:
    for i in range(10**4):
        with open("fill-%d" % i, "wb") as fh:
            for _ in range(4):
                fh.write(b"x" * 2**19)
                total += 2**19
except OSError as exc:
    print("quota: %d %s" % (total, exc.strerror))
'''


def group_writes() -> list[Attempt]:
    """Item 2: no write reaches the host; the private tmpfs is the only writable place, with a quota."""
    token = f"rlft-canary-{secrets.token_hex(4)}"
    extra = ["/", "/etc", "/usr", "/var/tmp", "/run/lock", "/var/lock", "/var/crash", "/dev", "/dev/shm", "/dev/mqueue",
             "..", "../..", str(Path.cwd()), str(Path.home())]
    dirs = sorted(set(world_writable_dirs()) | set(extra))
    outcome = _lines(_run(_WRITER.replace("DIRS", repr(dirs)).replace("TOKEN", repr(token)), timeout_s=20.0))
    out = []
    for d in dirs:
        host_dir = Path(d) if d not in ("..", "../..") else None
        left = [p for p in (host_dir.iterdir() if host_dir and host_dir.is_dir() else []) if p.name.startswith(token)]
        for p in left:  # clean up whatever got through before judging
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        said = outcome.get(d, "no report")
        contained = not left and (said.startswith("refused") or said.endswith("into the private tmpfs"))
        out.append(Attempt("writes", f"write into {d}", contained, f"{said}; left on host: {len(left)}"))
    quota = _lines(_run(_FILL)).get("quota", "no report")
    total = int(quota.split()[0]) if quota[0].isdigit() else -1
    out.append(Attempt("writes", f"fill the private tmpfs ({TMPFS_MB} MB quota)", 0 <= total <= TMPFS_MB * 2**20,
                       quota))
    return out


# ---------------------------------------------------------------- 3. connections to host listeners

_CONNECTOR = '''
import socket
for name, family, kind, address, action in TARGETS:
    try:
        if action == "pair":
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            a.sendto(b"x", address)
        else:
            s = socket.socket(family, kind)
            s.settimeout(1)
            if action == "sendto":
                s.sendto(b"x", address)
            elif action == "connect":
                s.connect(address)
        print("%s: connected" % name)
    except OSError as exc:
        print("%s: refused (%s)" % (name, exc.strerror or exc))
'''


def _unix_listeners(token: str) -> tuple[list[tuple[str, socket.socket, object]], list[str]]:
    places = [Path("/run/lock"), Path(tempfile.gettempdir()), Path("/dev/shm"), Path.cwd()]
    listeners, cleanup = [], []
    for place in places:
        for kind, suffix in ((socket.SOCK_STREAM, "sock"), (socket.SOCK_DGRAM, "dgram")):
            path = place / f".{token}.{suffix}"
            try:
                s = socket.socket(socket.AF_UNIX, kind)
                s.bind(str(path))
            except OSError:
                continue
            cleanup.append(str(path))
            os.chmod(path, 0o777)
            listeners.append((f"{'stream' if kind == socket.SOCK_STREAM else 'datagram'} socket in {place}", s,
                              str(path)))
    for kind, suffix in ((socket.SOCK_STREAM, "sock"), (socket.SOCK_DGRAM, "dgram")):
        s = socket.socket(socket.AF_UNIX, kind)
        s.bind(f"\0{token}.{suffix}")
        listeners.append((f"abstract {'stream' if kind == socket.SOCK_STREAM else 'datagram'} socket", s,
                          f"\0{token}.{suffix}"))
    return listeners, cleanup


def group_connections() -> list[Attempt]:
    """Item 3: no connection of any kind to a host listener (Unix sockets in several places, abstract, TCP)."""
    token = f"rlft-{secrets.token_hex(4)}"
    listeners, cleanup = _unix_listeners(token)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    listeners.append(("TCP on 127.0.0.1", tcp, ("127.0.0.1", tcp.getsockname()[1])))
    targets = []
    for name, s, address in listeners:
        if s.type == socket.SOCK_STREAM:
            s.listen(8)
        s.setblocking(False)
        dgram = s.type == socket.SOCK_DGRAM
        targets.append((name, int(s.family), int(s.type), address, "sendto" if dgram else "connect"))
        if dgram:
            targets.append((f"{name} via a socketpair", int(s.family), int(s.type), address, "pair"))
    targets += [(f"open an {fam} socket", int(getattr(socket, fam)), int(kind), None, "open")
                for fam, kind in (("AF_VSOCK", socket.SOCK_STREAM), ("AF_NETLINK", socket.SOCK_RAW),
                                  ("AF_PACKET", socket.SOCK_RAW))]
    said = _lines(_run(_CONNECTOR.replace("TARGETS", repr(targets))))
    out = []
    try:
        for name, s, _ in listeners:
            reached = _accepted(s)
            contained = not reached and said.get(name, "").startswith("refused") \
                and said.get(f"{name} via a socketpair", "refused").startswith("refused")
            out.append(Attempt("connections", f"reach the {name}", contained, f"{said.get(name)}; host saw {reached}"))
        for name, *_ in targets[-3:]:
            out.append(Attempt("connections", name, said.get(name, "").startswith("refused"), said.get(name, "")))
    finally:
        for _, s, _ in listeners:
            s.close()
        for path in cleanup:
            Path(path).unlink(missing_ok=True)
    return out


def _accepted(s: socket.socket) -> int:
    """Connections or datagrams that reached the listener."""
    got = 0
    while True:
        try:
            conn = s.accept()[0] if s.type == socket.SOCK_STREAM else None
            if conn is None:
                s.recv(16)
            else:
                conn.close()
            got += 1
        except (BlockingIOError, OSError):
            return got


# ---------------------------------------------------------------- 4. IPC objects that outlive the run

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
_libc.shmctl.argtypes = _libc.msgctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_libc.semctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
IPC_CREAT, IPC_RMID = 0o1000, 0

_IPC = '''
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
def report(name, result):
    err = os.strerror(ctypes.get_errno()) if result < 0 else "id %d" % result
    print("%s: %s (%s)" % (name, "refused" if result < 0 else "done", err))
report("shm", libc.shmget(0, 1 << 20, 0o1600))
report("msg", libc.msgget(0, 0o1600))
report("sem", libc.semget(0, 1, 0o1600))
report("mq", libc.mq_open(b"/TOKEN", os.O_CREAT | os.O_RDWR, 0o600, None))
report("host shm", libc.shmget(HOSTKEY, 0, 0))
report("host mq", libc.mq_open(b"/TOKEN-host", os.O_RDONLY, 0, None))
total = 0
for _ in range(64):  # 64 x 32 MB = 2 GB of SysV shared memory, counted by no rlimit
    if libc.shmget(0, 32 << 20, 0o1600) < 0:
        break
    total += 32 << 20
print("shm total: %d" % total)
'''


def sysv_objects() -> set[tuple[str, int]]:
    """(kind, id) of every SysV IPC object visible to this process."""
    found = set()
    for kind in ("shm", "msg", "sem"):
        for line in Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]:
            found.add((kind, int(line.split()[1])))
    return found


def _remove(objects: set[tuple[str, int]]) -> None:
    for kind, ident in objects:
        {"shm": lambda i: _libc.shmctl(i, IPC_RMID, None), "msg": lambda i: _libc.msgctl(i, IPC_RMID, None),
         "sem": lambda i: _libc.semctl(i, 0, IPC_RMID)}[kind](ident)


def group_ipc() -> list[Attempt]:
    """Item 4: IPC objects die with the run; the host's are invisible; SysV shm is capped at the memory limit."""
    token = f"rlft-{secrets.token_hex(4)}"
    before = sysv_objects()
    host_key = 0x52000000 + secrets.randbelow(1 << 24)
    host_shm = _libc.shmget(host_key, 4096, IPC_CREAT | 0o666)
    host_mq = _libc.mq_open(f"/{token}-host".encode(), os.O_CREAT | os.O_RDWR, 0o666, None)
    code = _IPC.replace("TOKEN", token).replace("HOSTKEY", str(host_key))
    said = _lines(_run(code, memory_mb=LIMITS["memory_mb"]))
    _remove({("shm", host_shm)})
    os.close(host_mq) if host_mq >= 0 else None
    _libc.mq_unlink(f"/{token}-host".encode())
    left = sysv_objects() - before
    _remove(left)
    mq_left = _libc.mq_open(f"/{token}".encode(), os.O_RDONLY, 0, None)
    if mq_left >= 0:
        os.close(mq_left)
        _libc.mq_unlink(f"/{token}".encode())
    out = [Attempt("IPC", f"SysV {name} outlives the run", not any(k == kind for k, _ in left),
                   f"{said.get(kind)}; left on host: {sum(k == kind for k, _ in left)}")
           for kind, name in (("shm", "shared memory"), ("msg", "message queue"), ("sem", "semaphore set"))]
    out.append(Attempt("IPC", "POSIX message queue outlives the run", mq_left < 0, str(said.get("mq"))))
    out += [Attempt("IPC", f"open the host's {what}", said.get(key, "").startswith("refused"), str(said.get(key)))
            for key, what in (("host shm", "SysV segment"), ("host mq", "POSIX queue"))]
    total = int(said.get("shm total", "-1"))
    out.append(Attempt("IPC", f"SysV shared memory beyond the {LIMITS['memory_mb']} MB memory limit",
                       0 <= total <= LIMITS["memory_mb"] * 2**20, f"created {total >> 20} MB"))
    return out


# ---------------------------------------------------------------- 0. RELIABILITY.md test 17: resources and escapes

def proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, real uid) of every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith("Z"):
            continue
        table[int(entry)] = (int(fields["PPid"]), int(fields["Uid"].split()[0]))
    return table


def leftover_processes(baseline: set[int]) -> list[int]:
    """Descendants of this process plus any process running under a sandbox uid, less the baseline."""
    table = proc_table()
    sandbox_uid = lambda uid: any(first <= uid < first + n for first, n in sandbox._UID_RANGES[:2])  # noqa: E731
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return sorted((found | {pid for pid, (_, uid) in table.items() if sandbox_uid(uid)}) - baseline)


def group_containment(token_file: Path, leftovers: Callable[[], list[int]]) -> list[Attempt]:
    """Test 17: nine hostile programs, each contained within limit + 1 s, leaving no process behind."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    host_tmp_canary = Path(tempfile.gettempdir()) / f"rlft-canary-{os.getpid()}"
    battery = {
        "busy loop": ("while True: pass", {"timeout", "killed"}),
        "allocate 4 GB": ("b = bytearray(4 * 1024**3)", {"oom", "killed"}),
        "fork bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                      {"timeout", "killed"}),
        "1 GB stdout": ("import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)\n", {"killed"}),
        "write ../../canary": (f"for p in ('../../canary', {str(host_tmp_canary)!r}):\n"
                               "    try:\n        open(p, 'w').write('x')\n    except OSError:\n        pass\n"
                               "raise SystemExit('done')", {"error"}),
        "read HF token": (f"print(open({str(token_file)!r}).read())", {"error"}),
        "connect to loopback": (f"import socket\nsocket.create_connection(('127.0.0.1', "
                                f"{listener.getsockname()[1]}), timeout=1)", {"error"}),
        "kill the trainer": (f"import os\nos.kill(os.getppid(), 9)\nos.kill({os.getpid()}, 9)", {"error"}),
        "ignore SIGTERM": ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)",
                           {"timeout"}),
    }
    out, secret = {}, token_file.read_text()
    for name, (code, expected) in battery.items():
        t0 = time.monotonic()
        res = _run(code)
        took, left = time.monotonic() - t0, leftovers()
        ok = res.isolated and res.status in expected and took <= LIMITS["timeout_s"] + 1.0 and not left \
            and secret not in res.stdout + res.stderr
        out[name] = [ok, f"{res.status} in {took:.2f} s; leftover processes {len(left)}"]
    listener.setblocking(False)
    reached = _accepted(listener)
    listener.close()
    out["connect to loopback"] = [out["connect to loopback"][0] and not reached, f"host saw {reached}"]
    written = Path("/canary").exists() or host_tmp_canary.exists()
    out["write ../../canary"] = [out["write ../../canary"][0] and not written, f"files on host: {written}"]
    return [Attempt("resources and escapes", name, ok, detail) for name, (ok, detail) in out.items()]


# ---------------------------------------------------------------- the table in docs/reliability.md

GROUPS = {  # group -> (RELIABILITY.md item, test that asserts it)
    "resources and escapes": ("test 17", "tests/test_sandbox.py::test_sandbox_contains_hostile_code"),
    "reward hacks": ("verdicts", "tests/test_code_exec.py::test_reward_hacks_score_zero"),
    "writes": ("read-only file system", "tests/test_sandbox.py::test_no_write_reaches_the_host"),
    "connections": ("no connection", "tests/test_sandbox.py::test_no_connection_to_host_listeners"),
    "IPC": ("IPC namespace", "tests/test_sandbox.py::test_ipc_objects_die_with_the_run"),
}


def run_all() -> list[Attempt]:
    """Every group, as the tests run them (test 17 with a HOME holding a token the sandbox must not read)."""
    import reward_hacks  # it imports Attempt from here

    home, old_home = Path(tempfile.mkdtemp(prefix="rlft-home-")), os.environ.get("HOME")
    token = home / ".cache" / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("hf_CANARYTOKEN123")
    baseline = set(leftover_processes(set()))
    try:
        os.environ["HOME"] = str(home)
        first = group_containment(token, lambda: leftover_processes(baseline))
    finally:
        os.environ.pop("HOME") if old_home is None else os.environ.update(HOME=old_home)
        shutil.rmtree(home, ignore_errors=True)
    return first + reward_hacks.group_reward_hacks() + group_writes() + group_connections() + group_ipc()


def table(attempts: list[Attempt]) -> str:
    """Markdown table: per group, attacks tried and contained, and the attacks."""
    rows = ["| group | tried | contained | attacks (test) |", "|---|---|---|---|"]
    for group, (_, test) in GROUPS.items():
        mine = [a for a in attempts if a.group == group]
        names = "; ".join(a.name if a.contained else f"**{a.name} (NOT contained: {a.detail})**" for a in mine)
        names = names.replace("_", "\\_")  # __eq__ is not bold
        rows.append(f"| {group} | {len(mine)} | {sum(a.contained for a in mine)} | {names} (`{test}`) |")
    machine = f"{os.uname().sysname} {os.uname().release}, {os.uname().machine}"
    mode = "root (own uid)" if os.geteuid() == 0 else "user namespace"
    return "\n".join([*rows, "", f"Measured by `python tests/sandbox_battery.py` on {machine}, sandbox mode {mode}."])


def write_doc(text: str) -> None:
    """Replace the generated block of docs/reliability.md."""
    doc = DOC.read_text()
    head, rest = doc.split(BEGIN, 1)
    DOC.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    if not sandbox.isolation_available():
        sys.exit(f"no namespace isolation here: {sandbox.isolation_problem()}")
    results = run_all()
    write_doc(table(results))
    print(table(results))
    sys.exit(0 if all(a.contained for a in results) else 1)
