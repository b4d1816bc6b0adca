"""The ``vae-retraining`` flow: retrain when something changed, move ``champion`` only for a real gain.

1. The base config: the champion's (``source="champion"``; the preset when there is none yet) or
   the best trial of an Optuna study (``source="best_trial"``; the newest study unless named),
   with ``overrides`` on top.
2. Anything changed since the champion (data digest, config, code version:
   :func:`pipelines.promotion.what_changed`)? If not, the flow ends at once, ``Completed``, with
   that reason: retraining would only reproduce the champion (``force`` retrains anyway).
3. The ``vae-training`` flow as a subflow: a new ``vae-mnist`` version aliased ``challenger``.
4. Champion and challenger are scored on the same held-out validation images with the same seeds
   (:func:`pipelines.promotion.compare_on_validation`); the challenger becomes ``champion`` when
   there is no champion, or when its bound is lower by more than 2 standard errors of the paired
   per-image difference (:func:`pipelines.promotion.decide`). The test set never decides: both
   test figures are reported beside it.
5. The decision, both validation and test figures, the difference, its SE and the reason are tags
   on the challenger's run and model version, and a Prefect markdown artifact. No version is
   ever deleted.

A challenger run that was stopped (SIGTERM) or failed prints ``python -m pipelines.retraining
--resume RUN_ID``: that finishes the run from its ``last.pth``, then takes steps 4 and 5.
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
from prefect.states import Completed

import tracking
from pipelines import console, promotion, registry, tasks
from pipelines.training import (DEFAULT_IW_K, TRACKING_WAIT_S, add_eval_arguments, build_config, check_eval_options,
                                check_inputs, vae_training)
from tuning.options import default_storage
from tuning.study import best_config, best_config_path
from vae.cli import run_cli
from vae.config import ConfigError, validate_config
from vae.likelihood import likelihood_protocol, likelihood_reference


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


def retraining_config(source: str, study_name: str | None, preset: str, overrides: dict[str, Any] | None,
                      resume_run_id: str | None) -> tuple[dict[str, Any], str]:
    """(config, where it came from): the base config with ``overrides``, or the resumed run's own
    (what changed since the champion was decided when that run started)."""
    if resume_run_id:
        return tasks.resumed_config(resume_run_id, overrides), f"run {resume_run_id}, resumed"
    base, origin = base_config(source, study_name, preset)
    return validate_config({**base, **(overrides or {})}).to_dict(), origin


@task(name="score-champion-test", cache_policy=NO_CACHE, **tasks.RETRY)
def score_champion_test(champion: dict[str, Any] | None, data_ref: dict[str, Any], challenger_config: dict[str, Any],
                        iw_k: int, eval_max_images: int) -> float | None:
    """The champion's test IW bound under the challenger's protocol (same images, k, seed): reported
    beside the challenger's, never compared. None when there is no champion or it is not comparable."""
    if champion is None or any(champion["config"].get(k) != challenger_config.get(k) for k in promotion.COMPARABLE_KEYS):
        return None
    model = registry.load_vae(champion["uri"], tracking.get_client())
    cfg = validate_config({**champion["config"], "seed": challenger_config["seed"], "device": "cpu"})
    metrics = tasks.evaluate_model(model, tasks.load_data(data_ref), cfg, k=iw_k, max_test_images=eval_max_images,
                                   probe=False, fid=False)
    return metrics[tasks.score_key(iw_k)]


def check_val_compare_images(value: Any) -> None:
    """Raises ConfigError unless ``value`` is an integer >= 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError([f"val_compare_images: must be an integer >= 0 (0 = all), got {value!r}"])


def _figure(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def decision_tags(version: str, comparison: dict[str, Any] | None, test: dict[str, Any], promote: bool,
                  reason: str) -> dict[str, str]:
    """The decision's record on the challenger's run and version: validation figures (which decide),
    the paired difference and its SE, and both test figures (reported only)."""
    c = comparison if comparison and not comparison["not_comparable"] else {}
    return {tracking.TAG_DECISION: "promoted" if promote else "kept", tracking.TAG_DECISION_REASON: reason,
            tracking.TAG_SCORE_METRIC: (comparison or {}).get("key", ""),
            tracking.TAG_CHALLENGER_SCORE: f"{_figure(c.get('challenger')):.6f}",
            tracking.TAG_CHAMPION_SCORE: f"{_figure(c.get('champion')):.6f}",
            tracking.TAG_SCORE_DIFFERENCE: f"{_figure(c.get('difference')):.6f}",
            tracking.TAG_SCORE_DIFFERENCE_SE: f"{_figure(c.get('se')):.6f}",
            tracking.TAG_COMPARE_IMAGES: str(c.get("images", 0)),
            tracking.TAG_CHALLENGER_TEST: f"{_figure(test['challenger']):.6f}",
            tracking.TAG_CHAMPION_TEST: f"{_figure(test['champion']):.6f}",
            "retrain.champion_version": comparison["champion_version"] if comparison else "",
            "retrain.challenger_version": version}


def decision_markdown(out: dict[str, Any]) -> str:
    """The Prefect artifact: the decision, both models' validation and test figures, the rule."""
    def f(value: float | None) -> str:
        return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"
    champ = out["previous_champion_version"] or "none"
    paired = (f"Paired difference (challenger - champion) on {out['compare_images']} validation images held out "
              f"from both, same seeds: {f(out['difference'])} nats, standard error {f(out['difference_se'])}. "
              if out["compare_images"] else "")
    return (f"# Retraining decision: **{out['decision']}**\n\n{out['reason']}\n\n"
            f"| | version | `{out['score_key']}` (decides) | `{out['test_key']}` (reported) |\n|---|---|---|---|\n"
            f"| challenger | {out['challenger_version']} | {f(out['challenger_score'])} | {f(out['challenger_test'])} |\n"
            f"| champion | {champ} | {f(out['champion_score'])} | {f(out['champion_test'])} |\n\n"
            f"{paired}Rule: {RULE}.\n\nTest figures: {out['protocol']}.\n\n"
            f"MLflow run: [{out['run_id']}]({out['run_link']})\n")


RULE = (f"promote when there is no champion, or when the challenger's validation bound is lower by more than "
        f"{promotion.MARGIN_SE:g} standard errors of the paired per-image difference; the test set is never used")


@task(name="apply-decision", cache_policy=NO_CACHE, **tasks.RETRY)
def apply_decision(run: dict[str, Any], comparison: dict[str, Any] | None, test: dict[str, Any], promote: bool,
                   reason: str, protocol: str) -> dict[str, Any]:
    """Move ``champion`` (if promoted) and record the decision on the run, the version and in Prefect."""
    client = tracking.get_client()
    version = str(run["model_version"]["version"])
    tags = decision_tags(version, comparison, test, promote, reason)
    if promote:
        registry.set_alias(client, tracking.CHAMPION, version)
    for k, v in tags.items():
        client.set_tag(run["run_id"], k, v)
        client.set_model_version_tag(tracking.MODEL_NAME, version, k, v)
    c = comparison if comparison and not comparison["not_comparable"] else {}
    before = comparison["champion_version"] if comparison else None
    out = {"decision": tags[tracking.TAG_DECISION], "reason": reason, "challenger_version": version,
           "champion_version": version if promote else before, "previous_champion_version": before,
           "score_key": (comparison or {}).get("key", ""), "challenger_score": c.get("challenger"),
           "champion_score": c.get("champion"), "difference": c.get("difference"), "difference_se": c.get("se"),
           "compare_images": c.get("images", 0), "test_key": test["key"], "challenger_test": test["challenger"],
           "champion_test": test["champion"], "protocol": protocol, "run_id": run["run_id"],
           "run_link": tracking.run_link(client, run["experiment_id"], run["run_id"])}
    create_markdown_artifact(key="vae-retraining-decision", markdown=decision_markdown(out),
                             description=f"retraining decision for version {version}")
    return out


def pending(run: dict[str, Any], champion: dict[str, Any] | None, origin: str, changes: list[str]) -> dict[str, Any]:
    """The decision 'pending': the challenger trained but is not registered yet."""
    reason = ("the challenger is not registered yet (the tracking server was away when training ended); "
              "`.venv/bin/python -m pipelines.sync` registers it, then rerun to decide")
    print(reason)
    return {**dict.fromkeys(JSON_KEYS), "decision": "pending", "reason": reason, "run_id": run["run_id"],
            "champion_version": champion["version"] if champion else None, "source": origin,
            "changes": changes, "decided_on": None}


def unchanged(champion: dict[str, Any], origin: str, data_digest: str, code_version: str) -> dict[str, Any]:
    """The flow's result when nothing changed since the champion: nothing trained, nothing registered."""
    reason = (f"nothing changed since the champion (version {champion['version']}): same data ({data_digest[:12]}), "
              f"config and code ({code_version[:12]}); nothing trained")
    create_markdown_artifact(key="vae-retraining-decision", description="retraining skipped: nothing changed",
                             markdown=f"# Retraining decision: **unchanged**\n\n{reason}\n")
    return {"decision": "unchanged", "reason": reason, "challenger_version": None,
            "champion_version": champion["version"], "previous_champion_version": champion["version"],
            "score_key": "", "challenger_score": None, "champion_score": None, "difference": None,
            "difference_se": None, "compare_images": 0, "test_key": "", "challenger_test": None,
            "champion_test": None, "protocol": "", "run_id": None, "run_link": None, "source": origin,
            "changes": [], "decided_on": None}


@flow(name="vae-retraining", log_prints=True)
def vae_retraining(source: Literal["champion", "best_trial"] = "champion", study_name: str | None = None,
                   preset: str = "small", overrides: dict[str, Any] | None = None, iw_k: int = DEFAULT_IW_K,
                   eval_max_images: int = 0, eval_max_train_images: int = 0, eval_probe: bool = True,
                   eval_fid: bool = True, figures: bool = True, val_compare_images: int = 0,
                   force: bool = False, resume_run_id: str | None = None,
                   tracking_wait_s: float = TRACKING_WAIT_S) -> dict[str, Any]:
    """Retrain from the champion's (or the best trial's) config when something changed; promote
    only a model better on validation images by more than noise explains.

    Args:
        source: 'champion' (its config; ``preset`` when there is no champion) or 'best_trial'.
        study_name: the Optuna study for 'best_trial' (default: the newest).
        overrides: config keys changed from the base config (e.g. ``{"num_epochs": 20}``).
        iw_k, eval_max_images, eval_max_train_images, eval_probe, eval_fid, figures: as in
            ``vae-training``; ``iw_k`` is also the k of the validation comparison.
        val_compare_images: compare on the first N held-out validation images (0 = all).
        force: retrain even when nothing changed since the champion.
        resume_run_id: finish this stopped (or failed) challenger run from its ``last.pth``, with
            its stored config (``overrides`` may change what ``vae-training``'s resume allows, and
            must name its ``checkpoint_dir`` if that is not ``checkpoints``), then decide as usual.
        tracking_wait_s: as in ``vae-training``: how long the end of training waits for a tracking
            server that is away before the challenger is left for ``pipelines.sync`` (decision 'pending').
    Returns:
        decision (promoted | kept | unchanged | pending), reason, versions, validation and test figures,
        the paired difference and its SE, the challenger's run id.
    """
    if source not in ("champion", "best_trial"):
        raise ConfigError([f"source: must be 'champion' or 'best_trial', got {source!r}"])
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError([f"overrides: must be a mapping of config keys to values, got {overrides!r}"])
    check_eval_options(iw_k, eval_max_images, eval_max_train_images)
    check_val_compare_images(val_compare_images)
    config, origin = retraining_config(source, study_name, preset, overrides, resume_run_id)
    data_ref = tasks.prepare_data(config["data_dir"], config["dataset"])
    champion, code = promotion.load_champion(), tracking.git_commit()
    changes = promotion.what_changed(champion, config, data_ref["digest"], code)
    if not changes and not force and not resume_run_id:
        out = unchanged(champion, origin, data_ref["digest"], code)
        print(out["reason"])
        return Completed(message=out["reason"], data=out)  # the run's state says why it did nothing
    print(f"retraining from the {origin}; changed since the champion: {'; '.join(changes) or 'nothing (forced)'}")
    run = vae_training(preset=preset, overrides=config, iw_k=iw_k, eval_max_images=eval_max_images,
                       eval_max_train_images=eval_max_train_images, eval_probe=eval_probe, eval_fid=eval_fid,
                       figures=figures, run_kind="retraining", resume_run_id=resume_run_id,
                       tracking_wait_s=tracking_wait_s)
    if run["model_version"] is None:  # the tracking server was away at the end: nothing to promote yet
        return pending(run, champion, origin, changes)
    comparison = promotion.compare_on_validation(champion, run["best_model_path"], config, data_ref, iw_k,
                                                 val_compare_images)
    promote, reason = promotion.decide(comparison)
    print(("promoted: " if promote else "kept the champion: ") + reason)
    test = {"key": run["score_key"], "challenger": run["metrics"][run["score_key"]],
            "champion": score_champion_test(champion, data_ref, config, iw_k, eval_max_images)}
    loss_type, binarize = config["reconstruction_loss_type"], config["binarize"]
    protocol = (f"{likelihood_protocol(loss_type, binarize, iw_k, eval_max_images)} "
                f"({likelihood_reference(loss_type, binarize)})")
    return {**apply_decision(run, comparison, test, promote, reason, protocol), "source": origin,
            "changes": changes, "decided_on": comparison}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.retraining", description="Run the vae-retraining flow once.")
    p.add_argument("--source", choices=("champion", "best_trial"), default="champion", help="base config (default: champion)")
    p.add_argument("--study_name", default=None, help="Optuna study for --source best_trial (default: the newest)")
    p.add_argument("--num_epochs", type=int, default=None, help="override the base config's epochs")
    add_eval_arguments(p)
    p.add_argument("--val_compare_images", type=int, default=0,
                   help="compare champion and challenger on the first N held-out validation images (0 = all)")
    p.add_argument("--force", action="store_true", help="retrain even when nothing changed since the champion")
    p.add_argument("--resume", metavar="RUN_ID", default=None,
                   help="finish this stopped or failed challenger run from its last.pth, then decide")
    p.add_argument("--checkpoint_dir", default=None, help="with --resume: the folder the run trained under "
                                                          "(default: checkpoints)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (for scripts) instead of a summary")
    return p


JSON_KEYS = ("decision", "reason", "challenger_version", "champion_version", "previous_champion_version",
             "score_key", "challenger_score", "champion_score", "difference", "difference_se", "compare_images",
             "test_key", "challenger_test", "champion_test", "protocol", "run_id")  # --json's fields


def summary_text(out: dict[str, Any]) -> str:
    """The decision as a user reads it: what happened, both models' figures, the rule, the run."""
    def score(value: float | None) -> str:
        return "none" if value is None or not math.isfinite(value) else f"{value:.2f}"
    if out["decision"] in ("unchanged", "pending"):
        return "\n".join([f"retraining {out['decision']}: {out['reason']}", f"  champion:     version {out['champion_version']}",
                          f"  based on:     {out['source']}"])

    def figures(version, val, test) -> str:
        return (f"version {version}, {out['score_key'] or 'validation'} {score(val)}, "
                f"{out['test_key']} {score(test)} (reported)")
    before = out["previous_champion_version"]
    lines = [f"retraining {out['decision']}: {out['reason']}",
             f"  challenger:   {figures(out['challenger_version'], out['challenger_score'], out['challenger_test'])}",
             "  champion was: " + (figures(before, out["champion_score"], out["champion_test"]) if before
                                   else "none before this run"),
             f"  champion now: version {out['champion_version']}"]
    if out["compare_images"]:
        lines.append(f"  difference:   {out['difference']:+.4f} nats, paired SE {out['difference_se']:.4f}, "
                     f"on {out['compare_images']} validation images")
    return "\n".join([*lines, f"  rule:         {RULE}", f"  test figures: {out['protocol']}",
                      f"  based on:     {out['source']}", f"  run page:     {out['run_link']}"])


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    given = {"num_epochs": args.num_epochs, "checkpoint_dir": args.checkpoint_dir}
    overrides = {k: v for k, v in given.items() if v is not None} or None
    if args.checkpoint_dir is not None and not args.resume:
        raise ConfigError(["--checkpoint_dir: only with --resume (a new run trains under its base config's folder)"])
    check_eval_options(args.iw_k, args.eval_max_images, args.eval_max_train_images)
    check_val_compare_images(args.val_compare_images)
    tracking.get_client()  # an unreachable tracking server: one line before any flow run starts
    if args.resume:  # the run's stored config (a bad id or folder: one line, before any flow starts)
        config = tasks.resumed_config(args.resume, overrides)
    else:
        base, _ = base_config.fn(args.source, args.study_name, "small")
        config = validate_config({**base, **(overrides or {})}).to_dict()
    check_inputs(config)
    out = vae_retraining(source=args.source, study_name=args.study_name, overrides=overrides, iw_k=args.iw_k,
                         eval_max_images=args.eval_max_images, eval_max_train_images=args.eval_max_train_images,
                         val_compare_images=args.val_compare_images, force=args.force, resume_run_id=args.resume)
    if args.json:
        print(console.dumps({k: out[k] for k in JSON_KEYS}))
    else:
        print(summary_text(out))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(_main))
