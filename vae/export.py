"""``vae-export``: a checkpoint slimmed to the weights a model is used with.

``best_model.pth`` holds two copies of the weights, the live ones and their EMA (the ones
:func:`~vae.checkpoint.load_model` uses); ``last.pth`` also the optimizer's moments. To keep, ship or
register a model only one copy is needed: :func:`export_weights` writes a checkpoint of the same
format whose ``model_state`` is the chosen copy (EMA by default) and which has nothing to resume
from, checks that it loads to the very same tensors, and never overwrites its source.

    vae-export --model_path checkpoints/my_vae/best_model.pth --output my_vae.pth
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from vae.checkpoint import CheckpointError, load_model, save_checkpoint
from vae.cli import run_cli

__all__ = ["export_weights"]

KEPT = ("config", "epoch", "global_step", "metrics")  # what a user of the model may read; the rest is for resuming


def export_weights(path: str | Path, output: str | Path, use_ema: bool = True) -> dict[str, Any]:
    """Write the weights of checkpoint ``path`` that a model is used with, and its config, to ``output``.

    Args:
        path: a checkpoint written by the trainer (``best_model.pth`` or ``last.pth``).
        output: the slim checkpoint to write (atomically); must not be ``path``.
        use_ema: the EMA weights when the checkpoint has them (what ``load_model`` uses); False
            for the live weights.
    Returns:
        ``{"output", "weights" ("ema" or "live"), "epoch", "bytes_before", "bytes_after"}``.
    Raises:
        CheckpointError: ``path`` is not a usable checkpoint, or ``output`` is ``path``.
    """
    path, output = Path(path), Path(output)
    if output.exists() and output.resolve() == path.resolve():
        raise CheckpointError(f"--output is the checkpoint being exported ({path}); name another file")
    model, state = load_model(path, use_ema=use_ema)  # also checks that the weights fit the config
    weights = "ema" if use_ema and state.get("ema_state") is not None else "live"
    slim = {key: state[key] for key in KEPT if key in state}
    slim.update(model_state=model.state_dict(), ema_state=None, exported={"from": str(path), "weights": weights})
    save_checkpoint(slim, output)
    again, _ = load_model(output)
    if any(not torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values())):
        raise CheckpointError(f"{output}: the written weights differ from {path}'s; the disk may be failing")
    return {"output": str(output), "weights": weights, "epoch": state.get("epoch"),
            "bytes_before": path.stat().st_size, "bytes_after": output.stat().st_size}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae-export", description="Write a checkpoint's weights (EMA when present) "
                                "and config to a slim checkpoint that load_model, vae-sample and vae-evaluate read.")
    p.add_argument("--model_path", required=True, help="checkpoint to export (best_model.pth or last.pth)")
    p.add_argument("--output", required=True, help="the slim checkpoint to write")
    p.add_argument("--live", action="store_true", help="export the live weights instead of their EMA")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = export_weights(args.model_path, args.output, use_ema=not args.live)
    print(f"wrote {out['output']}: the {out['weights']} weights of epoch {out['epoch']}, "
          f"{out['bytes_after'] / 1e6:.1f} MB (from {out['bytes_before'] / 1e6:.1f} MB)")
    return 0


def cli(argv=None) -> None:
    sys.exit(run_cli(_main, argv))


if __name__ == "__main__":
    cli()
