"""The real deployment loop on loopback: Prefect server on a free port, ``prefect deploy --all``
from prefect.yaml, a process worker, ``prefect deployment run``, Completed, the MLflow run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest

import tracking
from pipelines.local_loop import LocalLoop
from tests.pipelines.conftest import FAST_EVAL, TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loop(tmp_path_factory, module_store):
    """Server, pool, the three deployments and one worker; all stopped afterwards."""
    tmp = tmp_path_factory.mktemp("deploy-loop")
    env = {"VAE_MLRUNS_DIR": str(module_store), "VAE_CACHE_DIR": str(tmp / "cache"),
           "VAE_OPTUNA_DIR": str(tmp / "optuna"), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    with LocalLoop(tmp / "prefect-home", env) as loop:
        loop.start_server()
        loop.create_pool()
        loop.deploy()
        loop.start_worker()
        yield loop


def run_deployment(loop, name: str, *args: str) -> dict:
    """``prefect deployment run NAME ARGS...`` on the loop's worker; the flow run, once Completed."""
    started = loop.cli("deployment", "run", name, *args)
    assert started.returncode == 0, started.stdout + started.stderr
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
    run = loop.wait_for(flow_run_id, ("COMPLETED",), timeout=400)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{loop.log('worker')[-4000:]}"
    return run


def test_deployment_run_completes_and_its_mlflow_run_appears(loop, tiny_data_dir, tmp_path, module_client):
    overrides = {**TINY, "data_dir": str(tiny_data_dir), "checkpoint_dir": str(tmp_path / "checkpoints"),
                 "experiment_name": "tiny-deployment"}
    params = {"overrides": overrides, **FAST_EVAL, "figures": False}
    run = run_deployment(loop, "vae-training/vae-train", "--param", "num_epochs=1", "--params", json.dumps(params))
    assert run["parameters"]["num_epochs"] == 1
    flow_run_id = run["id"]

    exp = module_client.get_experiment_by_name("tiny-deployment")
    (mlflow_run,) = module_client.search_runs([exp.experiment_id],
                                              filter_string=f"tags.{tracking.TAG_FLOW_RUN_ID} = '{flow_run_id}'")
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["train.num_epochs"] == "1"
    assert [m.step for m in module_client.get_metric_history(mlflow_run.info.run_id, "val/nelbo")] == [1]
    version = module_client.get_model_version_by_alias(tracking.MODEL_NAME, tracking.CHALLENGER)
    assert version.run_id == mlflow_run.info.run_id


def test_all_three_deployments_exist_and_the_nightly_one_is_scheduled(loop):
    assert loop.deployment("vae-training", "vae-train")["work_pool_name"] == "vae-pool"
    assert loop.deployment("vae-sweep", "vae-sweep")["work_pool_name"] == "vae-pool"
    assert loop.deployment("vae-scoring", "vae-score")["entrypoint"] == "pipelines/scoring.py:vae_score"
    nightly = loop.deployment("vae-retraining", "vae-retrain-nightly")
    (schedule,) = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 3 * * *" and schedule["schedule"]["timezone"] == "UTC"
    assert schedule["active"] and nightly["parameters"] == {"source": "champion", "eval_max_images": 500}


def test_unknown_parameter_is_refused_when_the_run_is_requested(loop):
    refused = loop.cli("deployment", "run", "vae-training/vae-train", "--param", "latnet_dim=3")
    assert refused.returncode != 0
    assert "latnet_dim" in refused.stdout + refused.stderr


def test_deployments_carry_the_flows_generated_parameters(loop):
    from pipelines.training import vae_training
    from tuning.flow import vae_sweep

    for flow, name in ((vae_sweep, "vae-sweep/vae-sweep"), (vae_training, "vae-training/vae-train")):
        schema = loop.deployment(*name.split("/"))["parameter_openapi_schema"]
        assert schema["properties"] == flow.parameters.model_dump(mode="json")["properties"], name
    assert {"hidden_dims", "fast", "eval_max_train_images"} <= set(schema["properties"])


def test_sweep_deployment_run_with_a_param_completes(loop, tiny_data_dir):
    fixed = {k: v for k, v in TINY.items() if k not in ("latent_dim", "learning_rate", "sample_every", "progress")}
    params = {"study_name": "deploy-sweep", "latent_dims": [2, 4], "threads": 1, "pruner": "none", "plots": False,
              "fixed": {**fixed, "num_epochs": 1, "data_dir": str(tiny_data_dir)}}
    run = run_deployment(loop, "vae-sweep/vae-sweep", "--param", "n_trials=2", "--params", json.dumps(params))
    assert run["parameters"]["n_trials"] == 2
    storage = f"sqlite:///{Path(loop.env['VAE_OPTUNA_DIR']) / 'studies.db'}"
    trials = optuna.load_study(study_name="deploy-sweep", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
