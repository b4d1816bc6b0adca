"""Write checkpoints with the code at main 272158d, for tests/vae/test_checkpoint_compat.py."""
import json, shutil, tempfile
from pathlib import Path
import torch
from vae.config import get_default_config
from vae.data import ImageData
from vae.train import VAETrainer
from vae.utils import load_model

out = Path("tests/vae/data")
g = torch.Generator().manual_seed(0)
imgs = (torch.rand(300, 28, 28, generator=g) * 255).to(torch.uint8)
labels = torch.randint(0, 10, (300,), generator=g)
data = ImageData(imgs[:200], labels[:200], imgs[200:], labels[200:], {"x": "0"}, "mnist")
x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
expect = {}
for decoder in ("conv", "autoregressive"):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {**get_default_config(), "hidden_dims": [4, 8], "latent_dim": 2, "num_epochs": 1, "val_size": 50,
               "batch_size": 50, "checkpoint_dir": tmp, "experiment_name": "compat", "progress": False,
               "sample_every": 0, "data_dir": "./data", "decoder": decoder, "ar_channels": 4, "ar_kernel": 3,
               "reconstruction_loss_type": "bce", "device": "cpu"}
        VAETrainer(cfg, data=data).train()
        shutil.copy(Path(tmp) / "compat" / "last.pth", out / f"main-272158d-{decoder}-last.pth")
        model, _ = load_model(out / f"main-272158d-{decoder}-last.pth")
        with torch.no_grad():
            mu, log_var = model.encode(x)
            logits = model.decode_logits(mu, x)
        expect[decoder] = {"mu": mu.tolist(), "log_var": log_var.tolist(), "logits_sum": float(logits.double().sum()),
                           "keys": sorted(model.state_dict())}
(out / "main-272158d-expected.json").write_text(json.dumps(expect))
print({k: len(v["keys"]) for k, v in expect.items()})
