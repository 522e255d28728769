"""The epoll registrations of a process, read from /proc (Linux; tests only).

epoll registers open files, not fd numbers: a registration outlives the close
of its fd while a duplicate keeps the file open. Each line of
``/proc/<pid>/fdinfo/<epoll fd>`` names the fd a registration was made with
and the inode of its file.
"""

from __future__ import annotations

import os


def stale_registrations(pid: int, epoll_fd: int | None = None) -> set[tuple[int, int]]:
    """Registrations (epoll fd, fd) in the epoll sets of ``pid`` (or only in ``epoll_fd``) whose fd is
    closed or names another file. Read twice: only what both reads found counts (not an fd closed
    between reading a set and looking at the fd, which drops its registration)."""
    return _stale(pid, epoll_fd) & _stale(pid, epoll_fd)


def _stale(pid: int, epoll_fd: int | None) -> set[tuple[int, int]]:
    stale = set()
    for name in [str(epoll_fd)] if epoll_fd is not None else os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/{pid}/fdinfo/{name}") as info:
                lines = [line.split() for line in info if line.startswith("tfd:")]
        except OSError:  # closed meanwhile
            continue
        for fields in lines:
            fd, inode = int(fields[1]), int(next(f for f in fields if f.startswith("ino:"))[4:], 16)
            try:
                if os.stat(f"/proc/{pid}/fd/{fd}").st_ino == inode:
                    continue
            except OSError:
                pass
            stale.add((int(name), fd))
    return stale
