"""Sweeps against a real PostgreSQL behind a fault injector (tests/reliability/faultproxy.py),
and a damaged SQLite store.

- a 3 s cut of every database connection during a sweep of N tiny trials: the sweep finishes
  with exactly N finished trials, none failed, lost or duplicated;
- a sweep process SIGKILLed mid-trial: its RUNNING trial is failed by its stale heartbeat and run
  again by the next sweep on the study (short heartbeat: ``--heartbeat-s 1 --grace-s 3``);
- a store that stays down (before or during a sweep), or a login the server refuses: one
  ``error:`` line, exit 2 (after ``--storage-retry-s`` for the first, at once for the second), and
  the same command finishes the study once the store is back;
- a SQLite file that is not a database, or a truncated one: one line naming the file, exit 2,
  the file byte for byte unchanged.
Each PostgreSQL test works in a database of its own, dropped afterwards.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from tests.reliability.conftest import PYTHON, assert_one_line_error, cli_env, tally, wait_for
from tests.conftest import PG_URL, pg_connect
from tests.reliability.faultproxy import FaultProxy, free_port

TINY_SETS = {"hidden_dims": [8, 16], "batch_size": 50, "val_size": 100, "ema_decay": 0.9, "log_every": 5,
             "max_train_samples": 0}


@pytest.fixture
def pg_db(postgres):
    """A fresh, empty database on the test server: its name (dropped after the test)."""
    name = f"faults_{uuid.uuid4().hex[:10]}"
    with pg_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with pg_connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _url(db: str, port: int | None = None) -> str:
    base = PG_URL if port is None else PG_URL.rsplit(":", 1)[0] + f":{port}"
    return f"{base}/{db}"


def _sweep(data_dir: Path, study: str, url: str, n: int, epochs: int, *extra: str) -> list[str]:
    flags = [PYTHON, "-m", "tuning", "--storage", url, "--study-name", study, "--n-trials", str(n), "--no-plots",
             "--pruner", "none", "--latent-dims", "2", "4", "--threads", "1", *extra]
    for k, v in {**TINY_SETS, "data_dir": str(data_dir), "num_epochs": epochs}.items():
        flags += ["--set", f"{k}={json.dumps(v)}"]
    return flags


def _trials(db: str, study: str) -> list[tuple[int, str, str]]:
    """(number, state, params as JSON) of every trial, read straight from the server (no proxy)."""
    with pg_connect(db) as conn:
        rows = conn.execute(
            "SELECT t.number, t.state::text, coalesce(json_object_agg(p.param_name, p.param_value) "
            "FILTER (WHERE p.param_name IS NOT NULL), '{}')::text FROM trials t JOIN studies s USING (study_id) "
            "LEFT JOIN trial_params p USING (trial_id) WHERE s.study_name = %s GROUP BY t.trial_id, t.number, "
            "t.state ORDER BY t.number", (study,)).fetchall()
    return rows


def _count(db: str, sql: str) -> int:
    try:
        with pg_connect(db) as conn:
            return conn.execute(sql).fetchone()[0]
    except Exception:  # noqa: BLE001 - tables not there yet
        return 0


def _env(tmp_path: Path) -> dict[str, str]:
    return cli_env(tmp_path, VAE_MLRUNS_DIR=str(tmp_path / "mlruns"), VAE_OPTUNA_DIR=str(tmp_path / "optuna"))


@pytest.mark.postgres
def test_a_3s_cut_during_a_sweep_loses_and_duplicates_no_trial(procs, tmp_path, tiny_data_dir, pg_db):
    n = 3
    with FaultProxy("127.0.0.1", int(PG_URL.rsplit(":", 1)[1])) as proxy:
        proc = procs.start(_sweep(tiny_data_dir, "cut", _url(pg_db, proxy.port), n, 2), env=_env(tmp_path))
        finished = "SELECT count(*) FROM trials WHERE state = 'COMPLETE'"
        assert wait_for(lambda: _count(pg_db, finished) >= 1, timeout=90, interval=0.2, proc=proc), \
            proc.communicate()[1][-3000:]
        before = _count(pg_db, finished)
        proxy.cut(3)  # every connection dropped mid-sweep, new ones refused for 3 s
        tally("faults")
        out, err = proc.communicate(timeout=120)
    assert proxy.dropped >= 1 and before < n  # the sweep had live connections, and trials still to run
    assert proc.returncode == 0, err[-3000:]
    trials = _trials(pg_db, "cut")
    states = [s for _, s, _ in trials]
    assert states == ["COMPLETE"] * n, (trials, out)
    assert len({p for _, _, p in trials}) == n, trials  # no settings tried twice
    assert "Traceback" not in err, err[-3000:]
    tally("trials_checked", n)


@pytest.mark.postgres
def test_a_cut_longer_than_the_retry_window_is_one_line_and_the_rerun_finishes(procs, tmp_path, tiny_data_dir, pg_db,
                                                                              optuna_env, capsys):
    from tuning.__main__ import main

    n = 2
    with FaultProxy("127.0.0.1", int(PG_URL.rsplit(":", 1)[1])) as proxy:
        argv = _sweep(tiny_data_dir, "outage", _url(pg_db, proxy.port), n, 2, "--storage-retry-s", "2",
                      "--heartbeat-s", "1", "--grace-s", "3")
        proc = procs.start(argv, env=_env(tmp_path / "first"))
        started = "SELECT count(*) FROM trials"
        assert wait_for(lambda: _count(pg_db, started) >= 1, timeout=90, interval=0.1, proc=proc), \
            proc.communicate()[1][-3000:]
        proxy.cut(600)  # down for good, as far as this sweep can tell
        tally("faults")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, out[-2000:] + err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert line.startswith(f"error: optuna storage {_url(pg_db, proxy.port)}: ") and "gave up after" in line
        proxy.resume()  # the database is back: the same command finishes the study
        assert main(argv[3:]) == 0, capsys.readouterr().err[-3000:]
    finished = [t for t in _trials(pg_db, "outage") if t[1] == "COMPLETE"]
    assert len(finished) == n and len({t[2] for t in finished}) == n
    tally("trials_checked", n)


@pytest.mark.postgres
def test_a_killed_sweeps_trial_is_failed_by_heartbeat_and_run_again(procs, tmp_path, tiny_data_dir, pg_db,
                                                                   optuna_env, capsys):
    from tuning.__main__ import main

    url, n, grace = _url(pg_db), 2, 3
    argv = _sweep(tiny_data_dir, "kill", url, n, 3, "--heartbeat-s", "1", "--grace-s", str(grace))
    victim = procs.start(argv, env=_env(tmp_path / "victim"))
    mid_trial = ("SELECT count(*) FROM trials t JOIN trial_intermediate_values v USING (trial_id) "
                 "WHERE t.state = 'RUNNING'")
    assert wait_for(lambda: _count(pg_db, mid_trial) > 0, timeout=90, interval=0.1, proc=victim), \
        victim.communicate()[1][-3000:]
    procs.kill(victim)  # SIGKILL mid-trial: no handler runs, the trial stays RUNNING
    victim.communicate(timeout=30)
    killed_at = time.monotonic()
    tally("faults")
    (killed,) = [t for t in _trials(pg_db, "kill") if t[1] == "RUNNING"]

    # The next sweep on the study, as from another machine (its own MLflow store), in this process:
    assert main(argv[3:]) == 0, capsys.readouterr().err[-3000:]
    trials = _trials(pg_db, "kill")
    by_state = {s: [t for t in trials if t[1] == s] for s in {"COMPLETE", "FAIL", "RUNNING", "WAITING"}}
    assert [t[0] for t in by_state["FAIL"]] == [killed[0]] and not by_state["RUNNING"] and not by_state["WAITING"]
    assert len(by_state["COMPLETE"]) == n, trials
    retry = [t for t in by_state["COMPLETE"] if t[2] == killed[2]]
    assert len(retry) == 1, trials  # the killed trial's settings ran again, once
    assert len({t[2] for t in by_state["COMPLETE"]}) == n
    with pg_connect(pg_db) as conn:
        (started,) = conn.execute("SELECT extract(epoch FROM now() - datetime_start) FROM trials t "
                                  "WHERE t.number = %s", (retry[0][0],)).fetchone()
    retried_after = (time.monotonic() - killed_at) - float(started)
    assert retried_after < grace + 30, retried_after  # within the grace period, plus the next run's start-up
    tally("trials_checked", len(trials))


@pytest.mark.postgres
def test_a_refused_login_is_one_line_at_once(pg_db, capsys, optuna_env):
    from tuning.__main__ import main

    url = PG_URL.replace("postgres@", "no_such_role@") + f"/{pg_db}"
    t0 = time.monotonic()
    code = main(["--storage", url, "--study-name", "refused", "--n-trials", "1", "--set",
                 f"data_dir={json.dumps(str(optuna_env))}"])
    err = capsys.readouterr().err
    assert code == 2
    assert_one_line_error(err, "error: optuna storage", "no_such_role", "does not exist")
    assert time.monotonic() - t0 < 10  # not retried: waiting does not create a role
    tally("bad_inputs")


def test_a_store_that_stays_down_is_one_line_after_the_retry_window(capsys, optuna_env):
    from tuning.__main__ import main

    url = f"postgresql+psycopg://postgres:secret@127.0.0.1:{free_port()}/nothing"
    t0 = time.monotonic()
    code = main(["--storage", url, "--study-name", "down", "--n-trials", "1", "--storage-retry-s", "2",
                 "--set", f"data_dir={json.dumps(str(optuna_env))}"])
    err = capsys.readouterr().err
    assert code == 2
    line = assert_one_line_error(err, "error: optuna storage postgresql+psycopg://postgres:***@127.0.0.1",
                                 "gave up after", "run the same command again")
    assert "secret" not in line
    assert 1.0 < time.monotonic() - t0 < 15  # retried for about --storage-retry-s
    tally("faults")


@pytest.fixture
def optuna_env(tmp_path, monkeypatch, tiny_data_dir) -> Path:
    """An isolated Optuna/MLflow folder for in-process CLI calls; returns the tiny data folder."""
    monkeypatch.setenv("VAE_OPTUNA_DIR", str(tmp_path / "optuna"))
    monkeypatch.setenv("VAE_MLRUNS_DIR", str(tmp_path / "mlruns"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tiny_data_dir


def _truncated_db(path: Path) -> None:
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE t (x BLOB)")
        con.executemany("INSERT INTO t VALUES (?)", [(b"x" * 3000,)] * 40)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_sqlite_store_is_one_line_and_left_unchanged(damage, tmp_path, capsys, optuna_env):
    from tuning.__main__ import main

    db = tmp_path / "store" / "studies.db"
    db.parent.mkdir()
    if damage == "garbage":
        db.write_bytes(b"this is not a database\n" * 200)
    else:
        _truncated_db(db)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    code = main(["--storage", f"sqlite:///{db}", "--study-name", "damaged", "--n-trials", "1",
                 "--set", f"data_dir={json.dumps(str(optuna_env))}"])
    err = capsys.readouterr().err
    assert code == 2
    assert_one_line_error(err, str(db), "left unchanged", "move it aside")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in db.parent.iterdir()) in (["studies.db"], ["studies.db", "studies.db.lock"])
    tally("bad_inputs")


@pytest.mark.postgres
def test_a_frozen_server_is_one_line_after_the_connect_timeout_not_a_hang(pg_db, capsys, optuna_env):
    from tuning.__main__ import main

    with FaultProxy("127.0.0.1", int(PG_URL.rsplit(":", 1)[1])) as proxy:
        proxy.freeze()  # connections are accepted, then nothing comes back
        t0 = time.monotonic()
        code = main(["--storage", _url(pg_db, proxy.port), "--study-name", "frozen", "--n-trials", "1",
                     "--storage-retry-s", "1", "--set", f"data_dir={json.dumps(str(optuna_env))}"])
        elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert code == 2
    assert_one_line_error(err, f"error: optuna storage {_url(pg_db, proxy.port)}", "gave up after")
    assert elapsed < 45, elapsed  # start-up, then the 5 s connect timeout: not a hang
    tally("faults")
