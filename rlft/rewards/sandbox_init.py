"""Pid 1 of the sandbox: build a read-only root, drop every privilege, filter syscalls, run the code.

rlft/rewards/sandbox.py starts it as `python -I -S -B sandbox_init.py OPTIONS` under `unshare --mount
--net --pid --ipc --fork` (plus `--user --map-root-user` when the trainer is not root), so it
runs as (namespace) root in new mount, network, pid and IPC namespaces. It imports nothing from
rlft (and little at all: its start-up is most of the sandbox's). OPTIONS:
--uid N (absent: stay the user-namespace root), --bind PATH and --cover PATH (repeated),
--tmpfs-mb N, --memory-mb N, --rlimit RESOURCE:SOFT:HARD (repeated). Stdin carries
`<length>\\n<program><input>`: the program becomes /tmp/work/main.py, the rest stays on stdin.

The file system the code sees is assembled on a fresh tmpfs and entered with pivot_root, so the
host's root is not in the namespace at all:
- `binds` (system directories and the interpreter's prefix) bind-mounted from the host;
- /dev holding only null, zero, full, random and urandom (bind mounts) and the fd links;
- /proc of the new pid namespace; `cover`: secret directories inside a bind, hidden by empty tmpfs;
- /tmp: a private tmpfs of `tmpfs_mb` MB (the write quota), also mounted at /dev/shm; it
  disappears with the mount namespace.
Then every mount but /tmp and /dev/shm is remounted read-only, and /proc/self/mountinfo is
checked: if any is still writable, the code does not run (exit 125). Homes, /run, /var, the host's
/tmp, data sets and run directories are simply absent, so the code can neither leave files behind
nor read the tests' expected values from disk. The IPC namespace dies with the run, taking SysV
segments, queues, semaphores and POSIX queues with it; its shm/msg limits are lowered below.

The init then forks the payload (it stays pid 1 and reaps orphans). The payload gets its
rlimits, its own uid/gid with no groups (root mode), an empty capability set (bounding,
inheritable, ambient, permitted), no_new_privs and a seccomp filter, and only then runs main.py
in its own interpreter, as `python -I -S main.py` would (a second interpreter start would double
the sandbox's start-up). The seccomp filter allows:
- socket() only for AF_INET/AF_INET6, which the empty network namespace contains. A read-only or
  hidden file system does not stop connect() to a Unix socket whose file is visible, socket files
  live in many places (/run, /tmp, homes, project directories) and appear at any time; refusing
  AF_UNIX (and netlink, vsock, ...) sockets at the syscall closes them all, abstract ones included;
- socketpair() only as a connected AF_UNIX stream pair (a datagram pair could sendto() a path);
- no clone() with namespace flags, unshare(), setns(): a new user namespace would give back
  capabilities and unlimited tmpfs; clone3() reports ENOSYS (its flags are in memory the filter
  cannot read) so libc falls back to clone();
- no io_uring (its operations bypass seccomp), keyrings (not namespaced), bpf, userfaultfd,
  perf_event_open; another ABI (i386, x32) is killed or refused.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import sys

EXIT_SETUP = 125  # the sandbox could not be built; the code did not run
NEW_ROOT = "/tmp"  # where the new root is assembled before pivot_root
WRITABLE = ("/tmp", "/dev/shm")
DEVICES = ("null", "zero", "full", "random", "urandom")
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
_ATIME_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
                "nodiratime": 2048, "relatime": 1 << 21}  # per-mount flags a remount must keep
MNT_DETACH = 2
PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_CAP_AMBIENT = 4, 24, 38, 22, 47
SECCOMP_MODE_FILTER = 2
AF_UNIX, AF_INET, AF_INET6, SOCK_STREAM = 1, 2, 10, 1
CLONE_NAMESPACES = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
# audit arch and syscall numbers (asm/unistd_64.h; asm-generic/unistd.h for aarch64)
ARCHES = {
    "x86_64": (0xC000003E, {"pivot_root": 155, "socket": 41, "socketpair": 53, "clone": 56, "clone3": 435,
                            "unshare": 272, "setns": 308, "io_uring_setup": 425, "io_uring_enter": 426,
                            "io_uring_register": 427, "add_key": 248, "request_key": 249, "keyctl": 250,
                            "bpf": 321, "userfaultfd": 323, "perf_event_open": 298}),
    "aarch64": (0xC00000B7, {"pivot_root": 41, "socket": 198, "socketpair": 199, "clone": 220, "clone3": 435,
                             "unshare": 97, "setns": 268, "io_uring_setup": 425, "io_uring_enter": 426,
                             "io_uring_register": 427, "add_key": 217, "request_key": 218, "keyctl": 219,
                             "bpf": 280, "userfaultfd": 282, "perf_event_open": 241}),
}
# classic BPF opcodes: ld [k], jeq/jge/jset #k, and #k, ret #k
LD, JEQ, JGE, JSET, AND, RET = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06
ALLOW, KILL_PROCESS, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
ARG0, ARG1 = 16, 24  # offsets of the low 32 bits of args[0], args[1] in struct seccomp_data

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _c(text: str | None) -> bytes | None:
    return text.encode() if text is not None else None


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_c(source), _c(target), _c(fstype), flags, _c(data)), f"mount {target}")


def seccomp_program(machine: str) -> list[tuple[int, int, int, int]]:
    """The filter as (code, k, jt, jf) instructions; see the module docstring for what it refuses.

    Raises:
        OSError: no syscall table for this architecture (the sandbox then fails closed).
    """
    if machine not in ARCHES:
        raise OSError(errno.ENOSYS, f"no seccomp filter for architecture {machine}")
    arch, nr = ARCHES[machine]
    deny, enosys = ERRNO | errno.EPERM, ERRNO | errno.ENOSYS
    blocks = [
        (nr["socket"], [(LD, ARG0, 0, 0), (JEQ, AF_INET, 2, 0), (JEQ, AF_INET6, 1, 0), (RET, deny, 0, 0),
                        (RET, ALLOW, 0, 0)]),
        (nr["socketpair"], [(LD, ARG0, 0, 0), (JEQ, AF_UNIX, 0, 3), (LD, ARG1, 0, 0), (AND, 0xF, 0, 0),
                            (JEQ, SOCK_STREAM, 1, 0), (RET, deny, 0, 0), (RET, ALLOW, 0, 0)]),
        (nr["clone"], [(LD, ARG0, 0, 0), (JSET, CLONE_NAMESPACES, 0, 1), (RET, deny, 0, 0), (RET, ALLOW, 0, 0)]),
        (nr["clone3"], [(RET, enosys, 0, 0)]),
    ]
    blocks += [(nr[name], [(RET, deny, 0, 0)]) for name in (
        "unshare", "setns", "io_uring_setup", "io_uring_enter", "io_uring_register", "add_key", "request_key",
        "keyctl", "bpf", "userfaultfd", "perf_event_open")]
    prog = [(LD, 4, 0, 0), (JEQ, arch, 1, 0), (RET, KILL_PROCESS, 0, 0), (LD, 0, 0, 0)]
    if machine == "x86_64":
        prog += [(JGE, 0x40000000, 0, 1), (RET, deny, 0, 0)]  # x32 ABI numbers
    for number, block in blocks:
        prog.append((JEQ, number, 0, len(block)))  # not this syscall: skip its block
        prog.extend(block)
    return prog + [(RET, ALLOW, 0, 0)]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _install_seccomp() -> None:
    prog = seccomp_program(os.uname().machine)
    insns = (_SockFilter * len(prog))(*[_SockFilter(code, jt, jf, k) for code, k, jt, jf in prog])
    fprog = _SockFprog(len(prog), insns)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "seccomp")


def _mounts() -> dict[str, list[str]]:
    """Visible mount point -> its per-mount options (a later mount on a path hides the earlier)."""
    found = {}
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            parts = fields[4].split("\\")  # space, tab, newline and backslash are written as \\ooo
            point = parts[0] + "".join(chr(int(p[:3], 8)) + p[3:] for p in parts[1:])
            found[point] = fields[5].split(",")
    return found


def _read_program() -> bytes:
    header = b""
    while not header.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte or len(header) > 20:
            raise OSError(errno.EINVAL, "no program on stdin")
        header += byte
    left, chunks = int(header), []
    while left:
        chunk = os.read(0, min(left, 1 << 20))  # exactly the program: the rest is the program's input
        if not chunk:
            raise OSError(errno.EINVAL, "program truncated")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _limit_ipc(memory_mb: int) -> None:
    """Cap SysV shared memory and message queues of this IPC namespace at the memory limit.

    Best effort: a user namespace on an older kernel may not own these sysctls; the namespace
    still takes every object with it when the run ends.
    """
    pages = memory_mb * 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")
    for name, value in (("shmall", pages), ("shmmax", memory_mb * 1024 * 1024), ("msgmni", 16)):
        try:
            with open(f"/proc/sys/kernel/{name}", "w") as fh:
                fh.write(str(value))
        except OSError:
            pass


def _assemble_root(binds: list[str], cover: list[str]) -> None:
    root = NEW_ROOT
    _mount("rlft-root", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=1024,mode=755")
    for path in binds:
        target = root + path
        if os.path.islink(path):  # e.g. /bin -> usr/bin on a merged-/usr system
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
        else:
            os.makedirs(target, exist_ok=True)
            _mount(path, target, None, MS_BIND | MS_REC)
    for d in ("/dev/shm", "/proc", "/tmp", "/.old"):
        os.makedirs(root + d, exist_ok=True)
    for name in DEVICES:
        open(f"{root}/dev/{name}", "w").close()
        _mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for d in cover:
        if os.path.isdir(root + d):
            _mount("rlft-hidden", root + d, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=755")
    os.chdir(root)
    _check(_libc.syscall(ARCHES[os.uname().machine][1]["pivot_root"], b".", b".old"), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old", MNT_DETACH), "umount the host root")
    os.rmdir("/.old")


def _make_readonly(tmpfs_mb: int) -> None:
    """Remount every mount read-only, then mount the private tmpfs; verify in mountinfo."""
    for point, options in _mounts().items():
        keep = sum(_ATIME_FLAGS.get(o, 0) for o in options)
        _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
    # nr_inodes bounds the kernel memory of many empty files, which size= does not count
    _mount("rlft", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size={tmpfs_mb}m,nr_inodes=8192,mode=1777")
    os.mkdir("/tmp/.shm")
    os.chmod("/tmp/.shm", 0o1777)
    _mount("/tmp/.shm", "/dev/shm", None, MS_BIND)
    writable = [p for p, options in _mounts().items() if "ro" not in options and p not in WRITABLE]
    if writable:
        raise OSError(errno.EROFS, f"still writable after remounting read-only: {', '.join(writable)}")


def _drop_privileges(uid: int | None) -> None:
    with open("/proc/sys/kernel/cap_last_cap") as fh:
        last_cap = int(fh.read())
    for cap in range(last_cap + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "drop the capability bounding set")
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    _check(_libc.capset(header, (ctypes.c_uint32 * 6)()), "clear capabilities")
    _libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL; EINVAL before Linux 4.3 (none to clear)


def _confine(cfg: dict) -> None:
    """In the forked child: rlimits, no privileges, the seccomp filter, the working dir."""
    for res, soft, hard in cfg["rlimit"]:
        resource.setrlimit(res, (soft, hard))
    _drop_privileges(cfg["uid"])
    _check(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")  # setuid cleared it: /proc/self would be root's
    _install_seccomp()
    os.chdir("/tmp/work")
    os.closerange(3, 65536)


def _run_program() -> None:
    """Run main.py as `python -I -S main.py` would, in this confined interpreter (no second start-up).

    A fresh `__main__` module, as the interpreter makes for a script (runpy would cost more to
    import than the rest of the setup). The program's exceptions and exit status are its own.
    """
    main = type(sys)("__main__")
    main.__file__ = "main.py"
    sys.modules["__main__"], sys.argv = main, ["main.py"]
    with open("main.py", "rb") as fh:
        code = compile(fh.read(), "main.py", "exec")  # bytes: a coding cookie or BOM is honoured
    exec(code, main.__dict__)


def _reap(payload: int) -> int:
    """Reap every orphan until the payload exits; its status, a signal death as 128 + signo."""
    while True:
        pid, status = os.wait()
        if pid == payload:
            return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def parse_args(argv: list[str]) -> dict:
    """OPTIONS (see the module docstring) as a dict."""
    cfg: dict = {"uid": None, "bind": [], "cover": [], "rlimit": [], "tmpfs_mb": 8, "memory_mb": 512}
    for key, value in zip(argv[::2], argv[1::2], strict=True):
        name = key[2:].replace("-", "_")
        if name in ("bind", "cover"):
            cfg[name].append(value)
        elif name == "rlimit":
            cfg[name].append(tuple(int(x) for x in value.split(":")))
        elif name in ("uid", "tmpfs_mb", "memory_mb"):
            cfg[name] = int(value)
        else:
            raise ValueError(f"unknown option {key}")
    return cfg


def main() -> None:
    """Set up, fork the program, reap until it exits; exit with its status (125: the setup failed)."""
    try:
        cfg = parse_args(sys.argv[1:])
        program = _read_program()
        _limit_ipc(cfg["memory_mb"])
        _assemble_root(cfg["bind"], cfg["cover"])
        _make_readonly(cfg["tmpfs_mb"])
        os.mkdir("/tmp/work", 0o700)
        if cfg["uid"] is not None:
            os.chown("/tmp/work", cfg["uid"], cfg["uid"])
        with open("/tmp/work/main.py", "wb") as fh:
            fh.write(program)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"rlft sandbox setup failed: {exc}\n")
        os._exit(EXIT_SETUP)
    pid = os.fork()
    if pid != 0:
        os._exit(_reap(pid))
    try:
        _confine(cfg)
    except BaseException as exc:  # noqa: BLE001 - report and never fall back to running unconfined
        sys.stderr.write(f"rlft sandbox setup failed: {exc}\n")
        os._exit(EXIT_SETUP)
    _run_program()


if __name__ == "__main__":
    main()
