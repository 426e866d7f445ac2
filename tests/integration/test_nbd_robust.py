"""Misbehaving NBD clients on raw sockets.  Each case ends by checking that
the server still serves a well-behaved client and never lost acknowledged
data."""
import os
import socket
import struct
import threading
import time

import pytest

from nbd_util import NbdServe, RawClient, check_serves
import nbd_util as U

MiB = 1 << 20


@pytest.fixture
def img(tmp_path):
    p = str(tmp_path / "disk.raw")
    with open(p, "wb") as f:
        f.truncate(4 * MiB)
        f.write(b"\x5c" * 4096)
    return p


@pytest.fixture
def srv(img):
    s = NbdServe(img, writable=True, env={"LAMINA_NBD_HANDSHAKE_TIMEOUT_MS": "1500",
                                          "LAMINA_NBD_SEND_TIMEOUT_MS": "1500"})
    yield s
    assert s.alive()
    check_serves(s)
    s.close()


def transmission(srv, structured=True):
    c = RawClient(srv)
    if structured:
        c.structured_reply()
    c.go("exp")
    return c


def err_of(c, cookie):
    ch = c.chunks()
    assert ch[-1][2] == cookie
    if ch[0][1] == -1:
        return struct.unpack(">I", ch[0][3])[0]
    assert ch[0][1] & 0x8000, ch
    return struct.unpack(">I", ch[0][3][:4])[0]


def test_bad_handshake_magic(srv):
    c = RawClient(srv)
    c.s.sendall(struct.pack(">QII", 0x1122334455667788, U.OPT_GO, 0))
    assert c.is_closed()


def test_unknown_client_flags_dropped(srv):
    c = RawClient(srv, handshake=False)
    c.recvn(18)
    c.s.sendall(struct.pack(">I", 0x80))
    assert c.is_closed()


def test_unknown_option_unsup_then_go(srv):
    c = RawClient(srv)
    c.opt(77, b"garbage")
    _, typ, _ = c.reply()
    assert typ == U.REP_ERR_UNSUP
    c.opt(U.OPT_STARTTLS)
    assert c.reply()[1] == U.REP_ERR_POLICY
    c.opt(U.OPT_LIST, b"x")
    assert c.reply()[1] == U.REP_ERR_INVALID
    c.go("exp")
    c.request(U.CMD_READ, 0, 4096, cookie=5)
    err, cookie, data = c.simple_reply(4096)
    assert (err, cookie, data) == (0, 5, b"\x5c" * 4096)
    c.request(U.CMD_DISC)
    assert c.is_closed()


def test_malformed_go_payloads(srv):
    c = RawClient(srv)
    bad = [b"", b"\0\0\0\x10ab", struct.pack(">I", 3) + b"exp" + struct.pack(">H", 5),
           struct.pack(">I", 0xFFFFFFFF) + b"\0\0"]
    for payload in bad:
        c.opt(U.OPT_GO, payload)
        reps = c.replies()
        assert reps[-1][1] == U.REP_ERR_INVALID, reps
    # meta context with query length beyond the option
    c.structured_reply()
    data = struct.pack(">I", 3) + b"exp" + struct.pack(">II", 1, 1000) + b"base:"
    c.opt(U.OPT_SET_META, data)
    assert c.replies()[-1][1] == U.REP_ERR_INVALID
    c.go("exp")
    c.close()


def test_huge_option_length(srv):
    c = RawClient(srv)
    c.s.sendall(struct.pack(">QII", U.OPTS_MAGIC, U.OPT_GO, 0xFFFFFFF0))
    assert c.is_closed()
    c = RawClient(srv)
    c.opt(U.OPT_INFO, b"\0" * (200 * 1024))
    assert c.reply()[1] == U.REP_ERR_TOO_BIG
    c.opt(U.OPT_ABORT)
    assert c.reply()[1] == U.REP_ACK


def test_bad_request_magic(srv):
    c = transmission(srv)
    c.s.sendall(b"\xde\xad\xbe\xef" + b"\0" * 24)
    assert c.is_closed()


def test_oversized_write_payload_disconnects(srv):
    c = transmission(srv)
    try:
        c.request(U.CMD_WRITE, 0, 64 * MiB, cookie=1)
        c.s.sendall(b"\0" * 65536)
    except OSError:
        pass  # already dropped
    assert c.is_closed()


def test_oversized_read_is_einval(srv):
    c = transmission(srv)
    c.request(U.CMD_READ, 0, 33 * MiB, cookie=2)
    assert err_of(c, 2) == U.EINVAL
    c.request(U.CMD_READ, 0, 0xFFFFFFFF, cookie=3)
    assert err_of(c, 3) == U.EINVAL
    c.request(U.CMD_READ, 0, 4096, cookie=4)
    ch = c.chunks()
    assert ch[0][1] == 1 and ch[0][3][8:] == b"\x5c" * 4096


def test_requests_beyond_end(srv):
    c = transmission(srv, structured=False)
    c.request(U.CMD_READ, 4 * MiB, 512, cookie=1)
    assert c.simple_reply()[0] == U.EINVAL
    c.request(U.CMD_WRITE, 4 * MiB - 256, 512, cookie=2, data=b"\1" * 512)
    assert c.simple_reply()[0] == U.ENOSPC
    c.request(U.CMD_WRITE_ZEROES, 2 ** 64 - 512, 1024, cookie=3)
    assert c.simple_reply()[0] == U.ENOSPC
    c.request(U.CMD_TRIM, 2 ** 63, 1, cookie=4)
    assert c.simple_reply()[0] == U.EINVAL
    c.request(U.CMD_READ, 0, 512, cookie=5)
    assert c.simple_reply(512)[2] == b"\x5c" * 512


def test_unknown_command_and_flags(srv):
    c = transmission(srv, structured=False)
    c.request(42, 0, 512, cookie=1)
    assert c.simple_reply()[0] == U.EINVAL
    c.request(U.CMD_READ, 0, 512, flags=1 << 9, cookie=2)
    assert c.simple_reply()[0] == U.EINVAL
    c.request(U.CMD_READ, 0, 512, flags=4, cookie=3)  # DF without structured
    assert c.simple_reply()[0] == U.EINVAL
    c.request(U.CMD_WRITE, 0, 4, flags=1 << 4, cookie=4, data=b"abcd")
    assert c.simple_reply()[0] == U.EINVAL
    c.request(U.CMD_FLUSH, cookie=5)
    assert c.simple_reply()[0] == 0


def test_write_on_read_only_export(img):
    with NbdServe(img, writable=False) as srv:
        c = transmission(srv, structured=False)
        c.request(U.CMD_WRITE, 0, 4096, cookie=1, data=b"\xee" * 4096)
        assert c.simple_reply()[0] == U.EPERM
        c.request(U.CMD_TRIM, 0, 4096, cookie=2)
        assert c.simple_reply()[0] == U.EPERM
        c.request(U.CMD_WRITE_ZEROES, 0, 4096, cookie=3)
        assert c.simple_reply()[0] == U.EPERM
        c.request(U.CMD_READ, 0, 4096, cookie=4)
        assert c.simple_reply(4096)[2] == b"\x5c" * 4096
        check_serves(srv)
    with open(img, "rb") as f:
        assert f.read(4096) == b"\x5c" * 4096


def test_truncated_packets(srv):
    # truncated request header
    c = transmission(srv)
    c.s.sendall(struct.pack(">IHH", U.REQ_MAGIC, 0, U.CMD_READ))
    c.s.shutdown(socket.SHUT_WR)
    assert c.is_closed()
    # truncated write payload
    c = transmission(srv)
    c.request(U.CMD_WRITE, 0, 8192, cookie=1, data=b"\1" * 100)
    c.s.shutdown(socket.SHUT_WR)
    assert c.is_closed()
    # truncated option
    c = RawClient(srv)
    c.s.sendall(struct.pack(">QII", U.OPTS_MAGIC, U.OPT_GO, 100) + b"\0\0")
    c.s.shutdown(socket.SHUT_WR)
    assert c.is_closed()
    assert check_serves(srv) == b"\x5c" * 4096  # partial write never applied


def test_disconnect_mid_request_keeps_acked_data(srv):
    c = transmission(srv, structured=False)
    c.request(U.CMD_WRITE, 65536, 4096, cookie=1, data=b"\x77" * 4096)
    assert c.simple_reply() == (0, 1, b"")
    # many requests in flight, then vanish without reading replies
    c.s.setblocking(False)
    reqs = b"".join(struct.pack(">IHHQQI", U.REQ_MAGIC, 0, U.CMD_READ, 100 + i,
                                0, 1 * MiB) for i in range(200))
    try:
        c.s.send(reqs)
    except BlockingIOError:
        pass
    time.sleep(0.1)
    c.s.close()
    time.sleep(0.2)
    assert check_serves(srv, 65536) == b"\x77" * 4096


def test_slowloris_handshake_is_dropped(srv):
    c = RawClient(srv, handshake=False)
    c.recvn(18)
    c.s.sendall(b"\0")  # one byte of the client flags, then nothing
    other = check_serves(srv)  # others are served meanwhile
    assert other == b"\x5c" * 4096
    assert c.is_closed(timeout=8)


def test_many_connections_in_handshake_do_not_block(srv):
    socks = [RawClient(srv, handshake=False) for _ in range(20)]
    check_serves(srv)
    for s in socks:
        s.close()


def test_client_not_reading_replies(srv):
    """A client that floods reads and never reads replies must not wedge
    the server for others (bounded in-flight; replies block only it)."""
    c = transmission(srv)
    c.s.setblocking(False)
    req = struct.pack(">IHHQQI", U.REQ_MAGIC, 0, U.CMD_READ, 1, 0, 1 * MiB)
    sent = 0
    end = time.time() + 2
    while time.time() < end:
        try:
            sent += c.s.send(req * 64)
        except BlockingIOError:
            time.sleep(0.05)
        except OSError:
            break  # already dropped for not reading
    check_serves(srv)
    # it is dropped once its replies stall for the send timeout.  Watch for
    # the hang-up without reading: reading replies would un-stall the server
    # and the drop might then never come.
    assert peer_hung_up(c.s, timeout=15)
    check_serves(srv)


def peer_hung_up(sock, timeout):
    import select
    p = select.poll()
    p.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    end = time.time() + timeout
    while time.time() < end:
        for _, ev in p.poll(max(0, end - time.time()) * 1000):
            if ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                return True
    return False


def test_several_clients_not_reading_replies(srv):
    cs = []
    for _ in range(6):
        c = transmission(srv)
        c.s.setblocking(False)
        req = struct.pack(">IHHQQI", U.REQ_MAGIC, 0, U.CMD_READ, 1, 0, 1 * MiB)
        try:
            for _ in range(200):
                c.s.send(req * 16)
        except (BlockingIOError, OSError):
            pass
        cs.append(c)
    check_serves(srv)
    for c in cs:
        c.s.close()


def test_garbage_fuzz_connections(srv):
    rnd = os.urandom(4096)
    for i in range(30):
        c = RawClient(srv, handshake=(i % 2 == 0))
        try:
            c.s.sendall(rnd[i * 100:i * 100 + 100 + i * 50])
        except OSError:
            pass
        c.close()
    check_serves(srv)


def test_concurrent_raw_clients_threads(srv):
    errs = []

    def worker(k):
        try:
            c = transmission(srv, structured=False)
            for i in range(50):
                off = 1 * MiB + (k * 50 + i) * 4096
                c.request(U.CMD_WRITE, off, 4096, cookie=i, data=bytes([k]) * 4096)
                assert c.simple_reply()[0] == 0
            c.request(U.CMD_DISC)
            c.close()
        except Exception as e:  # collected and asserted below
            errs.append(e)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs
    c = transmission(srv, structured=False)
    for k in range(4):
        c.request(U.CMD_READ, 1 * MiB + k * 50 * 4096, 50 * 4096, cookie=k)
        assert c.simple_reply(50 * 4096)[2] == bytes([k]) * 50 * 4096


def rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def test_memory_bounded_under_big_write_flood(tmp_path):
    """Clients pushing 32 MiB writes without reading replies: the server
    buffers at most its per-connection budget, not everything sent."""
    img = str(tmp_path / "big.raw")
    with open(img, "wb") as f:
        f.truncate(512 * MiB)
    srv = NbdServe(img, writable=True)
    if srv.kind != "laminad":
        srv.close()
        pytest.skip("needs laminad")
    with srv:
        pid = srv.d.proc.pid
        before = rss_mib(pid)
        payload = b"\x11" * (32 * MiB)
        clients = []
        for k in range(2):
            c = transmission(srv)
            c.s.setblocking(False)
            data = b"".join(struct.pack(">IHHQQI", U.REQ_MAGIC, 0, U.CMD_WRITE, i,
                                        (i % 16) * 32 * MiB, 32 * MiB) + payload
                            for i in range(8))
            view = memoryview(data)
            end = time.time() + 2
            while view and time.time() < end:
                try:
                    view = view[c.s.send(view):]
                except BlockingIOError:
                    time.sleep(0.01)
            clients.append(c)
        peak = rss_mib(pid) - before
        for c in clients:
            c.s.close()
        # per connection: 64 MiB budget + one 32 MiB payload being read
        # + cached slot buffers, well below the 256 MiB each one offers
        assert peak < 2 * 128, peak
        time.sleep(0.5)
        check_serves(srv)
