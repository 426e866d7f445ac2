"""Export lifecycle: add/del (safe/hard), BLOCK_EXPORT_DELETED, server
stop, max-connections, shutdown with requests in flight."""
import threading
import time

import nbd
import pytest

from conftest import run
from nbd_util import NbdServe, RawClient, check_serves
import nbd_util as U

MiB = 1 << 20


@pytest.fixture
def img(tmp_path):
    p = str(tmp_path / "disk.raw")
    run(["qemu-img", "create", "-f", "raw", p, "32M"])
    return p


def wait_for(pred, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_query_and_duplicate_add(img):
    with NbdServe(img) as srv:
        assert srv.query() == [{"type": "nbd", "id": "exp0", "node-name": "node0",
                                "shutting-down": False}]
        assert srv.add() == "Block export id 'exp0' is already in use"


def test_safe_delete_refused_with_client_then_ok(img):
    with NbdServe(img) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        assert srv.delete() == "export 'exp0' still in use"
        assert h.pread(512, 0) == bytes(512)
        h.shutdown()
        assert wait_for(lambda: srv.delete() is None)
        assert srv.query() == []
        assert ["BLOCK_EXPORT_DELETED", '{"id":"exp0"}'] in srv.events()
        h = nbd.NBD()
        with pytest.raises(nbd.Error):
            h.connect_uri(srv.uri)
        assert srv.add() is None
        check_serves(srv)


def test_hard_delete_disconnects_clients(img):
    with NbdServe(img, writable=True) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        h.pwrite(b"\x31" * 4096, 0)
        assert srv.delete(hard=True) is None
        assert ["BLOCK_EXPORT_DELETED", '{"id":"exp0"}'] in srv.events()
        with pytest.raises(nbd.Error):
            h.pread(512, 0)
        assert srv.delete() == "Export 'exp0' is not found"
    with open(img, "rb") as f:
        assert f.read(4096) == b"\x31" * 4096


def test_handshaking_client_does_not_block_delete(img):
    with NbdServe(img) as srv:
        c = RawClient(srv)  # sits in option haggling, not on the export
        assert srv.delete() is None
        c.opt(U.OPT_GO, b"\0\0\0\3exp\0\0")
        reps = c.replies()
        assert reps[-1][1] == U.REP_ERR_UNKNOWN
        c.close()


def test_server_stop_removes_exports(img):
    with NbdServe(img) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        assert srv.stop_server() is None
        assert ["BLOCK_EXPORT_DELETED", '{"id":"exp0"}'] in srv.events()
        assert srv.query() == []
        assert srv.stop_server() == "NBD server not running"
        assert srv.add() == "NBD server not running"
        with pytest.raises(nbd.Error):
            h.pread(512, 0)


def test_max_connections(img):
    with NbdServe(img, max_conn=2) as srv:
        a, b = nbd.NBD(), nbd.NBD()
        a.connect_uri(srv.uri)
        b.connect_uri(srv.uri)
        c = nbd.NBD()
        with pytest.raises(nbd.Error):
            c.connect_uri(srv.uri)
        a.shutdown()
        time.sleep(0.2)
        c = nbd.NBD()
        c.connect_uri(srv.uri)
        assert c.pread(512, 0) == bytes(512)


def test_shutdown_with_requests_in_flight(img):
    """quit while clients hammer the export: acknowledged writes are on
    disk and the process exits cleanly."""
    srv = NbdServe(img, writable=True)
    acked = {}
    stop = threading.Event()

    def writer(k):
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        i = 0
        try:
            while not stop.is_set():
                off = (k * 4 + (i % 4)) * MiB
                h.pwrite(bytes([i % 250 + 1]) * 65536, off)
                acked[(k, i % 4)] = i
                i += 1
        except nbd.Error:
            pass

    ts = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in ts:
        t.start()
    time.sleep(0.5)
    srv.close()
    stop.set()
    for t in ts:
        t.join(10)
    with open(img, "rb") as f:
        for (k, j), v in acked.items():
            f.seek((k * 4 + j) * MiB)
            got = f.read(65536)
            # the last acked write, or the next one (it may have been in
            # flight when the server went away); never older data
            ok = {bytes([v % 250 + 1]) * 65536, bytes([(v + 4) % 250 + 1]) * 65536}
            assert got in ok, (k, j, got[0], v)


@pytest.mark.parametrize("writable", [False, True])
def test_export_root_permissions_and_node_in_use(img, writable):
    srv = NbdServe(img, writable=writable)
    if srv.kind != "laminad":
        srv.close()
        pytest.skip("needs laminad (QMP)")
    with srv:
        g = srv.qmp.cmd("x-debug-query-block-graph")
        names = {n["id"]: n for n in g["nodes"]}
        edges = [e for e in g["edges"] if names[e["parent"]]["type"] == "block-backend"]
        assert len(edges) == 1
        e = edges[0]
        want = {"consistent-read", "write"} if writable else {"consistent-read"}
        assert set(e["perm"]) == want
        # resize is never shared: the export size cannot change under clients
        assert set(e["shared-perm"]) == {"consistent-read", "write", "write-unchanged"}
        from qmp_util import QMPError
        with pytest.raises(QMPError):
            srv.qmp.cmd("blockdev-del", node_name="node0")
        assert srv.delete() is None
        srv.qmp.cmd("blockdev-del", node_name="node0")
