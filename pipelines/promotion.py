"""Honest promotion: retrain only when something changed, promote only a gain that noise does not explain.

- :func:`what_changed`: what differs from the champion's run (data digest, config, code
  version); nothing means a retraining would only reproduce the champion.
- :func:`compare_on_validation`: both models scored on the same validation images (held out
  from both: :func:`vae.paired.held_out_images`), binarised once with the same seed, with the same
  seed for the IW bound's samples; the paired per-image difference and its standard error
  (:func:`vae.paired.paired_difference`).
- :func:`decide`: promote when there is no champion, or when the challenger's bound is lower by
  more than :data:`MARGIN_SE` standard errors of that difference. The test set never enters the
  decision: a choice made on it night after night selects on its noise, and the test figure would
  then no longer estimate anything.
"""

from __future__ import annotations

import math
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

import tracking
from pipelines import registry, tasks
from vae.checkpoint import load_model
from vae.config import ConfigError, validate_config
from vae.device import get_device
from vae.paired import COMPARABLE_KEYS, SPLIT_KEYS, held_out_images, paired_difference, per_image_scores

__all__ = ["COMPARABLE_KEYS", "MARGIN_SE", "RUN_ONLY_KEYS", "compare_on_validation", "config_changes", "decide",
           "load_champion", "val_key", "what_changed"]

MARGIN_SE = 2.0  # promote only when better by more than this many standard errors of the paired difference
# Config keys that change where or how fast a run goes, not the model it trains.
RUN_ONLY_KEYS = frozenset({"experiment_name", "checkpoint_dir", "data_dir", "device", "sample_every", "log_every",
                           "progress", "fast", "retain_memory", "channels_last", "compile"})


def val_key(k: int) -> str:
    """The decision's score: the validation IW bound (``val/iw_nll_k{k}``), or ``val/nelbo`` for k = 0."""
    return f"val/iw_nll_k{k}" if k > 0 else "val/nelbo"


@task(name="load-champion", cache_policy=NO_CACHE, **tasks.RETRY)
def load_champion() -> dict[str, Any] | None:
    """The champion's version, model URI, training config and run tags; None when there is none."""
    client = tracking.get_client()
    version = registry.version_by_alias(client, tracking.CHAMPION)
    if version is None:
        return None
    tags = client.get_run(version.run_id).data.tags if version.run_id else {}
    return {"version": str(version.version), "uri": registry.model_uri(version),
            "config": registry.version_config(client, version), "tags": dict(tags)}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The config keys (run-only keys aside) whose values differ, sorted."""
    try:
        a = validate_config(old).to_dict()
    except ConfigError:  # written by older code: nothing can be shown to be the same
        return ["the champion's config (no longer valid)"]
    b = validate_config(new).to_dict()
    return sorted(k for k in set(a) | set(b) if k not in RUN_ONLY_KEYS and a.get(k) != b.get(k))


def what_changed(champion: dict[str, Any] | None, config: dict[str, Any], data_digest: str,
                 code_version: str) -> list[str]:
    """What differs between the champion's training and a retraining now; empty: nothing.

    A code version that is ``unknown`` or ``+dirty`` (uncommitted changes) counts as changed: the
    code cannot be shown to be the champion's. A better best trial (``source="best_trial"``) shows
    as a changed config.
    """
    if champion is None:
        return ["no champion yet"]
    tags = champion["tags"]
    out = []
    if tags.get(tracking.TAG_DATASET_DIGEST) != data_digest:
        out.append(f"data digest {str(tags.get(tracking.TAG_DATASET_DIGEST))[:12]} -> {data_digest[:12]}")
    keys = config_changes(champion["config"], config)
    if keys:
        out.append(f"config ({', '.join(keys)})")
    if code_version == "unknown" or code_version.endswith("+dirty"):
        out.append(f"code version {code_version} (cannot be matched to the champion's)")
    elif tags.get(tracking.TAG_GIT_COMMIT) != code_version:
        out.append(f"code {str(tags.get(tracking.TAG_GIT_COMMIT))[:12]} -> {code_version[:12]}")
    return out


@task(name="compare-on-validation", cache_policy=NO_CACHE, **tasks.RETRY)
def compare_on_validation(champion: dict[str, Any] | None, challenger_model: str, config: dict[str, Any],
                          data_ref: dict[str, Any], iw_k: int, max_images: int = 0) -> dict[str, Any] | None:
    """Both models on the same held-out validation images, same seeds; None when there is no champion.

    Args:
        challenger_model: the challenger's checkpoint (its ``best_model.pth``).
        config: the challenger's flat config: its validation split, seed and device.
        iw_k: the bound's importance samples (0: negative ELBO).
        max_images: score the first N such images only (0 = all).
    Returns:
        ``champion_version``, ``not_comparable`` (config keys that make the bounds differ in
        meaning), ``key``, ``images``, ``challenger``, ``champion`` (mean scores),
        ``difference`` (challenger - champion, mean) and its standard error ``se``.
    """
    if champion is None:
        return None
    out = {"champion_version": champion["version"], "key": val_key(iw_k),
           "not_comparable": [k for k in COMPARABLE_KEYS if champion["config"].get(k) != config.get(k)]}
    if out["not_comparable"]:
        return out
    cfg = validate_config(config)
    device = get_device(cfg.run.device)
    data = tasks.load_data(data_ref)
    champion_split = validate_config(champion["config"]).to_dict()
    images = held_out_images(data.train_images, data.train_labels, {k: config[k] for k in SPLIT_KEYS},
                             {k: champion_split[k] for k in SPLIT_KEYS}, max_images)
    challenger, _ = load_model(challenger_model, device)
    champ = registry.load_vae(champion["uri"], tracking.get_client()).to(device)
    protocol = dict(loss_type=cfg.loss.reconstruction_loss_type, binarize=cfg.data.binarize, k=iw_k, seed=cfg.run.seed)
    stats = paired_difference(per_image_scores(tasks.on_fast_path(challenger, cfg), images, **protocol),
                              per_image_scores(tasks.on_fast_path(champ, cfg), images, **protocol))
    return {**out, "images": stats["images"], "challenger": stats["mean_a"], "champion": stats["mean_b"],
            "difference": stats["difference"], "se": stats["se"]}


def decide(comparison: dict[str, Any] | None) -> tuple[bool, str]:
    """(promote?, reason) from a validation comparison (:func:`compare_on_validation`).

    Promoted: no champion yet, or the challenger's mean bound is lower by more than
    :data:`MARGIN_SE` standard errors of the paired difference. Anything else keeps the champion.
    """
    if comparison is None:
        return True, "no champion yet: the first model is promoted"
    if comparison["not_comparable"]:
        return False, f"not comparable: champion differs in {', '.join(comparison['not_comparable'])}"
    key, n, diff, se = comparison["key"], comparison["images"], comparison["difference"], comparison["se"]
    if n < 2 or not (math.isfinite(diff) and math.isfinite(se)):
        return False, f"no usable comparison on {n} validation image(s) (difference {diff}, SE {se})"
    margin = MARGIN_SE * se
    scores = (f"{key} challenger {comparison['challenger']:.4f} vs champion {comparison['champion']:.4f} "
              f"on {n} validation images: difference {diff:+.4f} nats, paired SE {se:.4f}")
    if -diff > margin:
        return True, f"{scores}; better by more than {MARGIN_SE:g} SE ({margin:.4f})"
    if abs(diff) <= margin:
        return False, f"{scores}; within noise (not more than {MARGIN_SE:g} SE = {margin:.4f} either way)"
    return False, f"{scores}; worse (lower is better)"
