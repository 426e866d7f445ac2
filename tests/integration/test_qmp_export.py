"""nbd-server-start/stop, block-export-add/del, query-block-exports and the
BLOCK_EXPORT_DELETED event, against laminad and qemu-storage-daemon."""
import json
import os
import shutil
import socket
import time

import pytest

from qmp_util import Daemon, QMPError

FLAVORS = ["laminad"] + (["qsd"] if shutil.which("qemu-storage-daemon") else [])


@pytest.fixture(params=FLAVORS)
def d(request, tmp_path):
    with Daemon([], tmp_path, flavor=request.param) as dm:
        yield dm


def expect_error(d, cmd, args, desc, cls="GenericError"):
    r = d.qmp.execute({"execute": cmd, "arguments": args})
    assert "error" in r, f"{cmd} {args} succeeded"
    assert (r["error"]["class"], r["error"]["desc"]) == (cls, desc), f"{cmd} {json.dumps(args)}"


def nbd_sock(tmp_path):
    return {"type": "unix", "data": {"path": str(tmp_path / "nbd.sock")}}


def start_nbd(d, tmp_path, **kw):
    r = d.qmp.execute({"execute": "nbd-server-start",
                       "arguments": dict(addr=nbd_sock(tmp_path), **kw)})
    if "error" in r and "not built in" in r["error"]["desc"]:
        pytest.skip("NBD server not in this build")
    assert r == {"return": {}}


def test_nbd_server_start_schema(d, tmp_path):
    cases = [
        ({}, "Parameter 'addr' is missing"),
        ({"addr": {"type": "inet"}}, "Parameter 'addr.data' is missing"),
        ({"addr": {"type": "inet", "data": {}}}, "Parameter 'addr.data.host' is missing"),
        ({"addr": {"type": "inet", "data": {"host": "127.0.0.1"}}}, "Parameter 'addr.data.port' is missing"),
        ({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": 10810}}},
         "Invalid parameter type for 'addr.data.port', expected: string"),
        ({"addr": {"type": "foo", "data": {}}}, "Parameter 'type' does not accept value 'foo'"),
        ({"addr": {"type": "unix", "data": {"path": "/x", "bogus": 1}}}, "Parameter 'addr.data.bogus' is unexpected"),
        ({"addr": nbd_sock(tmp_path), "max-connections": -1}, "Parameter 'max-connections' expects uint32_t"),
        ({"addr": nbd_sock(tmp_path), "max-connections": "x"},
         "Parameter 'max-connections' expects uint64"),
        ({"addr": nbd_sock(tmp_path), "max-connections": 4294967296},
         "Parameter 'max-connections' expects uint32_t"),
        ({"addr": 1}, "Invalid parameter type for 'addr', expected: object"),
    ]
    for args, desc in cases:
        expect_error(d, "nbd-server-start", args, desc)
    expect_error(d, "nbd-server-stop", {}, "NBD server not running")
    d.qmp.cmd("blockdev-add", driver="null-co", node_name="n")
    expect_error(d, "block-export-add", {"type": "nbd", "id": "e0", "node-name": "n"},
                 "NBD server not running")


def test_block_export_add_schema(d, tmp_path):
    d.qmp.cmd("blockdev-add", driver="null-co", node_name="n")
    cases = [
        ({}, "Parameter 'type' is missing"),
        ({"type": "nbd"}, "Parameter 'id' is missing"),
        ({"type": "nbd", "id": "e0"}, "Parameter 'node-name' is missing"),
        ({"type": "foo", "id": "e0", "node-name": "n"}, "Parameter 'type' does not accept value 'foo'"),
        ({"type": "nbd", "id": "e0", "node-name": "n", "bogus": 1}, "Parameter 'bogus' is unexpected"),
        ({"type": "nbd", "id": "e0", "node-name": "n", "writable": "yes"},
         "Invalid parameter type for 'writable', expected: boolean"),
        ({"type": "nbd", "id": "e0", "node-name": "n", "name": 3},
         "Invalid parameter type for 'name', expected: string"),
        ({"type": "nbd", "id": "e0", "node-name": "n", "bitmaps": 3},
         "Invalid parameter type for 'bitmaps', expected: array"),
        ({"type": "nbd", "id": "e0", "node-name": "nope"}, "Cannot find device='' nor node-name='nope'"),
    ]
    for args, desc in cases:
        expect_error(d, "block-export-add", args, desc)
    expect_error(d, "block-export-del", {}, "Parameter 'id' is missing")
    expect_error(d, "block-export-del", {"id": "zz"}, "Export 'zz' is not found")
    expect_error(d, "block-export-del", {"id": "zz", "mode": "x"}, "Parameter 'mode' does not accept value 'x'")
    assert d.qmp.cmd("query-block-exports") == []


def test_export_lifecycle_and_events(d, tmp_path):
    start_nbd(d, tmp_path, **{"max-connections": 2})
    expect_error(d, "nbd-server-start", {"addr": nbd_sock(tmp_path)}, "NBD server already running")
    d.qmp.cmd("blockdev-add", driver="null-co", node_name="n", size=1048576, read_zeroes=True)
    d.qmp.cmd("blockdev-add", driver="null-co", node_name="ro", read_only=True)
    others = [d.connect() for _ in range(2)] if d.flavor == "laminad" else []
    d.qmp.cmd("block-export-add", type="nbd", id="e0", node_name="n", writable=True,
              description="d", allocation_depth=True, writethrough=False, args={"name": "ex"})
    expect_error(d, "block-export-add", {"type": "nbd", "id": "e0", "node-name": "n"},
                 "Block export id 'e0' is already in use")
    expect_error(d, "block-export-add", {"type": "nbd", "id": "e1", "node-name": "ro", "writable": True},
                 "Cannot export read-only node as writable")
    assert d.qmp.cmd("query-block-exports") == [
        {"type": "nbd", "id": "e0", "node-name": "n", "shutting-down": False}]
    expect_error(d, "blockdev-del", {"node-name": "n"}, "Node n is in use")
    g = d.qmp.cmd("x-debug-query-block-graph")
    bb = [n for n in g["nodes"] if n["type"] == "block-backend"]
    assert [n["name"] for n in bb] == [""]
    [root] = [e for e in g["edges"] if e["parent"] == bb[0]["id"]]
    assert root["name"] == "root"
    assert set(root["perm"]) == {"consistent-read", "write"}
    d.qmp.cmd("block-export-del", id="e0")
    ev = d.qmp.wait_event("BLOCK_EXPORT_DELETED", timeout=10)
    assert ev["data"] == {"id": "e0"}
    assert set(ev["timestamp"]) == {"seconds", "microseconds"}
    assert abs(ev["timestamp"]["seconds"] - time.time()) < 60
    for c in others:  # every negotiated client gets the event
        assert c.wait_event("BLOCK_EXPORT_DELETED", timeout=10)["data"] == {"id": "e0"}
    expect_error(d, "block-export-del", {"id": "e0"}, "Export 'e0' is not found")
    assert d.qmp.cmd("query-block-exports") == []
    d.qmp.cmd("blockdev-del", node_name="n")


def test_unnegotiated_client_gets_no_events(d, tmp_path):
    if d.flavor == "qsd":
        pytest.skip("a QSD socket monitor serves one client at a time")
    start_nbd(d, tmp_path)
    quiet = d.connect(negotiate=False)
    d.qmp.cmd("blockdev-add", driver="null-co", node_name="n")
    d.qmp.cmd("block-export-add", type="nbd", id="e0", node_name="n")
    d.qmp.cmd("nbd-server-stop")  # removes the export
    d.qmp.wait_event("BLOCK_EXPORT_DELETED", timeout=10)
    quiet.negotiate()
    assert quiet.events(0.3) == []
    expect_error(d, "nbd-server-stop", {}, "NBD server not running")


def test_export_served_over_nbd(d, tmp_path):
    nbdinfo = shutil.which("nbdinfo")
    if not nbdinfo:
        pytest.skip("nbdinfo missing")
    start_nbd(d, tmp_path)
    d.qmp.cmd("blockdev-add", driver="null-co", node_name="n", size=1048576, read_zeroes=True)
    d.qmp.cmd("block-export-add", type="nbd", id="e0", node_name="n", args={"name": "ex"})
    import subprocess
    p = subprocess.run([nbdinfo, "--size", f"nbd+unix:///ex?socket={tmp_path}/nbd.sock"],
                       capture_output=True, text=True, timeout=30)
    assert p.stdout.strip() == "1048576", p.stderr


def test_export_add_checks(d, tmp_path):
    d.qmp.cmd("blockdev-add", driver="null-co", node_name="n")
    start_nbd(d, tmp_path)
    cases = [
        ({"type": "nbd", "id": "Bad id!", "node-name": "n"}, "Invalid block export id"),
        ({"type": "nbd", "id": "", "node-name": "n"}, "Invalid block export id"),
        ({"type": "nbd", "id": "e", "node-name": "n", "bitmaps": ["bm"]}, "Bitmap 'bm' is not found"),
        ({"type": "nbd", "id": "e", "node-name": "n", "bitmaps": [{"node": "n", "name": "bm"}]},
         "Dirty bitmap 'bm' not found"),
        ({"type": "nbd", "id": "e", "node-name": "n", "iothread": "io0"}, 'iothread "io0" not found'),
        ({"type": "nbd", "id": "e", "node-name": "n", "name": "x" * 4097},
         "export name '" + "x" * 4097 + "' too long"),
        ({"type": "nbd", "id": "e", "node-name": "n", "description": "x" * 4097},
         "description '" + "x" * 4097 + "' too long"),
    ]
    for args, desc in cases:
        expect_error(d, "block-export-add", args, desc)
    assert d.qmp.cmd("query-block-exports") == []


def test_legacy_nbd_server_add_remove(d, tmp_path):
    expect_error(d, "nbd-server-add", {"device": "n"}, "Cannot find device='n' nor node-name='n'")
    d.qmp.cmd("blockdev-add", driver="null-co", node_name="n")
    d.qmp.cmd("blockdev-add", driver="null-co", node_name="ro", read_only=True)
    expect_error(d, "nbd-server-add", {"device": "n"}, "NBD server not running")
    start_nbd(d, tmp_path)
    expect_error(d, "nbd-server-add", {}, "Parameter 'device' is missing")
    expect_error(d, "nbd-server-add", {"device": "n", "bogus": 1}, "Parameter 'bogus' is unexpected")
    d.qmp.cmd("nbd-server-add", device="n", writable=True, description="x")
    expect_error(d, "nbd-server-add", {"device": "n"}, "Block export id 'n' is already in use")
    d.qmp.cmd("nbd-server-add", device="n", args={"name": "other"})
    d.qmp.cmd("nbd-server-add", device="ro", writable=True)  # exported read-only
    expect_error(d, "nbd-server-add", {"device": "n", "name": "b", "bitmap": "bm"},
                 "Bitmap 'bm' is not found")
    ids = sorted((e["id"], e["node-name"]) for e in d.qmp.cmd("query-block-exports"))
    assert ids == [("n", "n"), ("other", "n"), ("ro", "ro")]
    expect_error(d, "nbd-server-remove", {}, "Parameter 'name' is missing")
    expect_error(d, "nbd-server-remove", {"name": "nope"}, "Export 'nope' is not found")
    expect_error(d, "nbd-server-remove", {"name": "n", "mode": "x"},
                 "Parameter 'mode' does not accept value 'x'")
    d.qmp.cmd("nbd-server-remove", name="n", mode="hard")
    d.qmp.cmd("nbd-server-remove", name="other")
    got = {d.qmp.wait_event("BLOCK_EXPORT_DELETED")["data"]["id"] for _ in range(2)}
    assert got == {"n", "other"}


def test_query_block_is_empty(d):
    assert d.qmp.cmd("query-block") == []
    expect_error(d, "query-block", {"a": 1}, "Parameter 'a' is unexpected")
