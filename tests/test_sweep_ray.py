"""Sweeps on a real Ray cluster: a head and a second node started with `ray start` on this
machine (127.0.0.1), shared by every test of this module. A tiny stand-in notebook runs, so the
time goes to Ray and kernel start-up: a sweep that runs, skips, records failures and aggregates;
a point pinned to the second node; a killed worker and a killed kernel retried with nothing lost
or written twice; Ctrl-C and SIGKILL of the driver, then a resume; and the local instance that
`make reproduce` uses."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from adaptive_sae import results, sweep
from sweep_stand_in import stand_in_notebook, write_sweep

pytestmark = pytest.mark.slow  # one Ray cluster for the module (~30 s), kernels per point

RAY = Path(sys.executable).parent / "ray"
START_TIMEOUT = 180  # seconds: Ray starts slowly on a busy two-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout: float, what: str, every: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _start(args: list[str], log: Path, env: dict[str, str], tries: int = 2) -> subprocess.Popen:
    """`ray start --block ...`: it stays in the foreground and stops its processes on SIGTERM.
    On a busy machine a node can miss Ray's 30 s registration deadline; it is tried again."""
    for _ in range(tries):
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                [str(RAY), "start", "--block", *args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

        def started(proc=proc):
            if proc.poll() is not None:
                return "exited"
            return "Ray runtime started" in log.read_text(errors="replace")

        if _wait(started, START_TIMEOUT, f"ray start ({log.name})", every=0.5) is True:
            return proc
        _stop(proc)
    raise AssertionError(f"ray start failed {tries} times:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    try:  # anything of its session that outlived it
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def cluster():
    """A two-node cluster: the head (1 CPU) and a node with 1 CPU and a `second_node` resource.
    Yields its address; this process is connected to it as a driver."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # what `ray start` clusters use; read at import
    # a busy machine starts the node's agents slowly: give the raylet a minute, not 15 s
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_raylet_start_wait_time_s": "60"}
    temp = Path(tempfile.mkdtemp(prefix="ray"))  # short: Ray's socket paths are length-limited
    port = _free_port()
    address = f"127.0.0.1:{port}"
    head = node = None
    try:
        head = _start(
            [
                "--head",
                f"--port={port}",
                f"--ray-client-server-port={_free_port()}",
                "--num-cpus=1",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={temp}",
            ],
            temp / "head.log",
            env,
        )
        node = _start(
            [f"--address={address}", "--num-cpus=1", '--resources={"second_node": 1}'],
            temp / "node.log",
            env,
        )
        import ray

        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        yield address
    finally:
        try:
            import ray

            ray.shutdown()
        finally:
            for proc in (node, head):
                if proc is not None:
                    _stop(proc)
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.setenv(results.RESULTS_ENV, str(tmp_path / "results"))
    stand_in_notebook(tmp_path / "stand_in.ipynb")
    return tmp_path


def _driver(spec: Path, *args: str) -> subprocess.Popen:
    """The sweep command in its own process (and session, as a terminal would run it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "adaptive_sae.sweep", str(spec), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MPLBACKEND": "Agg"},
        start_new_session=True,
    )


def _attempts(log: Path) -> list[tuple[int, int]]:
    """(x, kernel pid) of every attempt the notebook recorded."""
    if not log.is_file():
        return []
    return [tuple(map(int, ln.split())) for ln in log.read_text().splitlines() if ln.strip()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


# ----------------------------------------------------------------------------- tests


def test_sweeps_run_skip_record_failures_aggregate_and_use_the_second_node(
    cluster, workdir, capsys
):
    import ray

    # x=1 passes; x=2 raises in its body; x=3 fails its claim cell. Seeds 0 and 1 in one point.
    spec = write_sweep(
        workdir,
        grid={"x": [1, 2, 3]},
        seeds=[0, 1],
        seeds_per_point="all",
        aggregate={"table": "runs", "by": ["rule"]},
    )
    pinned = write_sweep(
        workdir,
        file="pinned",
        grid={"x": [1]},
        resources={"num_cpus": 1, "resources": {"second_node": 1}},
    )
    code = sweep.main([str(spec), str(pinned), "--address", cluster])
    out, err = capsys.readouterr()
    assert code == 1, "a failed point must make the command fail at the end"
    assert "3 points: 1 done, 0 skipped, 2 failed" in out and "1 points: 1 done" in out
    # not a terminal: one line per finished point, no progress-bar redraws
    assert "\r" not in err
    assert sorted(ln.split()[2] for ln in err.splitlines() if ln.startswith("[")) == sorted(
        ["x=1__seeds=0-1", "x=2__seeds=0-1", "x=3__seeds=0-1", "x=1"]
    )

    s = sweep.load_sweep(spec)
    ok, raising, claim = s.points()
    assert s.is_done(ok) and not s.is_done(raising) and not s.is_done(claim)
    assert all(s.notebook_output(p).is_file() for p in (ok, raising, claim))
    assert "fails on purpose" in json.loads(s.failed_marker(raising).read_text())["error"]
    failed = json.loads(s.failed_marker(claim).read_text())
    assert "The value stays below thirty" in failed["error"]
    assert "AssertionError: (3, 30)" in failed["error"]
    assert "x=3__seeds=0-1" in out and "The value stays below thirty" in out
    assert not s.done_marker(raising).exists()
    assert not s.point_results(raising).exists(), "a failed point writes no results"

    # The notebook received the injected parameters and its files came back to the driver.
    folder = s.point_results(ok)
    assert sorted(p.name for p in folder.iterdir()) == [
        "metrics.json",
        "pid.txt",
        "provenance.json",
        "runs.csv",
    ]
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["parameters"] == {"x": 1, "seeds": [0, 1], "run_name": "demo/x=1__seeds=0-1"}

    # Aggregation: mean ± std over the two seeds of the done point, per rule.
    agg_dir = workdir / "results" / "stand_in" / "demo"
    summary = pd.read_csv(agg_dir / "summary.csv")
    assert list(summary["x"]) == [1, 1] and list(summary["rule"]) == ["a", "b"]
    row = summary.set_index("rule").loc["a"]
    assert row["value_mean"] == pytest.approx(10.5)
    assert row["value_std"] == pytest.approx(math.sqrt(0.5))
    assert row["n"] == 2
    assert "10.5 ± 0.71" in (agg_dir / "summary.md").read_text()
    status = pd.read_csv(agg_dir / "status.csv").set_index("point")
    assert status.loc["x=2__seeds=0-1", "status"] == "failed"
    assert status.loc["x=1__seeds=0-1", "status"] == "done"

    # The pinned point ran on the node that has the `second_node` resource.
    second = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "second_node" in n["Resources"]]
    p = sweep.load_sweep(pinned)
    (only,) = p.points()
    assert json.loads(p.done_marker(only).read_text())["node"] == second[0]

    # Second invocation: the done point is skipped (not re-executed), the failed ones rerun.
    before = s.done_marker(ok).stat().st_mtime_ns
    assert sweep.main([str(spec), "--address", cluster, "--no-progress"]) == 1
    assert "3 points: 0 done, 1 skipped, 2 failed" in capsys.readouterr().out
    assert s.done_marker(ok).stat().st_mtime_ns == before

    # A point whose notebook changed is stale again.
    nb = nbformat.read(s.notebook, as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("An edit."))
    nbformat.write(nb, s.notebook)
    assert not s.is_done(ok)


def test_a_point_no_node_can_hold_fails_at_once(cluster, workdir, capsys):
    spec = write_sweep(workdir, grid={"x": [1]}, resources={"num_cpus": 1, "num_gpus": 1})
    t0 = time.perf_counter()
    assert sweep.main([str(spec), "--address", cluster]) == 2
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    assert "demo.yaml" in err and "'GPU': 1" in err and "no node" in err


def test_killed_worker_and_killed_kernel_are_retried_and_written_once(cluster, workdir):
    log = workdir / "attempts.txt"
    (workdir / "hold-0").touch()
    spec = write_sweep(
        workdir,
        grid={"x": [0]},
        parameters={"attempts": str(log), "hold": str(workdir / "hold-{x}")},
    )
    driver = _driver(spec, "--address", cluster)
    try:
        # 1st attempt: kill its Ray worker process (the kernel's parent).
        (_, k1) = _wait(lambda: _attempts(log)[0:1], 120, "the first attempt")[0]
        os.kill(_parent(k1), signal.SIGKILL)
        # 2nd attempt (Ray retries the task); the orphaned kernel exits on its own.
        k2 = _wait(lambda: _attempts(log)[1:2], 120, "the retry after a worker death")[0][1]
        _wait(lambda: not _alive(k1), 30, "the first kernel to exit")
        os.kill(k2, signal.SIGKILL)  # a dead kernel (OOM killer, say) is retried too
        k3 = _wait(lambda: _attempts(log)[2:3], 120, "the retry after a kernel death")[0][1]
        (workdir / "hold-0").unlink()
        out, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out + err
    assert [x for x, _ in _attempts(log)] == [0, 0, 0]
    s = sweep.load_sweep(spec)
    (p,) = s.points()
    assert s.is_done(p) and not s.failed_marker(p).exists()
    folder = s.point_results(p)
    # only the finishing attempt's outputs, once
    assert (folder / "pid.txt").read_text() == str(k3)
    assert sorted(f.name for f in folder.iterdir()) == [
        "metrics.json",
        "pid.txt",
        "provenance.json",
        "runs.csv",
    ]
    assert err.count("done x=0") == 1
    assert not list(s.output_dir.glob(".*")), "no temporary files beside the outputs"


def test_ctrl_c_stops_at_once_sigkill_leaves_nothing_running_and_the_rerun_resumes(
    cluster, workdir
):
    log = workdir / "attempts.txt"
    (workdir / "hold-0").touch()
    spec = write_sweep(
        workdir,
        grid={"x": [0, 1]},
        parameters={"attempts": str(log), "hold": str(workdir / "hold-{x}")},
    )
    s = sweep.load_sweep(spec)
    held, one = s.points()

    driver = _driver(spec, "--address", cluster)
    _wait(
        lambda: s.is_done(one) and 0 in [x for x, _ in _attempts(log)], 180, "x=1 done, x=0 running"
    )
    kernel = [pid for x, pid in _attempts(log) if x == 0][0]
    t0 = time.monotonic()
    os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C in the driver's terminal
    out, err = driver.communicate(timeout=60)
    stopped = time.monotonic() - t0
    assert driver.returncode == 130, out + err
    assert stopped < 20, f"Ctrl-C took {stopped:.0f} s"
    assert "interrupted" in err and "x=0" in err and "resume with the same command" in err
    assert "Traceback" not in err
    _wait(lambda: not _alive(kernel), 30, "the interrupted point's kernel to exit")
    assert not s.is_done(held) and not s.failed_marker(held).exists()

    # Again, now killed with SIGKILL mid-point: the cluster stops the point's worker and kernel.
    finished = s.done_marker(one).stat().st_mtime_ns
    driver = _driver(spec, "--address", cluster)
    _wait(lambda: [x for x, _ in _attempts(log)].count(0) == 2, 180, "the second x=0 run")
    kernel = [pid for x, pid in _attempts(log) if x == 0][1]
    driver.kill()
    driver.communicate(timeout=30)
    _wait(lambda: not _alive(kernel), 60, "the kernel of a killed driver's point to exit")
    assert not s.is_done(held)

    # The rerun skips x=1 and finishes x=0.
    (workdir / "hold-0").unlink()
    driver = _driver(spec, "--address", cluster)
    out, err = driver.communicate(timeout=180)
    assert driver.returncode == 0, out + err
    assert "2 points: 1 done, 1 skipped, 0 failed" in out
    assert [x for x, _ in _attempts(log)].count(1) == 1, "a finished point ran again"
    assert s.done_marker(one).stat().st_mtime_ns == finished
    assert s.is_done(held)
    assert not list(s.output_dir.glob(".*")), "no temporary files beside the outputs"


def test_without_an_address_a_local_instance_runs_the_sweep_and_stops_on_ctrl_c(cluster, workdir):
    """What `make reproduce` does: no address, a local Ray instance of --jobs CPUs, stopped at
    the end (the cluster of this module is running and must not be joined). Its processes share
    the driver's process group, so a terminal's Ctrl-C reaches them all: the sweep must still
    stop cleanly, with the interrupted point not done."""
    log = workdir / "attempts.txt"
    (workdir / "hold-0").touch()
    spec = write_sweep(
        workdir,
        grid={"x": [0]},
        seeds=[0, 1],
        parameters={"attempts": str(log), "hold": str(workdir / "hold-{x}")},
    )
    s = sweep.load_sweep(spec)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "adaptive_sae.sweep", str(spec), "--jobs", "2"]
    driver = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    kernels = [pid for _, pid in _wait(lambda: _attempts(log)[1:2] and _attempts(log), 240, "x=0")]
    os.killpg(driver.pid, signal.SIGINT)
    out, err = driver.communicate(timeout=60)
    assert driver.returncode == 130, out + err
    assert "resume with the same command" in err and "Traceback" not in err
    for pid in kernels:
        _wait(lambda pid=pid: not _alive(pid), 30, "the kernels to exit")
    assert not any(s.is_done(p) for p in s.points()) and not s.output_dir.exists()

    (workdir / "hold-0").unlink()
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 points: 2 done" in proc.stdout
    assert all(s.is_done(p) for p in s.points())
    nodes = {json.loads(s.done_marker(p).read_text())["node"] for p in s.points()}
    import ray

    assert not nodes & {n["NodeID"] for n in ray.nodes()}, "it joined the module's cluster"
    print(f"local instance: 2 points in {seconds:.1f} s")
