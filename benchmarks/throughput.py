"""Training throughput on the CPU: the project's trainer against a bare loop and pythae.

The contenders train the seed's default architecture (hidden 32-64-128-256, latent 128,
batch 128, MSE) on the same MNIST images:

- ``trainer``: ``VAETrainer(config).train()`` as a user runs it: every epoch with validation,
  ``last.pth``/``best_model.pth``, the metrics file and a sample grid (at the last epoch); AdamW,
  cosine schedule, gradient clipping, EMA; the fast path on (``vae.fast``, the default).
  ``trainer-*`` rows change one config key: ``trainer-plain`` turns the fast path off.
- ``bare``: a plain PyTorch loop over in-memory float tensors with the same ``vae.model.VAE``
  (plain torch.nn layers, contiguous layout, ``torch.optim.Adam``, nothing else): training only.
- ``pythae``: pythae 0.1.2's ``TrainingPipeline`` with the same encoder and decoder (wrapped in
  pythae's ``BaseEncoder``/``BaseDecoder``), AdamW, the same batch sizes, evaluation each epoch and
  its final model save. The encoder and decoder are ``vae.model.VAE``'s, plain torch.nn layers.
- ``pythae-fast-layers``: the same pipeline given the layers of ``vae.fast.accelerate`` (faster
  forms of the same function; contiguous layout, so no matrix forms), to separate what the layers
  give from what the trainer gives.

Every run is a fresh subprocess (so peak RSS is per contender), contenders are interleaved
(A, B, C, A, B, C, ...) and the table shows medians; the headline ratio to pythae is the median of
each round's own ratio, since the contenders of one round ran minutes apart. images/s = training
images x epochs / wall time of the whole call (data already in memory for everyone; loading it is
not timed; nor is building the fast path's kernel, once per machine before the rounds). On a
shared machine the wall clock depends on the neighbours; images per CPU-second (the process's
user+sys time over the same span) is the steadier measure of the work each contender does.

    python -m benchmarks.throughput            # defaults: 10,240 train + 1,024 validation images, 2 epochs, 5 rounds
    python -m benchmarks.throughput --threads 1 --contenders trainer trainer-amp pythae
    python -m benchmarks.throughput --epochs 1 --rounds 1 --train-samples 1280   # a quick look

On a CPU shared with other jobs, set ``OMP_WAIT_POLICY=PASSIVE``: spinning OpenMP threads made every
contender several times slower there. On a quiet CPU it costs up to half the throughput instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.memory import peak_rss_bytes

REPO = Path(__file__).resolve().parents[1]
BATCH, EVAL_BATCH, LR, WD = 128, 512, 1e-3, 1e-4

# name -> config overrides of the trainer rows
TRAINER_VARIANTS = {
    "trainer": {},
    "trainer-plain": {"fast": False},  # the fast path off: plain torch.nn layers, glibc's default heap
    "trainer-contiguous": {"channels_last": False},
    "trainer-no-retain": {"retain_memory": False},  # glibc returns freed activations to the OS every step
    "trainer-compile": {"compile": True},
    "trainer-amp": {"amp": True},  # bf16 autocast: different numerics, so not the headline row
    "trainer-amp-compile": {"amp": True, "compile": True},
}
CONTENDERS = [*TRAINER_VARIANTS, "bare", "pythae", "pythae-fast-layers"]


def _splits(args):
    from vae.data import load_dataset, split_train_val

    data = load_dataset()  # $VAE_DATA_DIR, else ./data
    train, val = split_train_val(data, args.val_size, seed=42, max_train_samples=args.train_samples + args.val_size)
    return data, train, val


def run_trainer(args, name: str) -> dict:
    from vae.config import get_default_config
    from vae.train import VAETrainer

    data, train, _ = _splits(args)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {**get_default_config(), "checkpoint_dir": tmp, "experiment_name": "throughput", "device": "cpu",
               "num_epochs": args.epochs, "max_train_samples": args.train_samples + args.val_size,
               "val_size": args.val_size, **TRAINER_VARIANTS[name]}
        t0, c0 = time.perf_counter(), time.process_time()
        result = VAETrainer(cfg, data=data).train()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ips = [row["train/images_per_s"] for row in result["history"]]
    steps = len(train) // BATCH
    epoch_s = [steps * BATCH / v for v in ips]
    out = {"wall_s": wall, "cpu_s": cpu, "images": steps * BATCH * args.epochs, "train_loop_ips": statistics.median(ips),
           "val_nelbo": result["final_metrics"]["val/nelbo"]}
    if TRAINER_VARIANTS[name].get("compile") and len(epoch_s) > 1:  # compilation happens in the first step
        out["compile_s"] = epoch_s[0] - statistics.median(epoch_s[1:])
        out["train_loop_ips"] = statistics.median(ips[1:])
    return out


def run_bare(args, name: str) -> dict:
    import torch

    from vae.losses import VAELoss
    from vae.model import VAE

    _, train, _ = _splits(args)
    torch.manual_seed(42)
    x_all = train.images.unsqueeze(1).float().div(255)
    model = VAE()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = VAELoss(1.0, "mse")
    n = len(x_all) // BATCH * BATCH
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(x_all))[:n].split(BATCH):
            x = x_all[idx]
            recon, mu, log_var = model(x)
            loss = loss_fn(recon, x, mu, log_var)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "images": n * args.epochs, "train_loop_ips": n * args.epochs / wall}


def _pythae_model(vae):
    """pythae's VAE around ``vae``'s encoder and decoder (wrapped in its BaseEncoder/BaseDecoder)."""
    import torch
    from pythae.models import VAE as PythaeVAE
    from pythae.models import VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.encoder, self.fc_mu, self.fc_log_var = vae.encoder, vae.fc_mu, vae.fc_log_var

        def forward(self, x):
            h = self.encoder(x).flatten(1)
            return ModelOutput(embedding=self.fc_mu(h), log_covariance=self.fc_log_var(h))

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.decoder_input, self.decoder, self.final_layer = vae.decoder_input, vae.decoder, vae.final_layer
            self.shape = (vae.hidden_dims[-1], vae._bottom, vae._bottom)

        def forward(self, z):
            h = self.decoder_input(z).view(-1, *self.shape)
            return ModelOutput(reconstruction=torch.sigmoid(self.final_layer(self.decoder(h))))

    config = VAEConfig(input_dim=(1, 28, 28), latent_dim=vae.latent_dim, reconstruction_loss="mse")
    return PythaeVAE(config, encoder=Encoder(), decoder=Decoder())


def run_pythae(args, name: str) -> dict:
    import logging

    import torch
    from pythae.pipelines import TrainingPipeline
    from pythae.trainers import BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    from vae import fast
    from vae.model import VAE

    logging.getLogger("pythae").setLevel(logging.WARNING)

    class TrainLoopTimer(TrainingCallback):  # time from the first train step to each evaluation
        def __init__(self):
            self.spans, self.t0 = [], None

        def on_train_step_begin(self, training_config, **kwargs):
            self.t0 = time.perf_counter()

        def on_eval_step_begin(self, training_config, **kwargs):
            self.spans.append(time.perf_counter() - self.t0)

    _, train, val = _splits(args)
    torch.manual_seed(42)
    n = len(train) // BATCH * BATCH
    x_train = train.images[:n].unsqueeze(1).float().div(255)
    x_val = val.images.unsqueeze(1).float().div(255)
    model = _pythae_model(fast.accelerate(VAE(), "cpu") if name == "pythae-fast-layers" else VAE())
    timer = TrainLoopTimer()
    with tempfile.TemporaryDirectory() as tmp:
        config = BaseTrainerConfig(output_dir=tmp, num_epochs=args.epochs, per_device_train_batch_size=BATCH,
                                   per_device_eval_batch_size=EVAL_BATCH, learning_rate=LR, optimizer_cls="AdamW",
                                   optimizer_params={"weight_decay": WD}, no_cuda=True)
        t0, c0 = time.perf_counter(), time.process_time()
        TrainingPipeline(model=model, training_config=config)(train_data=x_train, eval_data=x_val, callbacks=[timer])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "images": n * args.epochs, "train_loop_ips": n / statistics.median(timer.spans)}


WORKERS = {**{name: run_trainer for name in TRAINER_VARIANTS}, "bare": run_bare, "pythae": run_pythae,
           "pythae-fast-layers": run_pythae}


def _worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = WORKERS[args.worker](args, args.worker)
    out.update(ips=out["images"] / out["wall_s"], cpu_ips=out["images"] / out["cpu_s"], peak_rss_mb=peak_rss_bytes() / 2**20, threads=torch.get_num_threads())
    print("RESULT " + json.dumps(out), flush=True)


def _spawn(args, name: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--worker", name, "--epochs", str(args.epochs),
           "--train-samples", str(args.train_samples), "--val-size", str(args.val_size), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def round_ratios(results: dict[str, list[dict]], name: str, baseline: str = "pythae", key: str = "ips") -> list[float]:
    """``name``'s figure over the baseline's, round by round: the two ran minutes apart in each round,
    so a machine that speeds up or slows down between rounds moves both alike."""
    return [a[key] / b[key] for a, b in zip(results[name], results[baseline])]


def _table(results: dict[str, list[dict]], baseline: str = "pythae") -> str:
    """One row a contender: medians over rounds, and the ratio to the baseline two ways.

    "× pythae, per round" is the median of the rounds' own ratios (the headline: robust to a VM
    whose speed drifts between rounds); "÷ medians" divides the two medians, which a drift can
    inflate: one run here gave 2.24 that way while the rounds' ratios were 1.24-3.09, median 1.38.
    """
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
           for name, runs in results.items()}
    has_base = baseline in results
    rows = ["| contender | images/s, whole run | × pythae, per round | rounds' ratios | ÷ medians "
            "| images per CPU-second | × pythae, per round | train-loop images/s | peak RSS (MB) | runs (images/s) "
            "| note |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for name, m in med.items():
        if has_base:
            ratios = round_ratios(results, name, baseline)
            ratio, spread = f"**{statistics.median(ratios):.2f}**", ", ".join(f"{r:.2f}" for r in ratios)
            of_medians = f"{m['ips'] / med[baseline]['ips']:.2f}"
            cpu_ratio = f"{statistics.median(round_ratios(results, name, baseline, 'cpu_ips')):.2f}"
        else:
            ratio = spread = of_medians = cpu_ratio = "–"
        runs = ", ".join(f"{r['ips']:.0f}" for r in results[name])
        note = f"compile {m['compile_s']:.1f} s (in epoch 1)" if "compile_s" in m else ""
        rows.append(f"| {name} | {m['ips']:.0f} | {ratio} | {spread} | {of_medians} | {m['cpu_ips']:.0f} | {cpu_ratio} "
                    f"| {m['train_loop_ips']:.0f} | {m['peak_rss_mb']:.0f} | {runs} | {note} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contenders", nargs="+", default=["trainer", "trainer-plain", "pythae"],
                   choices=CONTENDERS)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-samples", type=int, default=10240, help="training images (multiple of 128)")
    p.add_argument("--val-size", type=int, default=1024, help="validation images")
    p.add_argument("--rounds", type=int, default=5, help="interleaved repetitions; the table shows medians")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in every run (0 = torch default)")
    p.add_argument("--json", type=Path, help="also write all runs to this file")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    from vae.fast import bn_act

    bn_act.library()  # the fast path's kernel is built once per machine (~1 s), before the timed runs
    results: dict[str, list[dict]] = {name: [] for name in args.contenders}
    for r in range(args.rounds):
        for name in args.contenders:
            res = _spawn(args, name)
            results[name].append(res)
            print(f"round {r + 1}/{args.rounds} {name:>20}: {res['ips']:7.0f} images/s whole run, "
                  f"{res['cpu_ips']:7.0f} per CPU-s, "
                  f"{res['train_loop_ips']:7.0f} train loop, {res['wall_s']:6.1f} s, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    print(f"\n{args.train_samples} training images x {args.epochs} epochs, {args.val_size} validation images, "
          f"batch {BATCH}, medians of {args.rounds} interleaved rounds\n")
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
