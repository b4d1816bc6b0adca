"""Compare the runs of an MLflow experiment: a DataFrame of params and final metrics, a chart.

``python -m pipelines.compare --experiment vae_demo --metric test/iw_nll_k1000 --param model.latent_dim``
writes ``runs.csv``, ``runs.md`` and ``<metric>_vs_<param>.png`` into ``--out`` (default
``outputs/compare/<experiment>``) and prints the table. Columns: ``run_id``, ``run_name``, ``status``,
``start_time``, the tags ``run_kind`` and ``dataset_digest``, then ``params.<name>`` and
``metrics.<name>`` (each metric's last logged value).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

import tracking


class CompareError(ValueError):
    """Bad command-line input: unknown experiment, metric or param."""


def runs_frame(experiment: str, client=None) -> pd.DataFrame:
    """One row per run of ``experiment`` (newest first): params and final metrics as columns."""
    client = client or tracking.get_client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise CompareError(f"no experiment named {experiment!r} in {tracking.tracking_uri()} (experiments: {names})")
    rows = []
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=10000):
        rows.append({"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
                     "start_time": pd.Timestamp(run.info.start_time, unit="ms"),
                     **{f"tags.{k}": run.data.tags.get(k) for k in (tracking.TAG_RUN_KIND, tracking.TAG_DATASET_DIGEST)},
                     **{f"params.{k}": _number(v) for k, v in sorted(run.data.params.items())},
                     **{f"metrics.{k}": v for k, v in sorted(run.data.metrics.items())}})
    return pd.DataFrame(rows)


def _number(text: str):
    """Params are strings in MLflow; give numbers back as numbers so they sort and plot."""
    for cast in (int, float):
        try:
            return cast(text)
        except (TypeError, ValueError):
            pass
    return text


def to_markdown(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    """A GitHub-flavoured markdown table (no tabulate needed)."""
    df = df[columns] if columns else df
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def plot_metric(df: pd.DataFrame, metric: str, param: str, path: str | Path) -> Path:
    """A chart of ``metrics.<metric>`` against ``params.<param>``: points, and the mean per value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, p = f"metrics.{metric}", f"params.{param}"
    for col, kind in ((m, "metric"), (p, "param")):
        if col not in df.columns:
            have = sorted(c.split(".", 1)[1] for c in df.columns if c.startswith(kind[:5] + "s."))
            raise CompareError(f"no {kind} {col.split('.', 1)[1]!r} in these runs (have: {', '.join(have) or 'none'})")
    data = df[[p, m]].dropna()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    numeric = pd.api.types.is_numeric_dtype(data[p])
    x = data[p] if numeric else data[p].astype(str)
    ax.scatter(x, data[m], alpha=0.7, label="runs")
    means = data.groupby(p)[m].mean()
    ax.plot(means.index if numeric else means.index.astype(str), means.values, "o-", color="C1", label="mean")
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {param} ({len(data)} runs)")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def compare(experiment: str, metric: str, param: str, out_dir: str | Path) -> dict[str, Path]:
    """Write ``runs.csv``, ``runs.md`` and the chart into ``out_dir``; returns their paths."""
    df = runs_frame(experiment)
    if df.empty:
        raise CompareError(f"experiment {experiment!r} has no runs")
    out = Path(out_dir)
    chart = plot_metric(df, metric, param, out / f"{_slug(metric)}_vs_{_slug(param)}.png")
    df.to_csv(out / "runs.csv", index=False)
    shown = ["run_id", "status", f"params.{param}", f"metrics.{metric}"]
    (out / "runs.md").write_text(to_markdown(df, shown))
    return {"csv": out / "runs.csv", "markdown": out / "runs.md", "chart": chart}


def _slug(name: str) -> str:
    return name.replace("/", "_").replace(".", "_")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae-compare", description="Compare the runs of an MLflow experiment.")
    p.add_argument("--experiment", required=True, help="MLflow experiment name (e.g. vae_demo)")
    p.add_argument("--metric", default="val/nelbo", help="metric to chart (default: val/nelbo)")
    p.add_argument("--param", default="model.latent_dim", help="param on the x axis (default: model.latent_dim)")
    p.add_argument("--out", default=None, help="output folder (default: outputs/compare/<experiment>)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or Path("outputs") / "compare" / args.experiment
    paths = compare(args.experiment, args.metric, args.param, out)
    print(paths["markdown"].read_text(), end="")
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
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
