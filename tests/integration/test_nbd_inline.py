"""Requests served by the NBD connection thread itself (page-cache hits,
LAM_REQ_NOWAIT) and their fallback to the workers: a qcow2 image with
normal, zero, compressed and unallocated clusters over a backing file is
read through the export with many requests in flight, with its files
evicted from the page cache (every read first misses) and again cached;
then random pipelined writes.  QEMU's qemu-img is the oracle for the
content."""
import json
import os
import random

import nbd
import pytest

from conftest import run
from nbd_util import NbdServe

MiB = 1 << 20
CS = 64 * 1024
SIZE = 16 * MiB


def evict(*paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.fixture
def chain(tmp_path):
    """base.raw <- top.qcow2 with every kind of cluster in top."""
    rnd = random.Random(7)
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(bytes(rnd.getrandbits(8) for _ in range(256)) * (SIZE // 256))
    top = str(tmp_path / "top.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw",
         top, str(SIZE)])
    cmds = []
    for i in range(0, SIZE // CS, 3):
        cmds.append("write -P %d %d %d" % (i % 251, i * CS, CS))
    for i in range(1, SIZE // CS, 7):
        cmds.append("write -z %d %d" % (i * CS, CS))
    for i in range(2, SIZE // CS, 11):
        if i % 3 and i % 7 != 1:  # compressed writes need a free cluster
            cmds.append("write -c -P %d %d %d" % (i % 13 + 1, i * CS, CS))
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    run(args + [top])
    info = json.loads(run(["qemu-img", "check", "--output=json", top]).stdout)
    assert info["compressed-clusters"] > 0
    expect = str(tmp_path / "expect.raw")
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", top, expect])
    with open(expect, "rb") as f:
        data = f.read()
    return top, base, data


def pipelined_reads(h, offsets, length, depth=64):
    """Reads of `length` at every offset with up to `depth` in flight;
    returns {offset: bytes}."""
    bufs = {}
    cookies = {}
    pending = list(offsets)
    while pending or h.aio_in_flight():
        while pending and h.aio_in_flight() < depth:
            off = pending.pop()
            bufs[off] = nbd.Buffer(length)
            cookies[off] = h.aio_pread(bufs[off], off)
        h.poll(-1)
    for off, c in cookies.items():
        assert h.aio_command_completed(c)
    return {off: bytes(b.to_bytearray()) for off, b in bufs.items()}


@pytest.mark.parametrize("structured", [True, False])
def test_reads_miss_then_hit_cache(chain, structured):
    top, base, data = chain
    with NbdServe(top, fmt="qcow2") as srv:
        h = nbd.NBD()
        h.set_request_structured_replies(structured)
        h.connect_uri(srv.uri)
        assert h.get_size() == SIZE
        rnd = random.Random(1)
        for length in (4096, 32768, CS):
            offsets = list(range(0, SIZE, length))
            rnd.shuffle(offsets)
            for cached in (False, True):
                if not cached:
                    evict(top, base)
                got = pipelined_reads(h, offsets, length)
                bad = [o for o in offsets if got[o] != data[o:o + length]]
                assert not bad, "length %d cached %s: wrong data at %s" % (
                    length, cached, bad[:5])
        # Unaligned reads straddling clusters of different kinds.
        for off in (CS - 512, 3 * CS - 100, 7 * CS + 1):
            assert h.pread(CS, off) == data[off:off + CS]
        h.shutdown()


def test_pipelined_writes_and_reads(chain, tmp_path):
    top, base, data = chain
    ref = bytearray(data)
    rnd = random.Random(2)
    with NbdServe(top, fmt="qcow2", writable=True) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        evict(top, base)
        inflight = []  # (cookie, off, length, buffer)

        def reap():
            inflight[:] = [x for x in inflight
                           if not h.aio_command_completed(x[0])]

        for i in range(600):
            # Mostly 4k, some unaligned, some spanning clusters.
            length = rnd.choice([4096, 4096, 4096, 512, 8192, 70000])
            off = rnd.randrange(0, SIZE - length)
            if rnd.random() < 0.7:
                off -= off % 4096
            # Concurrent overlapping writes have no defined order: wait
            # for overlapping ones (and for room) first.
            while len(inflight) >= 48 or any(
                    o < off + length and off < o + n for _, o, n, _ in inflight):
                h.poll(-1)
                reap()
            payload = bytes([rnd.getrandbits(8)]) * length
            ref[off:off + length] = payload
            buf = nbd.Buffer.from_bytearray(bytearray(payload))
            inflight.append((h.aio_pwrite(buf, off), off, length, buf))
        while inflight:
            h.poll(-1)
            reap()
        offsets = list(range(0, SIZE, 4096))
        got = pipelined_reads(h, offsets, 4096)
        bad = [o for o in offsets if got[o] != bytes(ref[o:o + 4096])]
        assert not bad, "wrong data after writes at %s" % bad[:5]
        h.flush()
        h.shutdown()
    out = str(tmp_path / "ref.raw")
    with open(out, "wb") as f:
        f.write(ref)
    run(["qemu-img", "check", "-f", "qcow2", top])
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", top, out])
