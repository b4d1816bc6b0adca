"""The ``vae-sweep`` Prefect flow: an Optuna study run as a flow, ending in a markdown artifact.

Its parameters are the user-facing fields of :class:`tuning.options.SweepOptions`, generated
from them as the CLI's flags are (``python -m tuning --help``): the same names and defaults. The
flow checks them first (bad input fails the flow before any trial), runs the sweep with the same
:func:`run_sweep` the CLI calls, and publishes the best trial (or the Pareto front) with the
MLflow link. Deployed by ``prefect.yaml`` as ``tuning/flow.py:vae_sweep``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tuning.options import SweepOptions, make_options
from tuning.sweep import run_sweep
from vae.cli import dataclass_parameters, expand_kwargs

__all__ = ["vae_sweep", "summary_markdown"]

ARTIFACT_KEY = "vae-sweep-summary"


@task(name="run-study", cache_policy=NO_CACHE)
def run_study(options_json: str) -> dict[str, Any]:
    """Run the study's trials (no retries: run the flow again to resume it)."""
    return run_sweep(SweepOptions.from_json(options_json))


@task(name="publish-summary", cache_policy=NO_CACHE)
def publish_summary(summary: dict[str, Any]) -> str:
    return str(create_markdown_artifact(key=ARTIFACT_KEY, markdown=summary_markdown(summary),
                                        description=f"Optuna study {summary['study_name']}"))


@flow(name="vae-sweep", log_prints=True)
@expand_kwargs(*dataclass_parameters(SweepOptions))
def vae_sweep(**options: Any) -> dict[str, Any]:
    """Run trials until a study holds ``n_trials`` finished ones (``fixed``: config keys for every trial, the CLI's
    ``--set``; ``search``: extra parameters, the CLI's ``--search``). Returns the sweep summary."""
    opts = make_options(**options)  # raises SweepError (a ValueError) on bad input, before any work
    summary = run_study(opts.to_json())
    publish_summary(summary)
    return summary


def summary_markdown(s: dict[str, Any]) -> str:
    """The artifact: counts, the best trial (or the Pareto front), best config path, MLflow link."""
    c = s["counts"]
    lines = [f"# Optuna study `{s['study_name']}`", "",
             f"{s['n_trials_run']} trial(s) this run: {c['complete']} complete, {c['pruned']} pruned, "
             f"{c['failed']} failed; {s['trial_epochs']} trial-epochs in {s['wall_s']:.0f} s; "
             f"{s['n_trials_total']} in the study (`{s['storage']}`)."
             + (" **Interrupted**: run the flow again to resume." if s.get("interrupted") else ""), "",
             f"MLflow parent run: [{s['parent_run_id']}]({s['mlflow_link']})", ""]
    if s["best"]:
        b = s["best"]
        lines += [f"## Best trial: {b['number']} ({s['metrics'][0]} = {b['value']:.4f})", "",
                  "| parameter | value |", "|---|---|"]
        lines += [f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in b["params"].items()]
        lines += ["", f"Best config for retraining: `{s['best_config_path']}`"]
    elif s["pareto"]:
        names = s["metrics"]
        lines += ["## Pareto front", "", "| trial | " + " | ".join(names) + " | parameters |",
                  "|---|" + "---|" * len(names) + "---|"]
        lines += [f"| {p['number']} | " + " | ".join(f"{p['values'][n]:.3f}" for n in names)
                  + f" | {p['params']} |" for p in s["pareto"]]
    else:
        lines += ["No completed trial yet."]
    return "\n".join(lines) + "\n"
