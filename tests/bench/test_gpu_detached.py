"""bench/gpu/detached.sh: a job that outlives one device call (its own session), waited on over later calls."""

import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "detached.sh"
JOB = [sys.executable, "-c", "import os, time, pathlib; print('step 1', flush=True); time.sleep(1.5); "
       "assert os.environ['OUT'] == os.environ['DETACHED_OUT']; "
       "pathlib.Path(os.environ['DETACHED_OUT'], 'result.json').write_text('{}'); print('step 2'); "
       "raise SystemExit(int(os.environ.get('JOB_STATUS', '0')))"]


def _run(tmp_path, *args, env=None):
    env = {**os.environ, "DETACHED_ROOT": str(tmp_path / "jobs"), "OUT": str(tmp_path / "out"), **(env or {})}
    (tmp_path / "out").mkdir(exist_ok=True)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_a_job_runs_in_its_own_session_and_its_output_comes_back_when_it_ends(tmp_path):
    started = _run(tmp_path, "start", "soak", *JOB)
    assert started.returncode == 0, started.stderr
    pid = int((tmp_path / "jobs" / "soak" / "pid").read_text())
    # its own session: the device tool ends a call's processes but not one that started a new session (polled: the
    # background job execs setsid a moment after the script returns)
    deadline = time.monotonic() + 5
    while os.getsid(pid) == os.getsid(0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.getsid(pid) != os.getsid(0)
    again = _run(tmp_path, "start", "soak", *JOB)
    assert again.returncode == 2 and "already runs" in again.stderr
    early = _run(tmp_path, "wait", "soak", "0")
    assert early.returncode == 0 and "still runs" in early.stdout
    done = _run(tmp_path, "wait", "soak", "30")
    assert done.returncode == 0 and "ended with status 0" in done.stdout
    assert "step 2" in done.stdout  # the log's lines not shown before
    assert (tmp_path / "out" / "result.json").read_text() == "{}"
    assert "step 1" in (tmp_path / "out" / "soak.log").read_text()


def test_a_failed_job_s_status_is_the_wait_s_and_an_unknown_job_is_named(tmp_path):
    assert _run(tmp_path, "start", "bad", *JOB, env={"JOB_STATUS": "4"}).returncode == 0
    assert _run(tmp_path, "wait", "bad", "30").returncode == 4
    missing = _run(tmp_path, "wait", "nothing", "1")
    assert missing.returncode == 3 and "no job nothing" in missing.stderr
    assert _run(tmp_path, "start", "x").returncode == 2
