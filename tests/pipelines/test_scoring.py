"""The vae-score flow on tiny data: scores equal the library's, land in a CSV and an MLflow run
with the version and data digest; bad files and unknown models are one line and exit code 2."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import tracking
from pipelines import scoring
from tests.conftest import make_digits
from tests.pipelines.test_serving import _register
from vae.ood import anomaly_scores, complexity_corrected


@pytest.fixture(scope="module")
def champion(module_client, tiny_data_dir, tmp_path_factory):
    return _register(module_client, tiny_data_dir, tmp_path_factory.mktemp("ck"), tracking.CHAMPION)


def test_the_flow_scores_a_file_into_a_csv_and_an_mlflow_run(champion, module_client, prefect_harness, tmp_path):
    version, model = champion
    images = make_digits(7, 11)[0]
    np.save(tmp_path / "images.npy", images)
    out = scoring.vae_score(str(tmp_path / "images.npy"), k=4, output_dir=str(tmp_path / "scores"))
    assert out["model_version"] == str(version.version)
    with open(out["scores"]) as f:
        rows = list(csv.DictReader(f))
    expected = anomaly_scores(model.unwrap_python_model().vae, torch.from_numpy(images), binarize="dynamic", k=4)
    assert [r["index"] for r in rows] == [str(i) for i in range(7)]
    np.testing.assert_allclose([float(r["iw_bound"]) for r in rows], expected["iw_bound"].numpy(), atol=1e-4)
    np.testing.assert_allclose([float(r["complexity_corrected"]) for r in rows],
                               complexity_corrected(expected["iw_bound"], torch.from_numpy(images)).numpy(), atol=1e-4)
    run = module_client.get_run(out["run_id"])
    digest = hashlib.sha256((tmp_path / "images.npy").read_bytes()).hexdigest()
    assert run.data.params["model_version"] == str(version.version) and run.data.params["num_images"] == "7"
    assert run.data.tags[tracking.TAG_DATASET_DIGEST] == digest
    assert {a.path for a in module_client.list_artifacts(out["run_id"])} == {"scores.csv", "score_histogram.png"}
    assert Path(out["mlflow_scores"]).is_file() and Path(out["histogram"]).stat().st_size > 1000


def test_bad_files_and_unknown_models_are_one_line_and_exit_2(champion, module_store, tmp_path, capsys):
    np.save(tmp_path / "wrong.npy", np.zeros((2, 32, 32), np.uint8))
    cases = [([str(tmp_path / "absent.idx")], "absent.idx: no such file"),
             ([str(tmp_path / "wrong.npy")], "wrong.npy: expected images of shape"),
             ([str(tmp_path / "wrong.npy"), "--k", "-1"], "--k: must be >= 0")]
    np.save(tmp_path / "good.npy", make_digits(2, 0)[0])
    cases.append(([str(tmp_path / "good.npy"), "--model", "models:/vae-mnist@nobody"], "no such registered model"))
    for argv, message in cases:
        assert scoring.run_cli(scoring._main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
