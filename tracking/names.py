"""The names every run shares: the registered model and its aliases, tags, where the local UI is."""

from __future__ import annotations

__all__ = ["MODEL_NAME", "CHAMPION", "CHALLENGER", "TAG_GIT_COMMIT", "TAG_DATASET_DIGEST", "TAG_DEVICE", "TAG_TORCH_VERSION", "TAG_FLOW_RUN_ID", "TAG_RUN_KIND", "TAG_CHECKPOINT_DIR", "TAG_DECISION", "TAG_DECISION_REASON", "TAG_FAILURE_REASON", "TAG_PROCESS_HOST", "TAG_PROCESS_PID", "TAG_CHALLENGER_SCORE", "TAG_CHAMPION_SCORE", "TAG_SCORE_METRIC", "TAG_SCORE_DIFFERENCE", "TAG_SCORE_DIFFERENCE_SE", "TAG_COMPARE_IMAGES", "TAG_CHALLENGER_TEST", "TAG_CHAMPION_TEST", "TAG_EXPERIMENT_KIND",
           "EXPERIMENT_KIND", "UI_WORKFLOW_QUERY", "UI_URL"]

MODEL_NAME = "vae-mnist"
CHAMPION, CHALLENGER = "champion", "challenger"
TAG_GIT_COMMIT = "git_commit"
TAG_DATASET_DIGEST = "dataset_digest"
TAG_DEVICE = "device"
TAG_TORCH_VERSION = "torch_version"
TAG_FLOW_RUN_ID = "prefect_flow_run_id"
TAG_RUN_KIND = "run_kind"  # training | retraining | sweep | trial
TAG_CHECKPOINT_DIR = "checkpoint_dir"
# The retraining decision, set on the challenger's run (and its model version).
TAG_DECISION = "retrain.decision"  # promoted | kept
TAG_DECISION_REASON = "retrain.reason"
TAG_FAILURE_REASON = "failure_reason"  # why a FAILED run failed: "<Error>: <message>"
# Where a pipeline run's process lives: a later start ends the run if that process is gone.
TAG_PROCESS_HOST, TAG_PROCESS_PID = "process.host", "process.pid"
# The decision's figures: both models' validation bound on the same images, the paired difference
# (challenger - champion) and its standard error; the test figures are reported, never compared.
TAG_CHALLENGER_SCORE = "retrain.challenger_score"
TAG_CHAMPION_SCORE = "retrain.champion_score"
TAG_SCORE_METRIC = "retrain.score_metric"  # val/iw_nll_k{k}
TAG_SCORE_DIFFERENCE = "retrain.difference"
TAG_SCORE_DIFFERENCE_SE = "retrain.difference_se"
TAG_COMPARE_IMAGES = "retrain.val_images"
TAG_CHALLENGER_TEST = "retrain.challenger_test"
TAG_CHAMPION_TEST = "retrain.champion_test"
UI_URL = "http://127.0.0.1:5000"  # where `make ui` serves the local store
# MLflow 3's UI opens an experiment as GenAI (traces overview, "No data available") unless told
# it holds model training. Two switches, both read by mlflow/server/js (3.17): the experiment tag
# below (read when the UI's workflow switcher is off), and the ``workflowType`` query of a link
# (the switcher, on in the open-source UI, else defaults to "genai"). The project sets both.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's kind for classic ML training
UI_WORKFLOW_QUERY = "workflowType=machine_learning"  # opens experiments on the training runs table
