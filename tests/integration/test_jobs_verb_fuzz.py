"""Random job verbs through both command families against several backups
at once (iotests 200/219 in spirit): every command either succeeds or
fails with one of the documented messages, the daemon stays up, every job
ends, and the graph is clean afterwards."""
import random
import re
import time

import pytest

from jobs_util import QMPError, add_file, make_file, start

SIZE = 8 << 20

ALLOWED = [
    r"Job '\w+' in state '\w+' cannot accept command verb '[\w-]+'",
    r"Job is already paused",
    r"Can't resume a job that was not paused",
    r"The block job for device '\w+' is currently paused",
    r"The active block job '\w+' cannot be completed",
    r"Block job '\w+' not found",
    r"Job not found",
]


def test_random_verbs(tmp_path):
    d = start("laminad", tmp_path)
    q = d.qmp
    rnd = random.Random(2024)
    jobs = []
    for i in range(4):
        s = str(tmp_path / f"s{i}")
        t = str(tmp_path / f"t{i}")
        make_file(s, SIZE, lambda off: (off >> 16) & 0xff)
        make_file(t, SIZE)
        add_file(q, f"s{i}", s)
        add_file(q, f"t{i}", t)
        q.cmd("blockdev-backup", job_id=f"j{i}", device=f"s{i}", target=f"t{i}",
              sync=rnd.choice(["full", "none"]), speed=512 << 10,
              auto_finalize=rnd.random() < 0.5, auto_dismiss=rnd.random() < 0.5)
        jobs.append(f"j{i}")
    verbs = [("job-pause", "id"), ("job-resume", "id"), ("job-cancel", "id"),
             ("job-complete", "id"), ("job-finalize", "id"), ("job-dismiss", "id"),
             ("block-job-pause", "device"), ("block-job-resume", "device"),
             ("block-job-cancel", "device"), ("block-job-complete", "device"),
             ("block-job-finalize", "id"), ("block-job-dismiss", "id"),
             ("block-job-set-speed", "device")]
    for _ in range(400):
        name, key = rnd.choice(verbs)
        args = {key: rnd.choice(jobs)}
        if name == "block-job-set-speed":
            args["speed"] = rnd.choice([0, 1 << 20, 64 << 10])
        if name == "block-job-cancel" and rnd.random() < 0.5:
            args["force"] = True
        try:
            q.cmd(name, args=args)
        except QMPError as e:
            assert any(re.fullmatch(p, e.desc) for p in ALLOWED), (name, args, e.desc)
        if rnd.random() < 0.05:
            time.sleep(0.01)
        q.cmd("query-jobs")
        q.cmd("query-block-jobs")
    # Wind everything down.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = q.cmd("query-jobs")
        if not left:
            break
        for j in left:
            st = j["status"]
            try:
                if st == "concluded":
                    q.cmd("job-dismiss", id=j["id"])
                elif st == "pending":
                    q.cmd("job-finalize", id=j["id"])
                elif st in ("paused", "running", "ready", "standby", "created", "waiting"):
                    q.cmd("job-cancel", id=j["id"])
            except QMPError:
                pass
        time.sleep(0.05)
    assert q.cmd("query-jobs") == []
    names = sorted(n["node-name"] for n in q.cmd("query-named-block-nodes"))
    assert names == sorted([f"s{i}" for i in range(4)] + [f"t{i}" for i in range(4)])
    assert d.stop() == 0
