"""A training process that kills itself (SIGKILL) at a chosen point: fault injection for the tests.

    python -m tests.reliability._victim CONFIG.json [--resume] [--kill-after KIND:EPOCH]
                                                    [--kill-mid-write KIND:EPOCH]

``--kill-after last:2`` dies right after ``last.pth`` of epoch 2 is written (the trainer's
``on_checkpoint`` hook); ``--kill-mid-write last:3`` dies halfway through writing that file's
bytes, before the rename (``torch.save`` inside ``save_checkpoint`` writes half and dies).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal

import torch

import vae.checkpoint
from vae.train import Callback, VAETrainer


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfter(Callback):
    def __init__(self, kind: str, epoch: int):
        self.kind, self.epoch = kind, epoch

    def on_checkpoint(self, trainer, path, kind):
        if kind == self.kind and trainer.history and trainer.history[-1]["epoch"] == self.epoch:
            _die()


def kill_mid_write(kind: str, epoch: int) -> None:
    real_save = torch.save
    marker_key = {"last": "optimizer_state", "best": "metrics"}[kind]  # only that file's state has it

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == epoch and marker_key in obj:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _die()
        return real_save(obj, f, *args, **kwargs)

    vae.checkpoint.torch.save = save  # the module object is torch itself: patched in this process only


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-after", default=None)
    p.add_argument("--kill-mid-write", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    callbacks = []
    if args.kill_after:
        kind, epoch = args.kill_after.split(":")
        callbacks.append(KillAfter(kind, int(epoch)))
    if args.kill_mid_write:
        kind, epoch = args.kill_mid_write.split(":")
        kill_mid_write(kind, int(epoch))
    cfg = json.loads(open(args.config).read())
    result = VAETrainer(cfg, callbacks, resume=args.resume).train()
    print(json.dumps({"status": result["status"], "epochs_completed": result["epochs_completed"]}))


if __name__ == "__main__":
    main()
