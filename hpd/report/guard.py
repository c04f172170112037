"""The guard a code-metric program runs under: installed in the child before the program runs.

This is the sandbox's layer that holds on every machine, with or without namespaces. The child
is ``python -I -S -B``, so this file uses the standard library only: the sandbox passes its
source with ``-c`` and the program's path as the first argument (run as ``__main__``). It
refuses, with PermissionError naming the call and the path:

- creating, writing, truncating, renaming, linking or deleting anything outside the program's
  folder (its working directory, HOME and TMPDIR; /dev/null excepted): ``open`` for writing,
  ``os.open`` with a write flag, ``os.mkdir`` (so ``os.makedirs``), ``os.rename``, ``os.replace``,
  ``os.link``, ``os.symlink``, ``os.truncate``, ``os.remove``, ``os.unlink``, ``os.rmdir`` (so
  ``shutil.rmtree`` and ``shutil.move``);
- changing modes, owners or times outside it (``os.chmod``, ``os.chown``, ``os.utime`` and forms);
- signalling any process but itself and the children it forked (``os.kill``, ``os.killpg``), and
  leaving its session or process group (``os.setsid``, ``os.setpgid``), which the timeout kills;
- starting programs (``subprocess``, ``os.system``, ``os.popen``, ``os.exec*``, ``os.spawn*``,
  ``os.posix_spawn*``);
- network connections (``socket.socket`` unless it wraps a descriptor it was given, as
  ``socketpair`` makes; ``socket.create_connection``; ``socket.getaddrinfo``).

Like HumanEval's reliability guard it stops accidents, not an adversary: ``ctypes``, ``posix``
and ``_io`` still reach the system calls. The namespaces around the child hold against those.
"""

import builtins
import errno
import io
import os
import sys

MESSAGE = "disabled in the hpd code sandbox"
NETWORK_MESSAGE = "network access is disabled in the hpd code sandbox"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_DEVICES = ("/dev/null",)
_REFUSED = ("system", "popen", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp",
             "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
             "spawnvpe", "posix_spawn", "posix_spawnp", "setsid", "setpgid", "killpg")


def _refuse(call, detail=""):
    raise PermissionError(errno.EPERM, f"{call} is {MESSAGE}{detail}")


class Folder:
    """The one folder a program may change, and the test of whether a path lies in it."""

    def __init__(self, root):
        self.root = os.path.realpath(root)

    @staticmethod
    def resolve(path, dir_fd=None, follow=True):
        """Where `path` (relative to `dir_fd` when given) really is. `follow`: a symlink as the last
        component counts where it points (open, chmod), else where it stands (unlink, rename)."""
        if isinstance(path, int):
            path, follow = f"/proc/self/fd/{path}", True
        path = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(f"/proc/self/fd/{dir_fd}", path)
        if follow:
            return os.path.realpath(path)
        head, tail = os.path.split(os.path.abspath(path))
        return os.path.join(os.path.realpath(head), tail)

    def holds(self, path, dir_fd=None, follow=True):
        real = self.resolve(path, dir_fd, follow)
        return real in _DEVICES or real == self.root or real.startswith(self.root + os.sep)

    def check(self, call, path, dir_fd=None, follow=True):
        if not self.holds(path, dir_fd, follow):
            real = self.resolve(path, dir_fd, follow)
            given = path if isinstance(path, int) else os.fsdecode(os.fspath(path))
            where = repr(real) if given == real else f"{given!r}, that is {real!r},"
            _refuse(call, f" ({where} is outside the program's folder {self.root})")


def _wrap(module, name, check):
    """Replace module.name by a function that runs check(*args, **kwargs) first."""
    real = getattr(module, name, None)
    if real is None:
        return

    def guarded(*args, **kwargs):
        check(*args, **kwargs)
        return real(*args, **kwargs)

    guarded.__name__ = guarded.__qualname__ = name
    setattr(module, name, guarded)


def _guard_files(folder):
    def one(call, follow):
        def check(path, *args, dir_fd=None, follow_symlinks=True, **kwargs):
            folder.check(call, path, dir_fd, follow and follow_symlinks)
        return check

    def two(call):  # both ends: a hard link to a file outside would let it be written through
        def check(src, dst, *args, src_dir_fd=None, dst_dir_fd=None, **kwargs):
            folder.check(call, src, src_dir_fd, follow=False)
            folder.check(call, dst, dst_dir_fd, follow=False)
        return check

    def opened(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(c in mode for c in "wax+"):
            folder.check(f"open(mode={mode!r})", file)

    def os_open(path, flags, *args, dir_fd=None, **kwargs):
        if flags & _WRITE_FLAGS:
            folder.check("os.open for writing", path, dir_fd)

    def truncate(path, *args, **kwargs):
        if not isinstance(path, int):  # a descriptor was opened for writing, so checked then
            folder.check("os.truncate", path)

    _wrap(builtins, "open", opened)
    io.open = builtins.open  # the same function, which pathlib and others call by this name
    _wrap(os, "open", os_open)
    _wrap(os, "truncate", truncate)
    for name in ("remove", "unlink", "rmdir", "mkdir", "mkfifo", "mknod"):
        _wrap(os, name, one(f"os.{name}", follow=False))
    for name in ("chmod", "chown", "utime", "chflags", "fchmod", "fchown"):
        _wrap(os, name, one(f"os.{name}", follow=True))
    for name in ("lchmod", "lchown", "lchflags"):
        _wrap(os, name, one(f"os.{name}", follow=False))
    for name in ("rename", "replace", "link"):
        _wrap(os, name, two(f"os.{name}"))

    def symlink(src, dst, *args, dir_fd=None, **kwargs):  # where it points is checked when it is opened
        folder.check("os.symlink", dst, dir_fd, follow=False)

    _wrap(os, "symlink", symlink)


def _guard_processes():
    import _posixsubprocess

    children = set()
    real_fork = os.fork

    def fork():
        pid = real_fork()
        if pid == 0:
            children.clear()
        else:
            children.add(pid)
        return pid

    def kill(pid, sig):
        if sig != 0 and pid != os.getpid() and pid not in children:
            raise PermissionError(errno.EPERM, f"os.kill of process {pid} is {MESSAGE} (it may signal "
                                               "itself and the children it forked)")

    def refuse(name):
        def check(*args, **kwargs):
            _refuse(name)
        return check

    os.fork = fork
    _wrap(os, "kill", kill)
    for name in _REFUSED:
        _wrap(os, name, refuse(f"os.{name}"))
    _wrap(_posixsubprocess, "fork_exec", refuse("starting a program (subprocess)"))


def _guard_network():
    import socket

    def refuse(*args, **kwargs):
        raise OSError(NETWORK_MESSAGE)

    class GuardedSocket(socket.socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None:
                refuse()
            super().__init__(family, type, proto, fileno)

    socket.socket = GuardedSocket
    socket.create_connection = refuse
    socket.getaddrinfo = refuse


def install(root):
    """Guard this process: changes only inside `root`, no signals to others, no programs, no network."""
    _guard_network()
    _guard_processes()
    _guard_files(Folder(root))


if __name__ == "__main__":
    # run with -c: argv[0] is "-c", argv[1] the program, which sees its own path as argv[0]
    install(os.getcwd())
    import runpy

    del sys.argv[0]
    runpy.run_path(sys.argv[0], run_name="__main__")
