"""The ``vae-retraining`` flow: retrain, compare with the champion, move ``champion`` only if better.

1. The base config: the champion's (``source="champion"``; the preset when there is none yet) or
   the best trial of an Optuna study (``source="best_trial"``; the newest study unless named),
   with ``overrides`` on top.
2. The ``vae-training`` flow as a subflow: a new ``vae-mnist`` version aliased ``challenger``.
3. The champion is scored again on the same test images with the same IW bound (``iw_k``,
   seed), so both numbers come from one protocol.
4. The challenger becomes ``champion`` when there is no champion or its bound is lower. The
   decision, both scores and the reason are tags on the challenger's run and model version, and
   a Prefect markdown artifact. No version is ever deleted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Literal

import optuna
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

import tracking
from pipelines import console, registry, tasks
from pipelines.training import (DEFAULT_IW_K, add_eval_arguments, build_config, check_eval_options, check_inputs,
                                vae_training)
from tuning.options import default_storage
from tuning.study import best_config, best_config_path
from vae.cli import run_cli
from vae.config import ConfigError, validate_config
from vae.likelihood import likelihood_protocol, likelihood_reference

COMPARABLE_KEYS = ("reconstruction_loss_type", "binarize", "dataset")  # a bound means the same only if equal


def newest_study() -> str:
    """The most recently started study in the tuning storage (``tuning.options.default_storage``)."""
    summaries = optuna.get_all_study_summaries(storage=default_storage())
    started = [s for s in summaries if s.datetime_start is not None]
    if not started:
        raise ConfigError([f"source: 'best_trial' needs an Optuna study with trials; none in {default_storage()}"])
    return max(started, key=lambda s: s.datetime_start).study_name


def best_trial_config(study_name: str | None) -> dict[str, Any]:
    """The flat config of a study's best trial: its ``best_config.json`` (written by the sweep),
    else read from the study storage."""
    study_name = study_name or newest_study()
    path = best_config_path(study_name)
    if path.is_file():
        return json.loads(path.read_text())
    return best_config(study_name)


@task(name="base-config", cache_policy=NO_CACHE, **tasks.RETRY)
def base_config(source: str, study_name: str | None, preset: str) -> tuple[dict[str, Any], str]:
    """(config, where it came from) for the retraining run."""
    if source == "best_trial":
        return best_trial_config(study_name), f"best trial of study {study_name or newest_study()!r}"
    champion = registry.version_by_alias(tracking.get_client(), tracking.CHAMPION)
    if champion is None:
        return build_config(preset), f"preset {preset!r} (no champion yet)"
    return registry.version_config(tracking.get_client(), champion), f"champion (version {champion.version})"


@task(name="score-champion", cache_policy=NO_CACHE, **tasks.RETRY)
def score_champion(data_ref: dict[str, Any], challenger_config: dict[str, Any], iw_k: int,
                   eval_max_images: int) -> dict[str, Any] | None:
    """The champion's test IW bound under the challenger's protocol; None when there is no champion."""
    client = tracking.get_client()
    champion = registry.version_by_alias(client, tracking.CHAMPION)
    if champion is None:
        return None
    config = registry.version_config(client, champion)
    differs = [k for k in COMPARABLE_KEYS if config.get(k) != challenger_config.get(k)]
    score = None
    if not differs:
        model = registry.load_vae(registry.model_uri(champion), client)
        cfg = validate_config({**config, "seed": challenger_config["seed"], "device": "cpu"})
        metrics = tasks.evaluate_model(model, tasks.load_data(data_ref), cfg, k=iw_k, max_test_images=eval_max_images,
                                       probe=False, fid=False)
        score = metrics[tasks.score_key(iw_k)]
    return {"version": str(champion.version), "score": score, "not_comparable": differs}


def decide(challenger: float, champion: dict[str, Any] | None, key: str) -> tuple[bool, str]:
    """(promote?, reason). Lower bound is better; ties keep the champion."""
    if champion is None:
        return True, "no champion yet: the first model is promoted"
    if champion["not_comparable"]:
        return False, f"not comparable: champion differs in {', '.join(champion['not_comparable'])}"
    if not math.isfinite(challenger):
        return False, f"challenger's {key} is not finite ({challenger})"
    if challenger < champion["score"]:
        return True, f"challenger {key} {challenger:.4f} < champion {champion['score']:.4f} (lower is better)"
    return False, f"challenger {key} {challenger:.4f} >= champion {champion['score']:.4f} (lower is better)"


@task(name="apply-decision", cache_policy=NO_CACHE, **tasks.RETRY)
def apply_decision(run: dict[str, Any], champion: dict[str, Any] | None, promote: bool, reason: str,
                   protocol: str) -> dict[str, Any]:
    """Move ``champion`` (if promoted) and record the decision on the run, the version and in Prefect."""
    client = tracking.get_client()
    version, key, challenger = str(run["model_version"]["version"]), run["score_key"], run["metrics"][run["score_key"]]
    champion_score = champion["score"] if champion and champion["score"] is not None else float("nan")
    tags = {tracking.TAG_DECISION: "promoted" if promote else "kept", tracking.TAG_DECISION_REASON: reason,
            tracking.TAG_SCORE_METRIC: key, tracking.TAG_CHALLENGER_SCORE: f"{challenger:.6f}",
            tracking.TAG_CHAMPION_SCORE: f"{champion_score:.6f}",
            "retrain.champion_version": champion["version"] if champion else "", "retrain.challenger_version": version}
    if promote:
        registry.set_alias(client, tracking.CHAMPION, version)
    for k, v in tags.items():
        client.set_tag(run["run_id"], k, v)
        client.set_model_version_tag(tracking.MODEL_NAME, version, k, v)
    link = tracking.run_link(client, run["experiment_id"], run["run_id"])
    champ = f"version {champion['version']}: {champion_score:.4f}" if champion else "none"
    create_markdown_artifact(key="vae-retraining-decision", description=f"retraining decision for version {version}",
                             markdown=(f"# Retraining decision: **{tags[tracking.TAG_DECISION]}**\n\n{reason}\n\n"
                                       f"| | version | `{key}` |\n|---|---|---|\n"
                                       f"| challenger | {version} | {challenger:.4f} |\n| champion | {champ} | |\n\n"
                                       f"Score: {protocol}.\n\nMLflow run: [{run['run_id']}]({link})\n"))
    return {"decision": tags[tracking.TAG_DECISION], "reason": reason, "challenger_version": version,
            "challenger_score": challenger, "champion_score": champion_score,
            "champion_version": version if promote else (champion["version"] if champion else None),
            "previous_champion_version": champion["version"] if champion else None}


@flow(name="vae-retraining", log_prints=True)
def vae_retraining(source: Literal["champion", "best_trial"] = "champion", study_name: str | None = None,
                   preset: str = "small", overrides: dict[str, Any] | None = None, iw_k: int = DEFAULT_IW_K,
                   eval_max_images: int = 0, eval_max_train_images: int = 0, eval_probe: bool = True,
                   eval_fid: bool = True, figures: bool = True) -> dict[str, Any]:
    """Retrain from the champion's (or the best trial's) config; promote only a better model.

    Args:
        source: 'champion' (its config; ``preset`` when there is no champion) or 'best_trial'.
        study_name: the Optuna study for 'best_trial' (default: the newest).
        overrides: config keys changed from the base config (e.g. ``{"num_epochs": 20}``).
        iw_k, eval_max_images, eval_max_train_images, eval_probe, eval_fid, figures: as in
            ``vae-training``; the score is ``test/iw_nll_k{iw_k}`` of both models on the same test
            images.
    Returns:
        decision, reason, both versions and scores, and the challenger's run id.
    """
    if source not in ("champion", "best_trial"):
        raise ConfigError([f"source: must be 'champion' or 'best_trial', got {source!r}"])
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError([f"overrides: must be a mapping of config keys to values, got {overrides!r}"])
    check_eval_options(iw_k, eval_max_images, eval_max_train_images)
    base, origin = base_config(source, study_name, preset)
    config = validate_config({**base, **(overrides or {})}).to_dict()
    print(f"retraining from the {origin}")
    run = vae_training(preset=preset, overrides=config, iw_k=iw_k, eval_max_images=eval_max_images,
                       eval_max_train_images=eval_max_train_images, eval_probe=eval_probe, eval_fid=eval_fid,
                       figures=figures, run_kind="retraining")
    data_ref = tasks.prepare_data(config["data_dir"], config["dataset"])
    champion = score_champion(data_ref, config, iw_k, eval_max_images)
    promote, reason = decide(run["metrics"][run["score_key"]], champion, run["score_key"])
    print(("promoted: " if promote else "kept the champion: ") + reason)
    loss_type, binarize = config["reconstruction_loss_type"], config["binarize"]
    protocol = (f"{likelihood_protocol(loss_type, binarize, iw_k, eval_max_images)} "
                f"({likelihood_reference(loss_type, binarize)})")
    return {**apply_decision(run, champion, promote, reason, protocol), "run_id": run["run_id"], "source": origin,
            "score_key": run["score_key"], "protocol": protocol,
            "run_link": tracking.run_link(tracking.get_client(), run["experiment_id"], run["run_id"])}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.retraining", description="Run the vae-retraining flow once.")
    p.add_argument("--source", choices=("champion", "best_trial"), default="champion", help="base config (default: champion)")
    p.add_argument("--study_name", default=None, help="Optuna study for --source best_trial (default: the newest)")
    p.add_argument("--num_epochs", type=int, default=None, help="override the base config's epochs")
    add_eval_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON (for scripts) instead of a summary")
    return p


JSON_KEYS = ("decision", "reason", "challenger_version", "champion_version", "previous_champion_version",
             "challenger_score", "champion_score", "score_key", "protocol", "run_id")  # --json's fields


def summary_text(out: dict[str, Any]) -> str:
    """The decision as a user reads it: what happened, both scores, what the score is, the run."""
    def score(value: float | None) -> str:
        return "none" if value is None or not math.isfinite(value) else f"{value:.2f}"
    before = out["previous_champion_version"]
    return "\n".join([
        f"retraining {out['decision']}: {out['reason']}",
        f"  challenger:   version {out['challenger_version']}, {out['score_key']} {score(out['challenger_score'])}",
        "  champion was: " + (f"version {before}, {out['score_key']} {score(out['champion_score'])}" if before
                              else "none before this run"),
        f"  champion now: version {out['champion_version']}",
        f"  score:        {out['protocol']}",
        f"  based on:     {out['source']}",
        f"  run page:     {out['run_link']}"])


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {"num_epochs": args.num_epochs} if args.num_epochs is not None else None
    check_eval_options(args.iw_k, args.eval_max_images, args.eval_max_train_images)
    tracking.get_client()  # an unreachable tracking server: one line before any flow run starts
    base, _ = base_config.fn(args.source, args.study_name, "small")
    check_inputs(validate_config({**base, **(overrides or {})}).to_dict())
    out = vae_retraining(source=args.source, study_name=args.study_name, overrides=overrides, iw_k=args.iw_k,
                         eval_max_images=args.eval_max_images, eval_max_train_images=args.eval_max_train_images)
    if args.json:
        print(console.dumps({k: out[k] for k in JSON_KEYS}))
    else:
        print(summary_text(out))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(_main))
