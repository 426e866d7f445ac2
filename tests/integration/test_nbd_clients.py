"""NBD export served to real clients: qemu-io, qemu-img, nbdinfo, nbdcopy,
fio.  QEMU's tools are the oracle for what the export contains."""
import json
import os
import socket
import shutil
import subprocess
import threading
import time

import pytest

from conftest import LAMINAD, run
from nbd_util import NbdServe


@pytest.fixture
def raw_img(tmp_path):
    p = str(tmp_path / "disk.raw")
    run(["qemu-img", "create", "-f", "raw", p, "64M"])
    return p


def qemu_io(uri, *cmds):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    p = run(args + [uri])
    assert "failed" not in p.stdout and "error" not in p.stdout.lower(), p.stdout
    return p.stdout


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_io_patterns(raw_img, tcp):
    with NbdServe(raw_img, writable=True, tcp=tcp) as srv:
        qemu_io(srv.uri, "write -P 0x11 0 1M", "write -P 0x22 1M 64k",
                "write -P 0x33 4095 3", "write -z 8M 1M")
        qemu_io(srv.uri, "read -P 0x11 0 4095", "read -P 0x33 4095 3",
                "read -P 0x11 4098 1044478", "read -P 0x22 1M 64k",
                "read -P 0 8M 1M", "read -P 0 2M 1M")
        # Misaligned data written with -P can be verified against the file
    out = run(["qemu-io", "-f", "raw", "-c", "read -P 0x22 1M 64k", raw_img]).stdout
    assert "read 65536/65536" in out


def test_qemu_io_beyond_end_fails(raw_img):
    with NbdServe(raw_img, writable=True) as srv:
        p = run(["qemu-io", "-f", "raw", "-c", "write -P 1 64M 4k", srv.uri], check=False)
        assert "failed" in p.stdout + p.stderr or p.returncode != 0
        qemu_io(srv.uri, "read -P 0 0 4k")


def test_qemu_img_convert_and_compare(tmp_path, raw_img):
    src = str(tmp_path / "src.qcow2")
    run(["qemu-img", "create", "-f", "qcow2", src, "64M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 3M", "-c",
         "write -P 0xa5 20M 1M", src])
    with NbdServe(raw_img, writable=True) as srv:
        run(["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", src, srv.uri])
        run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, srv.uri])
        info = json.loads(run(["qemu-img", "info", "--output=json", srv.uri]).stdout)
        assert info["virtual-size"] == 64 << 20
        m = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw",
                            srv.uri]).stdout)
        data = [e for e in m if e["data"]]
        assert data and data[0]["start"] == 0
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, raw_img])


def test_nbdinfo(raw_img):
    run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", raw_img])
    with NbdServe(raw_img, writable=False, description="the disk") as srv:
        info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)
        exp = info["exports"][0]
        assert exp["export-size"] == 64 << 20
        assert exp["is_read_only"] is True
        assert exp["description"] == "the disk"
        assert exp["can_flush"] and exp["can_fua"] and exp["can_multi_conn"]
        assert exp["can_cache"]
        assert not exp["can_trim"] and not exp["can_zero"]
        assert exp["block_size_maximum"] == 32 << 20
        assert "base:allocation" in exp["contexts"]
        mp = json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)
        assert mp[0]["offset"] == 0 and mp[0]["length"] == 1 << 20
        assert mp[0]["type"] == 0
        assert mp[-1]["type"] == 3  # hole,zero up to the end
        assert sum(e["length"] for e in mp) == 64 << 20
        lst = run(["nbdinfo", "--list", "--json",
                   srv.uri.replace("/exp?", "/?") if "?" in srv.uri else srv.uri]).stdout
        names = [e["export-name"] for e in json.loads(lst)["exports"]]
        assert names == ["exp"]
        assert run(["nbdinfo", "--size", srv.uri]).stdout.strip() == str(64 << 20)


def test_nbdinfo_writable_flags(raw_img):
    with NbdServe(raw_img, writable=True) as srv:
        exp = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]
        assert exp["is_read_only"] is False
        assert exp["can_trim"] and exp["can_zero"] and exp["can_fast_zero"]
        assert exp["can_df"]


def test_max_connections_one_disables_multi_conn(raw_img):
    with NbdServe(raw_img, max_conn=1) as srv:
        exp = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]
        assert exp["can_multi_conn"] is False


def test_nbdcopy_both_directions(tmp_path, raw_img):
    src = str(tmp_path / "src.raw")
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        for i in range(0, 64, 5):
            f.seek(i << 20)
            f.write(os.urandom(300 * 1024))
    with NbdServe(raw_img, writable=True) as srv:
        run(["nbdcopy", src, srv.uri])
        out = str(tmp_path / "back.raw")
        run(["nbdcopy", srv.uri, out])
        run(["nbdcopy", "--flush", srv.uri, "null:"])
    run(["cmp", src, out])
    run(["cmp", src, raw_img])


@pytest.mark.skipif(not shutil.which("fio"), reason="fio missing")
def test_fio_verify(tmp_path, raw_img):
    with NbdServe(raw_img, writable=True) as srv:
        # cwd: fio leaves a verify state file behind
        p = run(["fio", "--name=v", "--ioengine=nbd", "--uri=" + srv.uri,
                 "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M",
                 "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                 "--output-format=json"], cwd=str(tmp_path))
        res = json.loads(p.stdout[p.stdout.index("{"):])
        assert res["jobs"][0]["error"] == 0


def test_concurrent_clients_disjoint_ranges(tmp_path, raw_img):
    expected = str(tmp_path / "expected.raw")
    run(["qemu-img", "create", "-f", "raw", expected, "64M"])
    n = 4
    with NbdServe(raw_img, writable=True) as srv:
        errors = []

        def writer(i):
            try:
                cmds = ["write -P %d %dM 1M" % (0x40 + i * 16 + k, i * 16 + k * 2)
                        for k in range(6)]
                qemu_io(srv.uri, *cmds)
            except Exception as e:  # collected and asserted below
                errors.append(e)

        ts = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors
        for i in range(n):
            for k in range(6):
                run(["qemu-io", "-f", "raw", "-c",
                     "write -P %d %dM 1M" % (0x40 + i * 16 + k, i * 16 + k * 2), expected])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", expected, srv.uri])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", expected, raw_img])


def test_qcow2_export_with_backing(tmp_path):
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    run(["qemu-img", "create", "-f", "qcow2", base, "16M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xb 0 2M", base])
    run(["qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", top])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xc 1M 2M", top])
    try:
        srv = NbdServe(top, fmt="qcow2", writable=True, allocation_depth=True)
    except AssertionError as e:
        pytest.skip("qcow2 driver not available: %s" % e)
    with srv:
        qemu_io(srv.uri, "read -P 0xb 0 1M", "read -P 0xc 1M 2M", "read -P 0 3M 1M")
        mp = json.loads(run(["nbdinfo", "--map=qemu:allocation-depth", "--json",
                             srv.uri]).stdout)
        depth = {(e["offset"], e["length"]): e["type"] for e in mp}
        assert depth[(0, 1 << 20)] == 2
        assert depth[(1 << 20, 2 << 20)] == 1
        assert mp[-1]["type"] == 0
    run(["qemu-img", "check", top])


def ipv6_available():
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not LAMINAD, reason="laminad not built")
@pytest.mark.parametrize("host", ["::1", "localhost", "::"])
def test_tcp_ipv6_and_names(raw_img, host):
    if ":" in host and not ipv6_available():
        pytest.skip("no IPv6 loopback")
    with NbdServe(raw_img, writable=True, tcp=True, host=host) as srv:
        port = srv.port
        # "::1" listens on v6 only; "localhost" on both loopbacks; "::" is
        # dual-stack
        fams = {a[0] for a in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        uris = []
        if socket.AF_INET in fams or host == "::":
            uris.append("nbd://127.0.0.1:%d/exp" % port)
        if socket.AF_INET6 in fams and ipv6_available():
            uris.append("nbd://[::1]:%d/exp" % port)
        assert uris
        for i, u in enumerate(uris):
            qemu_io(u, "write -P %d 0 64k" % (i + 1), "read -P %d 0 64k" % (i + 1))


def test_nbdcopy_single_connection_no_stall(tmp_path):
    """Regression: a lost worker wake-up left the last requests of a copy
    queued until an idle worker's 10 s timeout."""
    src = str(tmp_path / "full.raw")
    with open(src, "wb") as f:
        blk = os.urandom(1 << 20)
        for _ in range(128):
            f.write(blk)
    with NbdServe(src) as srv:
        for _ in range(4):
            t = time.time()
            run(["nbdcopy", "--connections=1", srv.uri, "null:"])
            assert time.time() - t < 5
