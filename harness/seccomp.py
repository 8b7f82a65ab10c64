"""The seccomp filter of the Linux sandbox: the system calls a worker is refused, as a BPF
program for bwrap --seccomp (seccomp_program), handed over in a memfd (seccomp_fd)."""

import os
import platform
import struct

# ---------------------------------------------------------------------------
# seccomp: no covert channel between two sandboxes through shared files
# ---------------------------------------------------------------------------
# Both workers see the same read-only files (the same inodes) and the same kernel, and red
# teams passed the role between them: with locks on a file both read (a "sleeper" champion
# learned that a newer challenger ran beside it), then through the page cache (each timed
# 4 KiB reads of files the other reads, and evicted pages with posix_fadvise). The filter
# refuses (EPERM) the calls that let a process see or change what another's use of a shared
# file or kernel object leaves behind:
#   flock; fcntl's lock, lease and directory-notify commands: locks and notices cross sandboxes.
#   inotify, fanotify: events from another process's opens and reads.
#   mincore, cachestat: which pages of a file are in memory.
#   fadvise64 (aarch64: fadvise64_64), readahead, process_madvise, madvise's MADV_COLD and
#       MADV_PAGEOUT: evict a file's cached pages (or load them); other madvise advice stays
#       allowed (numpy and MLX use it).
#   preadv2, pwritev2: RWF_NOWAIT reads fail when a page is not cached (nothing here uses them).
#   io_uring_setup/enter/register: a ring does fadvise, madvise and nowait reads unfiltered.
#   add_key, request_key, keyctl: the kernel's key quotas are counted per user, not per sandbox.
#   io_setup and the other aio calls: the machine's aio context count (/proc/sys/fs/aio-nr).
#   sysinfo: the machine's thread count, free memory and load (a red team signalled with 120
#       idle threads: sleeper KEEP +22.9 %); glibc's sysconf(_SC_PHYS_PAGES) then guesses.
#   statfs, fstatfs, ustat: a file system's free blocks and inodes, which the other worker's
#       writes change (both folders share the disk: sleeper KEEP +34 % with statvfs).
#   Not refused, and open as channels (see the README's threat model): shared futexes (keyed
#       by a file's inode and offset: a wake on a page of the interpreter both map reached a
#       waiter in the other sandbox; libstdc++'s static-init guards wait and wake shared, so
#       MLX hangs without them) and the machine-wide inode counter of new pipes and sockets.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_DENIED = {  # architecture -> the system call numbers refused outright
    "x86_64": {"flock": 73, "inotify_init": 253, "inotify_init1": 294, "fanotify_init": 300, "mincore": 27,
               "cachestat": 451, "fadvise64": 221, "readahead": 187, "process_madvise": 440,
               "preadv2": 327, "pwritev2": 328, "io_uring_setup": 425, "io_uring_enter": 426,
               "io_uring_register": 427, "add_key": 248, "request_key": 249, "keyctl": 250, "sysinfo": 99,
               "io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209, "io_cancel": 210,
               "ustat": 136, "statfs": 137, "fstatfs": 138},
    "aarch64": {"flock": 32, "inotify_init1": 26, "fanotify_init": 262, "mincore": 232,
                "cachestat": 451, "fadvise64_64": 223, "readahead": 213, "process_madvise": 440,
                "preadv2": 286, "pwritev2": 287, "io_uring_setup": 425, "io_uring_enter": 426,
                "io_uring_register": 427, "add_key": 217, "request_key": 218, "keyctl": 219, "sysinfo": 179,
                "io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_cancel": 3, "io_getevents": 4,
                "statfs": 43, "fstatfs": 44},
}
_FCNTL = {"x86_64": 72, "aarch64": 25}
# F_GETLK F_SETLK F_SETLKW, F_OFD_GETLK F_OFD_SETLK F_OFD_SETLKW, F_SETLEASE F_GETLEASE F_NOTIFY,
# F_SETPIPE_SZ F_GETPIPE_SZ (a pipe's size draws on, and shows, the user's pipe-page allowance)
_FCNTL_DENIED = (5, 6, 7, 36, 37, 38, 1024, 1025, 1026, 1031, 1032)
_MADVISE = {"x86_64": 28, "aarch64": 233}
_MADVISE_DENIED = (20, 21)  # MADV_COLD, MADV_PAGEOUT
# No new user namespace (a sandbox that runs as a user of its own has no bwrap namespace to
# forbid them in; inside one, a process would hold every capability over its own mounts):
# clone and unshare with CLONE_NEWUSER are refused, and clone3, whose flags a filter cannot
# read, answers ENOSYS, so that glibc falls back to clone (as under Docker's default filter).
# open_by_handle_at reads a file by its inode number, past the mounts that hide it.
_CLONE_LIKE = {"x86_64": (56, 272), "aarch64": (220, 97)}  # clone, unshare: flags in args[0]
_CLONE3 = 435
_CLONE_NEWUSER = 0x10000000
_OPEN_BY_HANDLE = {"x86_64": 304, "aarch64": 265}


def seccomp_program(machine=None):
    """The seccomp BPF program (bytes, for bwrap --seccomp) for this machine's architecture,
    or None for one it does not know. Calls from another architecture's ABI (x32, i386 on
    x86_64) are refused altogether, so the numbers above cannot be dodged."""
    machine = _ARCH_ALIAS.get(machine or platform.machine(), machine or platform.machine())
    if machine not in _DENIED:
        return None
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
    allow, deny, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38  # SECCOMP_RET_ALLOW, RET_ERRNO|EPERM/ENOSYS
    # (code, jump-if-true target, jump-if-false target, k); targets: "next", "allow", "deny",
    # "enosys", "fcntl" or "clone"
    steps = [(ld, None, None, 4), (jeq, "next", "deny", _AUDIT_ARCH[machine]), (ld, None, None, 0)]
    if machine == "x86_64":
        steps.append((jge, "deny", "next", 0x40000000))  # the x32 ABI's numbers
    steps += [(jeq, "deny", "next", number) for number in [*_DENIED[machine].values(), _OPEN_BY_HANDLE[machine]]]
    steps += [(jeq, "enosys", "next", _CLONE3)]
    steps += [(jeq, "clone", "next", number) for number in _CLONE_LIKE[machine]]
    steps += [(jeq, "fcntl", "next", _FCNTL[machine]), (jeq, "next", "allow", _MADVISE[machine]),
              (ld, None, None, 32)]  # madvise's advice (args[2], low half: the kernel takes an int)
    steps += [(jeq, "deny", "next", advice) for advice in _MADVISE_DENIED]
    steps += [(ret, None, None, allow)]
    where = {"fcntl": len(steps)}
    steps += [(ld, None, None, 24)]  # fcntl's cmd (args[1], low half)
    steps += [(jeq, "deny", "next", cmd) for cmd in _FCNTL_DENIED]
    steps += [(ret, None, None, allow)]
    where["clone"] = len(steps)
    steps += [(ld, None, None, 16), (jset, "deny", "allow", _CLONE_NEWUSER)]  # the flags (args[0], low half)
    steps += [(ret, None, None, enosys), (ret, None, None, allow), (ret, None, None, deny)]
    where.update(enosys=len(steps) - 3, allow=len(steps) - 2, deny=len(steps) - 1)

    def offset(i, target):
        return 0 if target in (None, "next") else where[target] - i - 1

    return b"".join(struct.pack("<HBBI", code, offset(i, jt), offset(i, jf), k)
                    for i, (code, jt, jf, k) in enumerate(steps))


_ARCH_ALIAS = {"amd64": "x86_64", "arm64": "aarch64"}


def seccomp_fd():
    """A descriptor holding seccomp_program(), for bwrap --seccomp; None when there is none."""
    program = seccomp_program()
    if program is None or not hasattr(os, "memfd_create"):
        return None
    fd = os.memfd_create("mlx-hillclimb-seccomp")
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
