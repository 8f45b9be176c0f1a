#!/usr/bin/env python3
"""Datasets for the benchmarks (not tests), deterministic for a seed.

  bench-data.py node DIR        a node-like tree: 1,200 LSM-style files of
                                64-512 KiB, 40 tables of 4 MiB, a 1 GiB sparse
                                state file holding 128 MiB of data in 4 MiB
                                extents, a 256 MiB append-only block log
  bench-data.py node-change DIR the incremental change: 20 rewrites of
                                256 KiB in place in the state file (4 KiB
                                aligned), 16 MiB appended to the log, 5 new
                                4 MiB tables
  bench-data.py node-week DIR   a week of a node (bench-public.sh): 10% of
                                the LSM files compacted away and as many
                                new ones, 4 of the 40 tables rewritten, the
                                state file's in-place rewrites, 32 MiB
                                appended to the log
  bench-data.py churn DIR       a node shaped unlike the others: 2,500 LSM
                                files of 16-128 KiB, 24 tables of 4 MiB, a
                                2 GiB sparse state file holding 256 MiB in
                                extents of 1-4 MiB, a 128 MiB log
  bench-data.py churn-change DIR scattered in-place rewrites of 4 KiB to
                                1 MiB (60 of them, 4 KiB aligned) in the
                                state file, 10% of the LSM files compacted
                                away and as many new ones, 16 MiB appended
                                to the log
  bench-data.py meta DIR [N]    a metadata-heavy tree (a Solana accounts
                                directory): N files (100,000) of 0.5-8 KiB in
                                200 directories
  bench-data.py meta-change DIR one file rewritten
  bench-data.py meta-week DIR   a week of accounts: 10% of the files
                                rewritten
  bench-data.py tiny DIR [N]    N files (1,000,000) of 16-256 bytes in 1,000
                                directories: memory against the file count
  bench-data.py chunk DIR       the chunk benchmark's dataset: a 2 GiB sparse
                                file with 512 MiB of data in 4 MiB extents,
                                200 files of 4 MiB of compressible data, a
                                512 MiB append-only file
  bench-data.py chunk-change DIR 20 rewrites of 256 KiB in place, 16 MiB
                                appended, 5 new 4 MiB files
  bench-data.py state DIR       a state database as MDBX or LMDB keep it:
                                a 3.1 GiB sparse file holding 1.6 GiB of
                                pages in 1 MiB extents (half random, half
                                compressible), beside 200 MiB of other
                                files: 3.5 GB apparent, 1.9 GB real
  bench-data.py state-change DIR 400 pages of 16 KiB rewritten in place,
                                8 MiB appended to the log

Random bytes come from a seeded generator, compressible ones repeat a line,
so btm and restic see exactly the same bytes in every run.
"""
import os
import random
import sys

MIB = 1 << 20


def rnd(r, n):
    # randbytes is limited to ints of 2^31 bits: build big buffers in parts.
    return b"".join(r.randbytes(min(MIB, n - i)) for i in range(0, n, MIB))


def compressible(r, n, tag):
    line = (r.randbytes(48).hex() + " %d\n" % tag).encode()
    return (line * (n // len(line) + 1))[:n]


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_at(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def sst(r, path, lo_kib, hi_kib, tag):
    # An LSM table: half random, half compressible.
    size = r.randint(lo_kib, hi_kib) * 1024
    write(path, rnd(r, size // 2) + compressible(r, size - size // 2, tag))


def sparse(path, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def lsm(d, r, files, lo_kib, hi_kib, tables):
    # A node's LSM tree (db/) and its 4 MiB tables (tables/).
    for i in range(files):
        sst(r, f"{d}/db/{i:06d}.sst", lo_kib, hi_kib, i)
    for i in range(tables):
        write(f"{d}/tables/{i:03d}.tbl", compressible(r, 4 * MIB, i))


def node(d):
    r = random.Random(1)
    lsm(d, r, 1200, 64, 512, 40)
    state = f"{d}/state/state.db"
    sparse(state, 1024 * MIB)
    for i in range(32):
        write_at(state, ((i * 37) % 256) * 4 * MIB, rnd(r, 4 * MIB))
    write(f"{d}/blocks/blocks.log", rnd(r, 256 * MIB))


def rewrite_state(d, state, r):
    # In-place page rewrites inside the data extents, 4 KiB aligned.
    extents = sorted(((i * 37) % 256) * 4 * MIB for i in range(32))
    for _ in range(20):
        base = r.choice(extents)
        off = base + r.randrange(0, (4 * MIB - 256 * 1024) // 4096) * 4096
        write_at(state, off, rnd(r, 256 * 1024))


def node_change(d):
    r = random.Random(2)
    rewrite_state(d, f"{d}/state/state.db", r)
    with open(f"{d}/blocks/blocks.log", "ab") as f:
        f.write(rnd(r, 16 * MIB))
    for i in range(5):
        write(f"{d}/tables/new{i}.tbl", rnd(r, 4 * MIB))


def node_week(d):
    r = random.Random(5)
    rewrite_state(d, f"{d}/state/state.db", r)
    with open(f"{d}/blocks/blocks.log", "ab") as f:
        f.write(rnd(r, 32 * MIB))
    for i in range(0, 1200, 10):
        os.remove(f"{d}/db/{i:06d}.sst")
        sst(r, f"{d}/db/{1200 + i:06d}.sst", 64, 512, i)
    for i in range(0, 40, 10):
        write(f"{d}/tables/{i:03d}.tbl", compressible(r, 4 * MIB, 1000 + i))


CHURN_STATE = 2048 * MIB


def churn_extents():
    # 64 extents of 1-4 MiB spread over the file (fixed, so the change
    # knows where the data is).
    r = random.Random(11)
    return [(i * 32 * MIB, r.randint(1, 4) * MIB) for i in range(64)]


def churn(d):
    r = random.Random(10)
    lsm(d, r, 2500, 16, 128, 24)
    state = f"{d}/state/state.db"
    sparse(state, CHURN_STATE)
    for off, size in churn_extents():
        write_at(state, off, rnd(r, size))
    write(f"{d}/log/wal.log", rnd(r, 128 * MIB))


def churn_change(d):
    r = random.Random(12)
    state = f"{d}/state/state.db"
    extents = churn_extents()
    for _ in range(60):
        base, size = r.choice(extents)
        n = min(r.choice([4096, 16384, 65536, 262144, MIB]), size)
        off = base + r.randrange(0, (size - n) // 4096 + 1) * 4096
        write_at(state, off, rnd(r, n))
    for i in range(0, 2500, 10):
        os.remove(f"{d}/db/{i + 3:06d}.sst")
        sst(r, f"{d}/db/{2500 + i:06d}.sst", 16, 128, i)
    with open(f"{d}/log/wal.log", "ab") as f:
        f.write(rnd(r, 16 * MIB))


def meta_week(d):
    r = random.Random(6)
    for sub in sorted(os.listdir(f"{d}/accounts")):
        for name in sorted(os.listdir(f"{d}/accounts/{sub}")):
            if int(name) % 10 == 3:
                size = r.randint(512, 8192)
                write(f"{d}/accounts/{sub}/{name}", rnd(r, size // 2) + compressible(r, size - size // 2, int(name)))


def meta(d, n):
    r = random.Random(3)
    for i in range(n):
        size = r.randint(512, 8192)
        write(f"{d}/accounts/{i % 200:03d}/{i:07d}", rnd(r, size // 2) + compressible(r, size - size // 2, i))


def tiny(d, n):
    r = random.Random(7)
    for i in range(n):
        write(f"{d}/t/{i % 1000:03d}/{i:07d}", r.randbytes(r.randint(16, 256)))


def sixty(d, n):
    """Issue 37's million-file shape: 1,000 directories of 1,000 files of
    about 60 bytes (40 to 80), each a chunk of its own."""
    r = random.Random(8)
    for i in range(n):
        write(f"{d}/s/{i // 1000:03d}/{i:07d}", r.randbytes(r.randint(40, 80)))


def meta_change(d):
    r = random.Random(4)
    write(f"{d}/accounts/007/0000007", rnd(r, 4096))


def chunk(d):
    r = random.Random(5)
    state = f"{d}/state.db"
    os.makedirs(d, exist_ok=True)
    with open(state, "wb") as f:
        f.truncate(2048 * MIB)
    for i in range(128):
        write_at(state, ((i * 37) % 128) * 16 * MIB, rnd(r, 4 * MIB))
    for i in range(200):
        write(f"{d}/files/f{i}", compressible(r, 4 * MIB, i))
    write(f"{d}/blocks.log", rnd(r, 512 * MIB))


def chunk_change(d):
    r = random.Random(6)
    state = f"{d}/state.db"
    slots = sorted(((i * 37) % 128) * 16 * MIB for i in range(128))
    for _ in range(20):
        base = r.choice(slots)
        off = base + r.randrange(0, (4 * MIB - 256 * 1024) // 4096) * 4096
        write_at(state, off, rnd(r, 256 * 1024))
    with open(f"{d}/blocks.log", "ab") as f:
        f.write(rnd(r, 16 * MIB))
    for i in range(5):
        write(f"{d}/files/new{i}", rnd(r, 4 * MIB))


STATE_MIB = 3200
STATE_EXTENTS = 1600


def state_extent(i):
    # 37 is coprime with 3200: the extents land all over the file.
    return ((i * 37) % STATE_MIB) * MIB


def state(d):
    r = random.Random(8)
    db = f"{d}/db/mdbx.dat"
    os.makedirs(os.path.dirname(db), exist_ok=True)
    with open(db, "wb") as f:
        f.truncate(STATE_MIB * MIB)
        for i in range(STATE_EXTENTS):
            f.seek(state_extent(i))
            f.write(rnd(r, MIB // 2) + compressible(r, MIB // 2, i))
    for i in range(19):
        write(f"{d}/snapshots/s{i:02d}", rnd(r, 10 * MIB))
    write(f"{d}/log/wal", rnd(r, 10 * MIB))


def state_change(d):
    r = random.Random(9)
    db = f"{d}/db/mdbx.dat"
    for _ in range(400):
        off = state_extent(r.randrange(STATE_EXTENTS)) + r.randrange(0, MIB // 16384) * 16384
        write_at(db, off, rnd(r, 16384))
    with open(f"{d}/log/wal", "ab") as f:
        f.write(rnd(r, 8 * MIB))


def main():
    what, d = sys.argv[1], sys.argv[2]
    if what == "node":
        node(d)
    elif what == "node-change":
        node_change(d)
    elif what == "node-week":
        node_week(d)
    elif what == "meta-week":
        meta_week(d)
    elif what == "churn":
        churn(d)
    elif what == "churn-change":
        churn_change(d)
    elif what == "meta":
        meta(d, int(sys.argv[3]) if len(sys.argv) > 3 else 100_000)
    elif what == "tiny":
        tiny(d, int(sys.argv[3]) if len(sys.argv) > 3 else 1_000_000)
    elif what == "sixty":
        sixty(d, int(sys.argv[3]) if len(sys.argv) > 3 else 1_000_000)
    elif what == "meta-change":
        meta_change(d)
    elif what == "chunk":
        chunk(d)
    elif what == "chunk-change":
        chunk_change(d)
    elif what == "state":
        state(d)
    elif what == "state-change":
        state_change(d)
    else:
        sys.exit(f"unknown dataset {what}")


if __name__ == "__main__":
    main()
