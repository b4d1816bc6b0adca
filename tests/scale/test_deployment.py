"""The ``vae-sweep`` deployment on the stack: ``prefect deploy`` from prefect.yaml, a run taken by
one of the pool's workers, its trials spread over worker processes, stored in PostgreSQL and
logged to the tracking server — configured only by the environment the workers start with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import pg_connect
from tests.scale.conftest import ROOT, start_stack, stop_stack
from tests.scale.test_stack import tiny_sweep_args

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
PREFECT = str(Path(sys.executable).with_name("prefect"))


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory, postgres):
    """The whole stack with two Prefect workers; their flow runs keep trial folders in a temp dir."""
    if not (ROOT / "prefect.yaml").is_file():
        pytest.skip("no prefect.yaml in the checkout: the vae-sweep deployment is not defined yet")
    tmp = tmp_path_factory.mktemp("prefect-stack")
    stack = start_stack(tmp, postgres, "--workers", "2", env={"VAE_OPTUNA_DIR": str(tmp / "optuna")})
    try:
        yield stack
    finally:
        stop_stack(stack)


def sweep_parameters(data_dir: Path) -> dict:
    """The flow parameters equivalent to the CLI test's tiny sweep."""
    args = tiny_sweep_args(data_dir)
    fixed = {a.split("=", 1)[0]: json.loads(a.split("=", 1)[1]) for a in args[args.index("--set"):][1::2]}
    return {"study_name": "scale-deploy", "n_trials": 4, "n_workers": 2, "threads": 1, "pruner": "none",
            "latent_dims": [2, 4], "fixed": fixed, "plots": False}


def test_vae_sweep_deployment_runs_on_pool_workers(prefect_stack, tiny_data_dir):
    from mlflow.tracking import MlflowClient

    env = {**prefect_stack.client_env(), "PREFECT_HOME": str(prefect_stack.dir / "prefect")}
    deploy = subprocess.run([PREFECT, "--no-prompt", "deploy", "--name", "vae-sweep"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    run = subprocess.run([PREFECT, "deployment", "run", "vae-sweep/vae-sweep", "--params",
                          json.dumps(sweep_parameters(tiny_data_dir)), "--watch", "--watch-timeout", "420"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]

    # The run went to one of the stack's workers, and its trials to two worker processes.
    logs = "".join(p.read_text() for p in (prefect_stack.dir / "logs").glob("worker-*.log"))
    assert "[worker 0] trial" in logs and "[worker 1] trial" in logs, logs[-3000:]

    with pg_connect(f"{prefect_stack.prefix}_optuna") as conn:
        numbers = [n for (n,) in conn.execute("SELECT t.number FROM trials t JOIN studies s USING (study_id) "
                                              "WHERE s.study_name = 'scale-deploy' AND t.state = 'COMPLETE'")]
    assert sorted(numbers) == [0, 1, 2, 3]

    client = MlflowClient(tracking_uri=prefect_stack.mlflow_url)
    exp = client.get_experiment_by_name("scale-deploy")
    (parent,) = client.search_runs([exp.experiment_id], "tags.run_kind = 'sweep'")
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(trials) == 4 and {r.info.status for r in trials} == {"FINISHED"}
