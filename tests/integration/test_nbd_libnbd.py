"""NBD protocol features through libnbd (python nbd): handshake options,
structured reads, block status, FUA, trim, zero, cache, errors."""
import os
import struct

import nbd
import pytest

from conftest import run
from nbd_util import NbdServe, RawClient, check_serves
import nbd_util as U

MiB = 1 << 20


@pytest.fixture
def img(tmp_path):
    p = str(tmp_path / "disk.raw")
    with open(p, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(0)
        f.write(b"\xaa" * MiB)
        f.seek(8 * MiB)
        f.write(b"\xbb" * 256 * 1024)
    return p


def connect(srv, **kw):
    h = nbd.NBD()
    for ctx in kw.get("meta", ["base:allocation"]):
        h.add_meta_context(ctx)
    if kw.get("no_structured"):
        h.set_request_structured_replies(False)
    h.set_full_info(True)
    h.connect_uri(srv.uri)
    return h


def test_handshake_info(img):
    with NbdServe(img, writable=True, description="desc x") as srv:
        h = connect(srv)
        assert h.get_size() == 16 * MiB
        assert h.get_structured_replies_negotiated()
        assert h.can_meta_context("base:allocation")
        assert h.get_export_description() == "desc x"
        assert h.get_canonical_export_name() == "exp"
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
        assert not h.is_read_only()
        h.shutdown()


def test_unknown_export_is_refused(img):
    with NbdServe(img) as srv:
        h = nbd.NBD()
        with pytest.raises(nbd.Error):
            h.connect_uri(srv.uri.replace("/exp", "/nope"))
        check_serves(srv)


def test_opt_mode_list_info_abort(img):
    with NbdServe(img, description="d1") as srv:
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_uri(srv.uri)
        names = []
        h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
        assert names == [("exp", "d1")]
        h.set_export_name("exp")
        h.opt_info()
        assert h.get_size() == 16 * MiB
        ctx = []
        h.opt_list_meta_context(lambda c: ctx.append(c) or 0)
        assert ctx == ["base:allocation"]
        h.set_export_name("nope")
        with pytest.raises(nbd.Error):
            h.opt_info()
        h.opt_abort()


def test_allocation_depth_context_offered_only_when_enabled(img):
    for enabled in (False, True):
        with NbdServe(img, allocation_depth=enabled) as srv:
            h = nbd.NBD()
            h.set_opt_mode(True)
            h.connect_uri(srv.uri)
            ctx = []
            h.opt_list_meta_context(lambda c: ctx.append(c) or 0)
            assert ("qemu:allocation-depth" in ctx) == enabled
            h.opt_abort()


def test_structured_read_holes_and_data(img):
    with NbdServe(img) as srv:
        h = connect(srv)
        chunks = []

        def cb(buf, offset, status, err):
            chunks.append((offset, len(buf), status))
            return 0

        data = h.pread_structured(4 * MiB, 6 * MiB, cb)
        assert data[:2 * MiB] == b"\xaa" * 0 + b"\0" * 2 * MiB
        assert data[2 * MiB:2 * MiB + 256 * 1024] == b"\xbb" * 256 * 1024
        assert data[2 * MiB + 256 * 1024:] == bytes(4 * MiB - 2 * MiB - 256 * 1024)
        holes = [c for c in chunks if c[2] == nbd.READ_HOLE]
        datas = [c for c in chunks if c[2] == nbd.READ_DATA]
        assert holes and datas
        assert sum(c[1] for c in chunks) == 4 * MiB
        # DF: exactly one content chunk
        chunks.clear()
        data2 = h.pread_structured(1 * MiB, 7 * MiB + 512 * 1024, cb, nbd.CMD_FLAG_DF)
        assert len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA
        assert data2[MiB // 2:MiB // 2 + 256 * 1024] == b"\xbb" * 256 * 1024
        h.shutdown()


def test_simple_replies(img):
    with NbdServe(img, writable=True) as srv:
        h = connect(srv, no_structured=True, meta=[])
        assert not h.get_structured_replies_negotiated()
        assert h.pread(4096, 0) == b"\xaa" * 4096
        h.pwrite(b"\x01" * 8192, 4096)
        assert h.pread(8192, 4096) == b"\x01" * 8192
        assert h.pread(4096, 12 * MiB) == bytes(4096)
        assert not h.can_df()
        h.shutdown()


def extents(h, length, offset, ctx="base:allocation", flags=0):
    out = []

    def cb(metacontext, off, entries, err):
        if metacontext == ctx:
            out.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(length, offset, cb, flags)
    return out


def test_block_status(img):
    with NbdServe(img) as srv:
        h = connect(srv)
        ex = extents(h, 16 * MiB, 0)
        assert ex[0] == (MiB, 0)
        assert ex[1][1] == nbd.STATE_HOLE | nbd.STATE_ZERO
        pos = 0
        for ln, fl in ex:
            if fl == 0:
                assert pos in (0, 8 * MiB)
            pos += ln
        assert pos == 16 * MiB
        one = extents(h, 4 * MiB, 0, flags=nbd.CMD_FLAG_REQ_ONE)
        assert one == [(MiB, 0)]
        one = extents(h, 4096, 512, flags=nbd.CMD_FLAG_REQ_ONE)
        assert one == [(4096, 0)]
        h.shutdown()


def test_write_fua_flush_trim_zero_cache(img):
    with NbdServe(img, writable=True) as srv:
        h = connect(srv)
        h.pwrite(b"\x42" * 65536, 2 * MiB, nbd.CMD_FLAG_FUA)
        h.flush()
        assert h.pread(65536, 2 * MiB) == b"\x42" * 65536
        h.zero(65536, 0)
        assert h.pread(65536, 0) == bytes(65536)
        h.zero(4096, 65536, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
        assert h.pread(4096, 65536) == bytes(4096)
        try:
            h.zero(MiB, 3 * MiB, nbd.CMD_FLAG_FAST_ZERO)
            assert h.pread(MiB, 3 * MiB) == bytes(MiB)
        except nbd.Error as e:
            assert e.errno == "ENOTSUP"
        h.trim(MiB, 4 * MiB)
        h.trim(4096, 4 * MiB, nbd.CMD_FLAG_FUA)
        h.cache(MiB, 0)
        h.flush()
        h.shutdown()
    with open(img, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(65536) == b"\x42" * 65536
        f.seek(0)
        assert f.read(65536 + 4096) == bytes(65536 + 4096)


def test_read_only_export_errors(img):
    with NbdServe(img, writable=False) as srv:
        h = connect(srv)
        assert h.is_read_only()
        h.set_strict_mode(0)
        for fn in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(512, 0),
                   lambda: h.zero(512, 0)):
            with pytest.raises(nbd.Error) as e:
                fn()
            assert e.value.errno == "EPERM"
        assert h.pread(512, 0) == b"\xaa" * 512
        h.shutdown()
    with open(img, "rb") as f:
        assert f.read(512) == b"\xaa" * 512


def test_out_of_range_errors(img):
    with NbdServe(img, writable=True) as srv:
        h = connect(srv)
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error) as e:
            h.pread(4096, 16 * MiB - 2048)
        assert e.value.errno == "EINVAL"
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"x" * 4096, 16 * MiB)
        assert e.value.errno == "ENOSPC"
        with pytest.raises(nbd.Error) as e:
            h.zero(4096, 2 ** 63)
        assert e.value.errno == "ENOSPC"
        with pytest.raises(nbd.Error) as e:
            h.trim(4096, 16 * MiB)
        assert e.value.errno == "EINVAL"
        with pytest.raises(nbd.Error) as e:
            h.cache(4096, 16 * MiB)
        assert e.value.errno == "EINVAL"
        assert h.pread(4096, 0) == b"\xaa" * 4096
        h.shutdown()


def test_block_status_without_context_is_einval(img):
    with NbdServe(img) as srv:
        c = RawClient(srv)
        c.structured_reply()
        c.go("exp")
        c.request(U.CMD_BLOCK_STATUS, 0, 4096, cookie=9)
        ch = c.chunks()
        assert ch[-1][2] == 9
        assert ch[0][1] == 0x8001
        assert struct.unpack(">I", ch[0][3][:4])[0] == U.EINVAL
        c.request(U.CMD_DISC)
        c.close()


def test_meta_context_reset_by_other_export_name(img):
    with NbdServe(img) as srv:
        c = RawClient(srv)
        c.structured_reply()
        reps = c.set_meta("exp", ["base:allocation"])
        assert [r[1] for r in reps] == [U.REP_META, U.REP_ACK]
        reps = c.set_meta("nope", ["base:allocation"])
        assert reps[-1][1] == U.REP_ERR_UNKNOWN
        c.go("exp")
        c.request(U.CMD_BLOCK_STATUS, 0, 4096, cookie=3)
        ch = c.chunks()
        assert ch[0][1] == 0x8001  # the failed SET cleared the selection
        c.close()


def test_writethrough_export(img):
    with NbdServe(img, writable=True, writethrough=True) as srv:
        h = connect(srv)
        h.pwrite(b"\x07" * 4096, 0)
        h.shutdown()
    with open(img, "rb") as f:
        assert f.read(4096) == b"\x07" * 4096


def test_many_in_flight_requests(img):
    with NbdServe(img, writable=True) as srv:
        h = connect(srv)
        bufs = []
        cookies = []
        for i in range(64):
            b = nbd.Buffer.from_bytearray(bytearray([i]) * 65536)
            bufs.append(b)
            cookies.append(h.aio_pwrite(b, i * 65536))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            assert h.aio_command_completed(c)
        rd = [nbd.Buffer(65536) for _ in range(64)]
        cookies = [h.aio_pread(rd[i], i * 65536) for i in range(64)]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for i in range(64):
            assert h.aio_command_completed(cookies[i])
            assert rd[i].to_bytearray() == bytearray([i]) * 65536
        h.shutdown()


def test_export_name_option_with_and_without_zeroes(img):
    with NbdServe(img) as srv:
        for cflags, pad in ((1, 124), (3, 0)):
            c = RawClient(srv, handshake=False)
            c.greet(cflags)
            c.opt(U.OPT_EXPORT_NAME, b"exp")
            size, tflags = struct.unpack(">QH", c.recvn(10))
            assert size == 16 * MiB and tflags & 1 and tflags & 2  # read-only
            if pad:
                assert c.recvn(pad) == bytes(pad)
            c.request(U.CMD_READ, 0, 8, cookie=7)
            assert c.simple_reply(8) == (0, 7, b"\xaa" * 8)
            c.request(U.CMD_DISC)
            assert c.is_closed()
        c = RawClient(srv)
        c.opt(U.OPT_EXPORT_NAME, b"missing")
        assert c.is_closed()


def test_info_name_description_block_size(img):
    with NbdServe(img, description="hello") as srv:
        c = RawClient(srv)
        c.opt(U.OPT_INFO, struct.pack(">I", 3) + b"exp" + struct.pack(">HHHH", 3, 1, 2, 3))
        reps = c.replies()
        assert reps[-1][1] == U.REP_ACK
        infos = {struct.unpack(">H", p[:2])[0]: p[2:] for _, t, p in reps if t == U.REP_INFO}
        assert infos[1] == b"exp"
        assert infos[2] == b"hello"
        assert struct.unpack(">III", infos[3]) == (1, 4096, 32 * MiB)
        size, tflags = struct.unpack(">QH", infos[0])
        assert size == 16 * MiB
        assert not tflags & (1 << 7)  # no DF without structured replies
        c.structured_reply()
        c.opt(U.OPT_INFO, struct.pack(">I", 3) + b"exp\0\0")
        infos = {struct.unpack(">H", p[:2])[0]: p[2:] for _, t, p in c.replies()
                 if t == U.REP_INFO}
        assert struct.unpack(">QH", infos[0])[1] & (1 << 7)
        assert 1 not in infos and 2 not in infos  # not asked for


def test_list_meta_context_queries(img):
    with NbdServe(img, allocation_depth=True) as srv:
        c = RawClient(srv)
        c.structured_reply()

        def lst(queries):
            data = struct.pack(">I", 3) + b"exp" + struct.pack(">I", len(queries))
            for q in queries:
                data += struct.pack(">I", len(q)) + q.encode()
            c.opt(U.OPT_LIST_META, data)
            reps = c.replies()
            assert reps[-1][1] == U.REP_ACK
            return sorted(p[4:].decode() for _, t, p in reps if t == U.REP_META)

        both = ["base:allocation", "qemu:allocation-depth"]
        assert lst([]) == both
        assert lst(["base:"]) == ["base:allocation"]
        assert lst(["qemu:"]) == ["qemu:allocation-depth"]
        assert lst(["x-foo:bar", "base:nope"]) == []
        reps = c.set_meta("exp", ["base:allocation", "qemu:allocation-depth", "base:"])
        ids = {p[4:].decode(): struct.unpack(">I", p[:4])[0] for _, t, p in reps
               if t == U.REP_META}
        assert sorted(ids) == both and len(set(ids.values())) == 2
        c.go("exp")
        c.request(U.CMD_BLOCK_STATUS, 0, 2 * MiB, cookie=11)
        ch = c.chunks()
        assert len(ch) == 2 and all(x[1] == 5 for x in ch)
        by_id = {struct.unpack(">I", x[3][:4])[0]: x[3][4:] for x in ch}
        depth = by_id[ids["qemu:allocation-depth"]]
        ext = [struct.unpack(">II", depth[i:i + 8]) for i in range(0, len(depth), 8)]
        assert sum(e[0] for e in ext) == 2 * MiB
        assert all(e[1] == 1 for e in ext)  # raw file: everything is local
        alloc = by_id[ids["base:allocation"]]
        ext = [struct.unpack(">II", alloc[i:i + 8]) for i in range(0, len(alloc), 8)]
        assert ext[0] == (MiB, 0) and ext[1] == (MiB, 3)


def test_set_meta_context_requires_structured(img):
    with NbdServe(img) as srv:
        c = RawClient(srv)
        reps = c.set_meta("exp", ["base:allocation"])
        assert reps[-1][1] == U.REP_ERR_INVALID
        c.opt(U.OPT_ABORT)
        assert c.reply()[1] == U.REP_ACK
        assert c.is_closed()
