"""The registered model answers requests: every pyfunc output equals the library's own functions,
names the version that produced it, refuses bad requests with a clear message; and the command
``make serve`` runs (``mlflow models serve``) answers real HTTP requests and keeps serving after
bad ones."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

import tracking
from pipelines import registry, vae_pyfunc
from tests.conftest import make_digits
from vae.config import get_default_config, validate_config
from vae.data import Split
from vae.evaluate import evaluate
from vae.ood import anomaly_scores, complexity_corrected
from vae.train import VAETrainer
from tests.reliability.faultproxy import free_port


def _register(client, tiny_data_dir, folder: Path, alias: str, **overrides) -> tuple:
    cfg = {**get_default_config(), "data_dir": str(tiny_data_dir), "checkpoint_dir": str(folder),
           "hidden_dims": [8, 16], "latent_dim": 4, "batch_size": 50, "num_epochs": 1, "val_size": 100,
           "progress": False, "sample_every": 0, "reconstruction_loss_type": "bce", "binarize": "dynamic",
           "max_train_samples": 300, **overrides}
    checkpoint = VAETrainer(validate_config(cfg), []).train()["best_model_path"]
    run_id = client.create_run(tracking.ensure_experiment(client, "tiny-serving")).info.run_id
    version = registry.log_and_register(client, run_id, checkpoint, cfg, alias=alias)
    return version, registry.load_pyfunc(registry.model_uri(version), client)


@pytest.fixture(scope="module")
def champion(module_client, tiny_data_dir, tmp_path_factory):
    return _register(module_client, tiny_data_dir, tmp_path_factory.mktemp("ck"), tracking.CHAMPION)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return (make_digits(6, 7)[0].astype(np.float32) / 255)[:, None]


def test_every_output_equals_the_library_and_names_the_version(champion, images):
    version, model = champion
    vae, x = model.unwrap_python_model().vae, torch.from_numpy(images)
    with torch.no_grad():
        mu, _ = vae.encode(x)
        expected = {"latent_mean": mu, "reconstruction": vae.decode(mu)}
    for output, want in expected.items():
        got = model.predict(images, params={"output": output})
        assert got["model_version"] == str(version.version) and got["output"] == output
        assert model.model_config[vae_pyfunc.VERSION_KEY] == str(version.version)
        np.testing.assert_allclose(got[output], want.numpy(), rtol=1e-5, atol=1e-6)
    scores = model.predict(images, params={"output": "anomaly_score", "k": 16, "seed": 3})
    metrics = evaluate(vae, Split(torch.from_numpy(make_digits(6, 7)[0]), torch.zeros(6, dtype=torch.long)),
                       binarize="dynamic", k=16, seed=3, probe=False, fid=False)
    assert scores["nelbo"].mean() == pytest.approx(metrics["test/nelbo"], rel=1e-6)
    assert scores["iw_bound"].mean() == pytest.approx(metrics["test/iw_nll_k16"], rel=1e-9)
    lib = anomaly_scores(vae, x, binarize="dynamic", k=16, seed=3)
    np.testing.assert_array_equal(scores["complexity_corrected"], complexity_corrected(lib["iw_bound"], x).numpy())
    samples = model.predict(images[:1], params={"output": "samples", "n": 5, "seed": 9})["samples"]
    np.testing.assert_array_equal(samples, vae.sample(5, generator=torch.Generator().manual_seed(9)).numpy())


def test_the_autoregressive_decoder_reconstructs_teacher_forced(module_client, tiny_data_dir, tmp_path, images):
    version, model = _register(module_client, tiny_data_dir, tmp_path, "ar-test", decoder="autoregressive",
                               ar_channels=4)
    vae, x = model.unwrap_python_model().vae, torch.from_numpy(images)
    got = model.predict(images)
    with torch.no_grad():
        np.testing.assert_allclose(got["reconstruction"], vae.decode(vae.encode(x)[0], x).numpy(), atol=1e-6)
    assert got["model_version"] == str(version.version)
    assert model.predict(images, params={"output": "anomaly_score"})["nelbo"].shape == (6,)


def test_the_base64_form_gives_what_the_float_form_gives(champion, images):
    model = champion[1]
    grey = np.rint(images * 255).astype(np.uint8)
    blank, b64 = np.zeros((1, 1, 28, 28), np.float32), base64.b64encode(grey.tobytes()).decode()
    fast = model.predict(blank, params={"images_b64": b64, "encoding": "uint8_b64"})
    assert fast["shape"] == [6, 1, 28, 28] and fast["encoding"] == "uint8_b64"
    recon = np.frombuffer(base64.b64decode(fast["reconstruction"]), np.uint8).reshape(6, 1, 28, 28)
    want = model.predict(grey / np.float32(255))["reconstruction"]
    np.testing.assert_array_equal(recon, np.rint(want * 255).astype(np.uint8))
    scores = model.predict(blank, params={"images_b64": b64, "output": "anomaly_score"})
    np.testing.assert_array_equal(scores["nelbo"], model.predict(images, params={"output": "anomaly_score"})["nelbo"])


BAD = [  # (images, params, what the message says)
    (np.zeros((2, 784), np.float32), None, "shape"),
    (np.full((1, 1, 28, 28), np.nan, np.float32), None, "NaN"),
    (np.full((1, 1, 28, 28), 3.0, np.float32), None, "in [0, 1]"),
    (np.zeros((1, 1, 28, 28), np.float32), {"output": "everything"}, "must be one of"),
    (np.zeros((1, 1, 28, 28), np.float32), {"output": "samples", "n": 10**6}, "params['n']"),
    (np.zeros((200, 1, 28, 28), np.float32), {"output": "anomaly_score", "k": 10**4}, "k x images"),
    (np.zeros((1, 1, 28, 28), np.float32), {"images_b64": "AAAA"}, "expected N x 784"),
    (np.zeros((1, 1, 28, 28), np.float32), {"images_b64": "not base64!"}, "not base64"),
    (np.zeros((1, 1, 28, 28), np.float32), {"encoding": "png"}, "params['encoding']"),
]


@pytest.mark.parametrize("x, params, message", BAD)
def test_a_bad_request_is_a_clear_invalid_parameter_error(champion, x, params, message):
    with pytest.raises(MlflowException, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
        champion[1].predict(x, params=params)
    assert caught.value.get_http_status_code() == 400


def _post(port: int, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(champion, module_store):
    """``mlflow models serve`` of the champion as ``make serve`` runs it, on a free port."""
    port, bin_dir = free_port(), str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": tracking.tracking_uri()}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                             f"models:/{tracking.MODEL_NAME}@{tracking.CHAMPION}", "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"mlflow models serve did not answer /ping: {proc.stderr.read().decode()[-3000:]}")
    yield port
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_the_served_champion_answers_and_keeps_serving_after_bad_requests(server, champion, images):
    version, model = champion
    request = {"inputs": images.tolist(), "params": {"output": "anomaly_score"}}
    status, body = _post(server, json.dumps(request).encode())
    assert status == 200, body
    assert body["predictions"]["model_version"] == str(version.version)
    np.testing.assert_allclose(body["predictions"]["nelbo"],
                               model.predict(images, params={"output": "anomaly_score"})["nelbo"], rtol=1e-6)
    bad = {json.dumps({"inputs": np.zeros((2, 784)).tolist()}): "does not match expected shape",
           json.dumps({"inputs": np.full((1, 1, 28, 28), np.nan).tolist()}): "images contain NaN",
           json.dumps({"inputs": [[[["a"] * 28] * 28]]}): "could not convert string to float",
           json.dumps({"inputs": images[:1].tolist(), "params": {"output": "samples", "n": 10**6}}): "params['n']",
           "not json": "valid JSON"}
    for body_text, reason in bad.items():
        status, answer = _post(server, body_text.encode())
        assert 400 <= status < 500, (body_text[:80], status, answer)
        # MLflow puts the data it received before the model's reason: the reason ends the message.
        assert reason in answer["message"].strip().splitlines()[-1] or reason in answer["message"][:200], answer
    status, body = _post(server, json.dumps({"inputs": images.tolist()}).encode())
    assert status == 200 and np.asarray(body["predictions"]["reconstruction"]).shape == (6, 1, 28, 28)
