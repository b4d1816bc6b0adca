"""MLflow conventions shared by the pipelines and the tuning package: one place for names.

The layer between the library and the orchestrators: ``vae`` (no tracker) <- ``tracking``
(MLflow only) <- ``tuning`` (Optuna) <- ``pipelines`` (Prefect). Modules: :mod:`tracking.names`
(the registered model, aliases, tags), :mod:`tracking.store` (where runs go: URI, client,
experiments, run links), :mod:`tracking.runs` (metrics, params, tags, the dataset, the trainer
callback), :mod:`tracking.outbox` (the durable outbox a pipeline run logs through, drained by a
background sender, so that training never waits on the tracking server). What runs are called:
params ``<section>.<key>`` (``model.latent_dim``), metrics as the library names them (``train/loss``, ``val/nelbo``, ``test/iw_nll_k1000``), the tags of
:mod:`tracking.names`, the registered model ``vae-mnist`` with aliases ``champion``/``challenger``.

MLflow's active run is per thread and Prefect tasks run in worker threads, so everything here
logs through ``MlflowClient`` with an explicit run id, never the fluent ``mlflow.log_*`` API.
"""

from tracking.names import *  # noqa: F403 - the package's flat API: tracking.MODEL_NAME, tracking.TAG_...
from tracking.names import __all__ as _names
from tracking.outbox import Outbox, deliver_pending, open_sender
from tracking.runs import (MLflowCallback, artifact_link, artifact_location, environment_tags, experiment_link,
                           git_commit, log_dataset, log_metrics, log_params, process_died, process_tags, run_link)
from tracking.store import (TrackingUnavailableError, check_reachable, ensure_experiment, get_client, is_local_store,
                            local_store_dir, mark_training_experiment, tracking_uri)

__all__ = [*_names, "MLflowCallback", "Outbox", "TrackingUnavailableError", "artifact_link", "artifact_location",
           "check_reachable", "deliver_pending", "ensure_experiment", "environment_tags", "experiment_link",
           "get_client", "git_commit", "is_local_store", "local_store_dir", "log_dataset", "log_metrics", "log_params",
           "mark_training_experiment", "open_sender", "process_died", "process_tags", "run_link", "tracking_uri"]
