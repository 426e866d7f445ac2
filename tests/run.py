#!/usr/bin/python3
"""Runs every test suite and ends with the line 'TOTAL: N passed, N failed'.

Suites: C unit tests (meson test) in build/, the same unit tests under
ASan+UBSan in build-asan/, the tests of suite 'concurrency' under TSan in
build-tsan/ (each if configured), and the Python integration tests
(pytest) against build/ and again against build-asan/.  Usage: tests/run.py [--quick]
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def meson_unit(builddir, label, suite="unit"):
    if not os.path.exists(os.path.join(ROOT, builddir, "build.ninja")):
        print(f"== {label}: {builddir} not configured, skipped")
        return 0, 0
    print(f"== {label}: meson test -C {builddir}", flush=True)
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    env.setdefault("TSAN_OPTIONS", "halt_on_error=1:second_deadlock_stack=1")
    p = subprocess.run(["meson", "test", "-C", builddir, "--print-errorlogs",
                        "--suite", suite, "--num-processes", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    out = p.stdout + p.stderr
    print(out[-20000:])
    # Count TAP subtests individually (one executable holds many cases);
    # other tests count once.
    passed = failed = 0
    log = os.path.join(ROOT, builddir, "meson-logs", "testlog.json")
    try:
        with open(log) as f:
            entries = [json.loads(line) for line in f if line.strip()]
    except OSError:
        entries = []
    for e in entries:
        ok = e.get("result") in ("OK", "EXPECTEDFAIL", "SKIP")
        stdout = e.get("stdout") or ""
        tap_ok = len(re.findall(r"^ok \d+", stdout, re.M))
        tap_bad = len(re.findall(r"^not ok \d+", stdout, re.M))
        if tap_ok + tap_bad:
            passed += tap_ok
            failed += tap_bad
            if not ok and tap_bad == 0:
                failed += 1  # crashed or exited non-zero after its cases
        elif e.get("result") == "SKIP":
            continue
        elif ok:
            passed += 1
        else:
            failed += 1
    if p.returncode != 0 and failed == 0:
        failed = 1  # meson itself failed
    return passed, failed


def pytest_suite(paths, label, extra_env=None):
    print(f"== {label}: pytest {' '.join(paths)}", flush=True)
    with tempfile.TemporaryDirectory() as td:
        xml = os.path.join(td, "junit.xml")
        env = dict(os.environ)
        env.update(extra_env or {})
        p = subprocess.run(["/usr/bin/python3", "-m", "pytest", "-q", "-p",
                            "no:cacheprovider", "--junitxml", xml,
                            "-o", "junit_family=xunit2"] + paths,
                           cwd=ROOT, env=env)
        if not os.path.exists(xml):
            return 0, 1
        root = ET.parse(xml).getroot()
        suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
        tests = fail = skip = 0
        for s in suites:
            tests += int(s.get("tests", 0))
            fail += int(s.get("failures", 0)) + int(s.get("errors", 0))
            skip += int(s.get("skipped", 0))
        if p.returncode not in (0, 1, 5) and fail == 0:
            fail = 1
        return tests - fail - skip, fail


def main():
    total_p = total_f = 0
    for builddir, label, suite in (("build", "unit", "unit"),
                                   ("build-asan", "unit (ASan+UBSan)", "unit"),
                                   ("build-tsan", "concurrency (TSan)", "concurrency")):
        p, f = meson_unit(builddir, label, suite)
        total_p += p
        total_f += f
    paths = [a for a in sys.argv[1:] if not a.startswith("--")] or ["tests/integration"]
    p, f = pytest_suite(paths, "integration")
    total_p += p
    total_f += f
    # The same integration tests against the ASan+UBSan binaries: daemons and
    # tools under real clients are where memory errors would hide.
    asan = os.path.join(ROOT, "build-asan")
    if "--no-asan-integration" not in sys.argv and os.path.exists(
            os.path.join(asan, "src", "daemon", "laminad")):
        p, f = pytest_suite(paths, "integration (ASan+UBSan)",
                            {"LAMINA_BUILD": asan,
                             "LAMINA_SKIP_QSD": "1",
                             # A smaller quarantine: tests that bound the
                             # daemon's RSS would otherwise count up to 256
                             # MiB of freed buffers ASan holds back.
                             "ASAN_OPTIONS": "detect_leaks=1:quarantine_size_mb=32",
                             "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"})
        total_p += p
        total_f += f
    print(f"TOTAL: {total_p} passed, {total_f} failed")
    return 0 if total_f == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
