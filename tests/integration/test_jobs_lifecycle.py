"""Job lifecycle over QMP (iotests 219/056 in spirit): event sequences,
verbs in each state, auto-finalize/auto-dismiss, errors.  Each test runs on
laminad and on qemu-storage-daemon (the oracle)."""
import os

import pytest

from jobs_util import (FLAVORS, add_file, job_events, make_file, qmp_error, start,
                       wait_status)

SIZE = 4 << 20


@pytest.fixture(params=FLAVORS)
def env(request, tmp_path):
    src = str(tmp_path / "src.raw")
    tgt = str(tmp_path / "tgt.raw")
    make_file(src, SIZE, lambda off: (off >> 16) & 0xff)
    make_file(tgt, SIZE)
    d = start(request.param, tmp_path)
    add_file(d.qmp, "src", src)
    add_file(d.qmp, "tgt", tgt)
    yield d, src, tgt
    d.stop()


def test_backup_completes(env):
    d, src, tgt = env
    q = d.qmp
    q.cmd("blockdev-backup", job_id="j0", device="src", target="tgt", sync="full")
    assert job_events(q, "j0") == ["created", "running", "waiting", "pending", "COMPLETED",
                                   "concluded", "null"]
    assert q.cmd("query-jobs") == []
    with open(src, "rb") as a, open(tgt, "rb") as b:
        assert a.read() == b.read()


def test_manual_finalize_and_dismiss(env):
    d, _, _ = env
    q = d.qmp
    q.cmd("blockdev-backup", job_id="j1", device="src", target="tgt", sync="full",
          auto_finalize=False, auto_dismiss=False)
    assert job_events(q, "j1", until=("PENDING",)) == ["created", "running", "waiting",
                                                        "pending", "PENDING"]
    assert qmp_error(q, "job-dismiss", id="j1") == (
        "GenericError", "Job 'j1' in state 'pending' cannot accept command verb 'dismiss'")
    assert qmp_error(q, "job-complete", id="j1") == (
        "GenericError", "Job 'j1' in state 'pending' cannot accept command verb 'complete'")
    q.cmd("job-finalize", id="j1")
    assert job_events(q, "j1", until=("concluded",)) == ["COMPLETED", "concluded"]
    [info] = q.cmd("query-block-jobs")
    assert info["status"] == "concluded" and info["offset"] == info["len"] == SIZE
    assert info["type"] == "backup" and info["device"] == "j1" and "error" not in info
    assert qmp_error(q, "job-pause", id="j1") == (
        "GenericError", "Job 'j1' in state 'concluded' cannot accept command verb 'pause'")
    assert qmp_error(q, "blockdev-backup", job_id="j1", device="src", target="tgt",
                     sync="full") == ("GenericError", "Job ID 'j1' already in use")
    q.cmd("job-dismiss", id="j1")
    assert job_events(q, "j1") == ["null"]


def test_cancel_in_pending(env):
    d, _, _ = env
    q = d.qmp
    q.cmd("blockdev-backup", job_id="j2", device="src", target="tgt", sync="full",
          auto_finalize=False, auto_dismiss=False)
    job_events(q, "j2", until=("PENDING",))
    q.cmd("block-job-cancel", device="j2")
    assert job_events(q, "j2", until=("concluded",)) == ["aborting", "CANCELLED", "concluded"]
    [j] = q.cmd("query-jobs")
    assert j["error"] == "Operation canceled"
    q.cmd("job-dismiss", id="j2")


def test_pause_resume_cancel(env):
    d, _, _ = env
    q = d.qmp
    q.cmd("blockdev-backup", job_id="j3", device="src", target="tgt", sync="full", speed=65536)
    assert qmp_error(q, "job-resume", id="j3") == (
        "GenericError", "Can't resume a job that was not paused")
    q.cmd("block-job-pause", device="j3")
    [bj] = q.cmd("query-block-jobs")
    assert bj["paused"] is True
    wait_status(q, "j3", "paused")
    assert qmp_error(q, "job-pause", id="j3") == ("GenericError", "Job is already paused")
    assert qmp_error(q, "block-job-cancel", device="j3") == (
        "GenericError", "The block job for device 'j3' is currently paused")
    off1 = q.cmd("query-block-jobs")[0]["offset"]
    import time
    time.sleep(0.3)
    assert q.cmd("query-block-jobs")[0]["offset"] == off1, "a paused job must not progress"
    q.cmd("job-resume", id="j3")
    wait_status(q, "j3", "running")
    q.cmd("block-job-set-speed", device="j3", speed=0)
    q.cmd("job-cancel", id="j3")
    seq = job_events(q, "j3")
    assert seq[-4:] == ["aborting", "CANCELLED", "concluded", "null"]


def test_not_found_and_bad_args(env):
    d, _, _ = env
    q = d.qmp
    assert qmp_error(q, "block-job-pause", device="nope") == (
        "DeviceNotActive", "Block job 'nope' not found")
    assert qmp_error(q, "job-pause", id="nope") == ("GenericError", "Job not found")
    assert qmp_error(q, "blockdev-backup", job_id="bad id!", device="src", target="tgt",
                     sync="full") == ("GenericError", "Invalid job ID 'bad id!'")
    assert qmp_error(q, "blockdev-backup", job_id="x", device="src", target="src",
                     sync="full")[1] == "Source and target cannot be the same"
    assert qmp_error(q, "blockdev-backup", job_id="x", device="src", target="tgt",
                     sync="full", speed=-1) == (
        "GenericError", "Parameter 'speed' expects a non-negative value")
    assert job_events(q, "x") == ["created", "null"]
    assert qmp_error(q, "blockdev-backup", job_id="x", device="src", target="tgt",
                     sync="incremental") == (
        "GenericError", "must provide a valid bitmap name for 'incremental' sync mode")
    assert q.cmd("query-jobs") == []


def test_set_speed_errors(env):
    d, _, _ = env
    q = d.qmp
    q.cmd("blockdev-backup", job_id="j4", device="src", target="tgt", sync="none")
    assert qmp_error(q, "block-job-set-speed", device="j4", speed=-1) == (
        "GenericError", "Parameter 'speed' expects a non-negative value")
    q.cmd("block-job-set-speed", device="j4", speed=1 << 20)
    assert q.cmd("query-block-jobs")[0]["speed"] == 1 << 20
    q.cmd("job-cancel", id="j4")
    assert job_events(q, "j4")[-4:] == ["aborting", "CANCELLED", "concluded", "null"]


def test_blockdev_create_job(env, tmp_path):
    d, _, _ = env
    q = d.qmp
    path = str(tmp_path / "new.raw")
    q.cmd("blockdev-create", job_id="c0",
          options={"driver": "file", "filename": path, "size": 1 << 20})
    assert job_events(q, "c0", until=("concluded",)) == [
        "created", "running", "waiting", "pending", "concluded"]
    assert os.path.getsize(path) == 1 << 20
    assert q.cmd("query-block-jobs") == []
    [j] = q.cmd("query-jobs")
    assert j["type"] == "create" and j["status"] == "concluded"
    assert qmp_error(q, "block-job-dismiss", id="c0") == (
        "DeviceNotActive", "Block job 'c0' not found")
    q.cmd("job-dismiss", id="c0")
    assert job_events(q, "c0") == ["null"]


@pytest.mark.parametrize("policy,err,stops", [("report", 5, False), ("enospc", 28, True),
                                              ("stop", 5, True), ("ignore", 5, False)])
def test_target_error_policies(env, policy, err, stops):
    d, _, _ = env
    q = d.qmp
    q.cmd("blockdev-add", args={
        "driver": "blkdebug", "node-name": "dbg", "image": "tgt",
        "inject-error": [{"event": "write_aio", "errno": err, "once": policy != "report"}]})
    # A format above blkdebug raises write_aio in QEMU (raw does).
    q.cmd("blockdev-add", args={"driver": "raw", "node-name": "dbgraw", "file": "dbg"})
    q.cmd("blockdev-backup", job_id="e", device="src", target="dbgraw", sync="full",
          on_target_error=policy, x_perf={"max-workers": 1})
    if stops:
        ev = q.wait_event("BLOCK_JOB_ERROR")
        assert ev["data"] == {"device": "e", "operation": "write", "action": "stop"}
        wait_status(q, "e", "paused")
        [bj] = q.cmd("query-block-jobs")
        assert bj["io-status"] == ("nospace" if err == 28 else "failed") and bj["paused"]
        assert qmp_error(q, "block-job-cancel", device="e")[1] == \
            "The block job for device 'e' is currently paused"
        q.cmd("block-job-resume", device="e")
        seq = job_events(q, "e")
        assert seq[-4:] == ["pending", "COMPLETED", "concluded", "null"]
    else:
        seq = job_events(q, "e")
        if policy == "report":
            assert seq[-5:] == ["ERROR", "aborting", "COMPLETED", "concluded", "null"]
        else:
            assert "ERROR" in seq and seq[-4:] == ["pending", "COMPLETED", "concluded", "null"]


def test_nodes_busy_during_backup(env):
    d, _, _ = env
    q = d.qmp
    q.cmd("blockdev-backup", job_id="j5", device="src", target="tgt", sync="none",
          filter_node_name="flt")
    cls, desc = qmp_error(q, "blockdev-del", node_name="tgt")
    assert desc == "Node 'tgt' is busy: block device is in use by block job: backup"
    cls, desc = qmp_error(q, "blockdev-del", node_name="src")
    assert cls == "GenericError"
    names = [n["node-name"] for n in q.cmd("query-named-block-nodes")]
    assert "flt" in names
    q.cmd("job-cancel", id="j5")
    job_events(q, "j5")
    assert "flt" not in [n["node-name"] for n in q.cmd("query-named-block-nodes")]
    q.cmd("blockdev-del", node_name="tgt")
    q.cmd("blockdev-del", node_name="src")


def test_blockdev_create_qcow2(env, tmp_path):
    """The iotest recipe: create the file, add it, format it as qcow2."""
    import json
    import subprocess
    d, _, _ = env
    q = d.qmp
    path = str(tmp_path / "new.qcow2")
    q.cmd("blockdev-create", job_id="c1", options={"driver": "file", "filename": path,
                                                   "size": 0})
    job_events(q, "c1", until=("concluded",))
    q.cmd("job-dismiss", id="c1")
    add_file(q, "newfile", path)
    q.cmd("blockdev-create", job_id="c2", options={"driver": "qcow2", "file": "newfile",
                                                   "size": 64 << 20, "cluster-size": 65536})
    assert job_events(q, "c2", until=("concluded",)) == [
        "created", "running", "waiting", "pending", "concluded"]
    q.cmd("job-dismiss", id="c2")
    q.cmd("blockdev-add", args={"driver": "qcow2", "node-name": "new", "file": "newfile"})
    q.cmd("blockdev-del", node_name="new")
    q.cmd("blockdev-del", node_name="newfile")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", path], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 << 20
    subprocess.run(["qemu-img", "check", "-q", path], check=True)
    # A failing creation does not fail the command: the job aborts.
    q.cmd("blockdev-create", job_id="c3", options={"driver": "qcow2", "file": "nope",
                                                   "size": 1 << 20})
    assert job_events(q, "c3", until=("concluded",))[-2:] == ["aborting", "concluded"]
    [j] = q.cmd("query-jobs")
    assert j["status"] == "concluded" and j["error"]
    q.cmd("job-dismiss", id="c3")


@pytest.mark.parametrize("policy", ["report", "stop", "ignore"])
def test_source_error_policies(env, policy):
    d, _, _ = env
    q = d.qmp
    q.cmd("blockdev-add", args={
        "driver": "blkdebug", "node-name": "sdbg", "image": "src",
        "inject-error": [{"event": "read_aio", "errno": 5, "once": policy != "report"}]})
    q.cmd("blockdev-add", args={"driver": "raw", "node-name": "sraw", "file": "sdbg"})
    q.cmd("blockdev-backup", job_id="s", device="sraw", target="tgt", sync="full",
          on_source_error=policy, x_perf={"max-workers": 1})
    ev = q.wait_event("BLOCK_JOB_ERROR")
    assert ev["data"] == {"device": "s", "operation": "read",
                          "action": "stop" if policy == "stop" else policy}
    if policy == "stop":
        wait_status(q, "s", "paused")
        [bj] = q.cmd("query-block-jobs")
        assert bj["io-status"] == "failed"
        q.cmd("job-resume", id="s")
    seq = job_events(q, "s")
    if policy == "report":
        assert seq[-4:] == ["aborting", "COMPLETED", "concluded", "null"]
    else:
        assert seq[-4:] == ["pending", "COMPLETED", "concluded", "null"]


def test_quit_cancels_running_job(env):
    """quit force-cancels running jobs: BLOCK_JOB_CANCELLED reaches the
    client (before or after the quit reply, as on QSD) and the daemon
    exits 0."""
    d, _, _ = env
    q = d.qmp
    q.cmd("blockdev-backup", job_id="jq", device="src", target="tgt", sync="full",
          speed=65536)
    wait_status(q, "jq", "running")
    q.send_raw(b'{"execute": "quit"}')
    seen = []
    try:
        while True:
            m = q._read_msg(10)
            if m is None:
                break
            seen.append(m.get("event") or ("return" if "return" in m else m))
    except (TimeoutError, EOFError, OSError):
        pass
    seen += [e["event"] for e in q.queue]
    assert "BLOCK_JOB_CANCELLED" in seen, seen
    assert d.proc.wait(20) == 0


def test_backup_raw_status_sequence(env):
    """The unfiltered JOB_STATUS_CHANGE sequence of a backup, as QSD emits
    it: the job starts inside a drained section, so running, paused,
    running all come before the command's reply."""
    d, _, _ = env
    q = d.qmp
    q.events()  # drop anything earlier
    q.cmd("blockdev-backup", job_id="jr", device="src", target="tgt", sync="full")
    # Events read before the reply are queued by cmd().
    before = [e["data"]["status"] for e in q.queue
              if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == "jr"]
    q.queue = []
    assert before == ["created", "running", "paused", "running"]
    seq = list(before)
    import time
    deadline = time.monotonic() + 30
    while seq[-1] != "null" and time.monotonic() < deadline:
        for e in q.events(timeout=0.2):
            if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == "jr":
                seq.append(e["data"]["status"])
    assert seq == ["created", "running", "paused", "running", "waiting", "pending",
                   "concluded", "null"]
