"""Compare the runs of an MLflow experiment: the best first, what differs between them, a chart.

``python -m pipelines.compare --experiment vae-sweep --metric val/nelbo`` writes ``runs.csv``
(every run, every param and final metric), ``runs.md`` and ``<metric>_tradeoffs.png`` into
``--out`` (default ``outputs/compare/<experiment>``) and prints the table:

- one row per run that trained a model: a sweep's parent run (the one its trials name in the tag
  ``mlflow.parentRunId``) holds no model and is left out;
- sorted by the metric, best first (lower is better for likelihoods and losses, higher for
  ``*acc*`` and ``active_units``), runs without it last; for a likelihood, its unit;
- columns: run name, status, the swept params (those whose values differ between the runs, such
  as ``loss.beta``, ``train.learning_rate``, ``model.latent_dim``; ``--param`` adds more), the metric;
- the chart: the metric against each swept param, one panel each (log x for the learning rate
  and any param whose values span a factor of 20 or more), the best runs labelled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

import tracking
from vae.likelihood import likelihood_unit

matplotlib.use("Agg")

PARENT_TAG = "mlflow.parentRunId"
HIGHER_IS_BETTER = ("acc", "active_units")  # metric names containing these: higher is better
# Params that differ between runs without being a choice a user compares (each trial's folder, ...).
BOOKKEEPING = ("run.experiment_name", "run.checkpoint_dir", "data.data_dir", "run.device", "run.progress")
LABELLED = 3  # best runs named on the chart


class CompareError(ValueError):
    """Bad command-line input: unknown experiment, metric or param."""


def runs_frame(experiment: str, client=None) -> pd.DataFrame:
    """One row per run of ``experiment`` that is not a parent of other runs (newest first): params
    and final metrics as columns (``params.<name>``, ``metrics.<name>``)."""
    client = client or tracking.get_client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise CompareError(f"no experiment named {experiment!r} in {tracking.tracking_uri()} (experiments: {names})")
    found = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=10000)
    parents = {run.data.tags[PARENT_TAG] for run in found if PARENT_TAG in run.data.tags}
    rows = [{"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
             "start_time": pd.Timestamp(run.info.start_time, unit="ms"),
             **{f"tags.{k}": run.data.tags.get(k) for k in (tracking.TAG_RUN_KIND, tracking.TAG_DATASET_DIGEST)},
             **{f"params.{k}": _number(v) for k, v in sorted(run.data.params.items())},
             **{f"metrics.{k}": v for k, v in sorted(run.data.metrics.items())}}
            for run in found if run.info.run_id not in parents]
    return pd.DataFrame(rows)


def _number(text: str):
    """Params are strings in MLflow; give numbers back as numbers so they sort and plot."""
    for cast in (int, float):
        try:
            return cast(text)
        except (TypeError, ValueError):
            pass
    return text


def lower_is_better(metric: str) -> bool:
    return not any(word in metric for word in HIGHER_IS_BETTER)


def sort_by_metric(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Best first; runs without the metric (or NaN) last."""
    return df.sort_values(f"metrics.{metric}", ascending=lower_is_better(metric), na_position="last",
                          kind="stable").reset_index(drop=True)


def swept_params(df: pd.DataFrame) -> list[str]:
    """The params (without ``params.``) whose values differ between the runs, bookkeeping aside."""
    cols = [c for c in df.columns if c.startswith("params.") and c.split(".", 1)[1] not in BOOKKEEPING]
    return [c.split(".", 1)[1] for c in cols if df[c].astype(str).nunique() > 1]


def check_columns(df: pd.DataFrame, metric: str, params: list[str]) -> None:
    for name, kind in ((metric, "metric"), *((p, "param") for p in params)):
        if f"{kind}s.{name}" not in df.columns:
            have = sorted(c.split(".", 1)[1] for c in df.columns if c.startswith(f"{kind}s."))
            raise CompareError(f"no {kind} {name!r} in these runs (have: {', '.join(have) or 'none'})")


def to_markdown(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    """A GitHub-flavoured markdown table (no tabulate needed); headers without their prefixes."""
    df = df[columns] if columns else df
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")  # noqa: E731
    heads = [c.split(".", 1)[1] if c.startswith(("params.", "metrics.")) else c for c in df.columns]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _log_scale(param: str, values: pd.Series) -> bool:
    """Log x for a learning rate, and for any positive param spanning a factor of 20 or more."""
    numbers = pd.to_numeric(values, errors="coerce").dropna()
    if len(numbers) < 2 or not (numbers > 0).all():
        return False
    return param.endswith("learning_rate") or numbers.max() / numbers.min() >= 20


def tradeoff_figure(df: pd.DataFrame, metric: str, params: list[str]) -> Figure:
    """The metric against each param, one panel each, the best runs (``df`` is sorted) labelled;
    with no param, the metric per run."""
    m = f"metrics.{metric}"
    data = df[df[m].notna()] if m in df.columns else df.iloc[:0]
    panels = params or [None]
    fig = Figure(figsize=(4.5 * len(panels), 4), dpi=100)
    for ax, param in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        x = data[f"params.{param}"] if param else pd.Series(range(len(data)), index=data.index)
        numeric = pd.api.types.is_numeric_dtype(x)
        x = x if numeric else x.astype(str)
        ax.scatter(x, data[m], alpha=0.7)
        for i, (xi, yi, name) in enumerate(zip(x[:LABELLED], data[m][:LABELLED], data["run_name"][:LABELLED])):
            ax.annotate(f"#{i + 1} {name}", (xi, yi), fontsize=7, xytext=(4, 4), textcoords="offset points")
        if numeric and param and _log_scale(param, x):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # the minor ticks' labels overlap
        ax.set_xlabel(param or "run (best first)")
        ax.set_ylabel(f"{metric} ({'lower' if lower_is_better(metric) else 'higher'} is better)")
    fig.suptitle(f"{metric}: {len(data)} runs, best labelled")
    fig.tight_layout()
    return fig


def compare(experiment: str, metric: str, out_dir: str | Path, params: list[str] | None = None) -> dict[str, Path]:
    """Write ``runs.csv``, ``runs.md`` and the chart into ``out_dir``; returns their paths.

    Args:
        params: params to show besides the swept ones (None: the swept ones only).
    """
    df = runs_frame(experiment)
    if df.empty:
        raise CompareError(f"experiment {experiment!r} has no runs")
    check_columns(df, metric, params or [])
    df = sort_by_metric(df, metric)
    shown = [*swept_params(df), *(p for p in params or [] if p not in swept_params(df))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chart = out / f"{_slug(metric)}_tradeoffs.png"
    tradeoff_figure(df, metric, shown).savefig(chart)
    df.to_csv(out / "runs.csv", index=False)
    columns = ["run_name", "status", *(f"params.{p}" for p in shown), f"metrics.{metric}"]
    unit = metric_unit(df, metric)
    note = f"Sorted by {metric}, best first ({'lower' if lower_is_better(metric) else 'higher'} is better)"
    (out / "runs.md").write_text(to_markdown(df, columns) + f"\n{note}" + (f"; {unit}" if unit else "") + ".\n")
    return {"csv": out / "runs.csv", "markdown": out / "runs.md", "chart": chart}


def metric_unit(df: pd.DataFrame, metric: str) -> str | None:
    """What a likelihood metric (``*nll*``, ``*nelbo*``) of these runs is measured in; None for
    other metrics, or when the runs differ in decoder or binarisation (then nothing compares)."""
    if not any(word in metric for word in ("nll", "nelbo")):
        return None
    decoders = {(str(row.get("params.loss.reconstruction_loss_type")), str(row.get("params.data.binarize")))
                for _, row in df.iterrows()}
    if len(decoders) != 1:
        return "runs differ in decoder or binarisation: their likelihoods do not compare"
    return likelihood_unit(*decoders.pop(), trainer=not metric.startswith("test/"))


def _slug(name: str) -> str:
    return name.replace("/", "_").replace(".", "_")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae-compare", description="Compare the runs of an MLflow experiment.")
    p.add_argument("--experiment", required=True, help="MLflow experiment name (e.g. vae_demo)")
    p.add_argument("--metric", default="val/nelbo", help="metric to sort and chart by (default: val/nelbo)")
    p.add_argument("--param", action="append", default=None,
                   help="a param to show besides the swept ones, e.g. model.latent_dim (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default: outputs/compare/<experiment>)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or Path("outputs") / "compare" / args.experiment
    paths = compare(args.experiment, args.metric, out, args.param)
    print(paths["markdown"].read_text(), end="")
    print("\n".join(f"{k}: {v.resolve()}" for k, v in paths.items()))
    return 0


def cli(argv=None) -> None:
    try:
        code = main(argv)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    cli()
