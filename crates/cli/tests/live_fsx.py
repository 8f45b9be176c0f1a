#!/usr/bin/python3
"""A seeded random file-system exerciser for the live-restore tests.

    live_fsx.py run ROOT SEED OPS    the same operations, in the same order,
                                     on any tree; prints a line per read
    live_fsx.py digest ROOT T0       one line per entry: type, mode, size,
                                     content hash, link target, link count,
                                     and the mtime of files older than T0

Operations: writes (also past the end), truncates (down and up), holes
punched, renames (also over an existing file), hard links, unlinks,
symlinks, chmod, directories made, writes through a shared writable mmap,
fsync, and reads. Run on a live mount during hydration and on a plain
restored copy, both must print the same reads and end with the same
digest.
"""
import ctypes
import hashlib
import mmap
import os
import random
import sys

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def regular_files(root):
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append(p)
    return out


def punch(path, off, length):
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length) != 0:
            raise OSError(ctypes.get_errno(), "fallocate")
    finally:
        os.close(fd)


def run(root, seed, ops):
    rng = random.Random(seed)
    for i in range(ops):
        files = regular_files(root)
        if not files:
            break
        f = rng.choice(files)
        size = os.path.getsize(f)
        op = rng.choice(
            ["write", "write", "read", "read", "truncate", "punch", "rename", "rename_over",
             "link", "unlink", "symlink", "chmod", "mkdir", "mmap", "fsync"]
        )
        rel = os.path.relpath(f, root)
        if op == "write":
            off = rng.randrange(0, size + 300_000)
            data = rng.randbytes(rng.randrange(1, 400_000))
            with open(f, "r+b") as h:
                h.seek(off)
                h.write(data)
        elif op == "read":
            off = rng.randrange(0, size + 1)
            n = rng.randrange(1, 2_000_000)
            with open(f, "rb") as h:
                h.seek(off)
                got = h.read(n)
            print(i, "read", rel, off, len(got), hashlib.sha256(got).hexdigest())
        elif op == "truncate":
            os.truncate(f, rng.randrange(0, 2 * size + 10))
        elif op == "punch":
            off = rng.randrange(0, size + 1)
            punch(f, off, rng.randrange(1, 3_000_000))
        elif op == "rename":
            os.rename(f, os.path.join(os.path.dirname(f), f"renamed{i}"))
        elif op == "rename_over":
            os.rename(f, rng.choice(files))
        elif op == "link":
            os.link(f, os.path.join(os.path.dirname(f), f"link{i}"))
        elif op == "unlink":
            os.unlink(f)
        elif op == "symlink":
            os.symlink(os.path.basename(f), os.path.join(os.path.dirname(f), f"sym{i}"))
        elif op == "chmod":
            os.chmod(f, rng.choice([0o600, 0o640, 0o644, 0o755]))
        elif op == "mkdir":
            d = os.path.join(os.path.dirname(f), f"dir{i}")
            os.mkdir(d)
            with open(os.path.join(d, "new"), "wb") as h:
                h.write(rng.randbytes(rng.randrange(0, 200_000)))
        elif op == "mmap" and size > 0:
            with open(f, "r+b") as h:
                m = mmap.mmap(h.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                off = rng.randrange(0, size)
                data = rng.randbytes(min(rng.randrange(1, 200_000), size - off))
                m[off:off + len(data)] = data
                m.flush()
                m.close()
        elif op == "fsync":
            fd = os.open(f, os.O_RDWR)
            os.fsync(fd)
            os.close(fd)
    print("done", ops)


def digest(root, t0):
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(d, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            mode = oct(st.st_mode)
            if os.path.islink(p):
                print(rel, "symlink", os.readlink(p))
            elif os.path.isdir(p):
                print(rel, "dir", mode)
            else:
                with open(p, "rb") as h:
                    h256 = hashlib.sha256(h.read()).hexdigest()
                mtime = st.st_mtime_ns if st.st_mtime_ns < t0 else "new"
                print(rel, "file", mode, st.st_size, h256, st.st_nlink, mtime)


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        digest(sys.argv[2], int(sys.argv[3]))
