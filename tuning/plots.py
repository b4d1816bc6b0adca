"""The study's figures as PNG files, drawn with ``optuna.visualization.matplotlib`` (no plotly).

Single objective: optimisation history, parameter importances, parallel coordinates, and the
contour of β × latent dimension. Multi-objective: the Pareto front, and the same figures for
each objective. A figure that cannot be drawn yet (too few completed trials, one distinct
value) is skipped with a note instead of failing the sweep.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tuning.space import beta_key

__all__ = ["save_study_plots"]


def save_study_plots(study: optuna.Study, out_dir: Path, metrics: tuple[str, ...], loss_type: str = "vae") -> dict[str, str]:
    """Draw the study's figures into ``out_dir``; returns ``{name: path}`` of those drawn."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; chosen here, not at import
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    names = set().union(*(t.params for t in complete)) if complete else set()
    contour = [p for p in (beta_key(loss_type), "latent_dim") if p in names]
    jobs: dict[str, tuple] = {}
    targets = [(None, metrics[0])] if len(metrics) == 1 else \
        [(lambda t, i=i: t.values[i], m) for i, m in enumerate(metrics)]
    for target, metric in targets:
        suffix = "" if target is None else "_" + metric.replace("/", "_")
        kw = {} if target is None else {"target": target}
        kw["target_name"] = metric
        jobs[f"optimization_history{suffix}"] = (ovm.plot_optimization_history, kw)
        jobs[f"param_importances{suffix}"] = (ovm.plot_param_importances, kw)
        jobs[f"parallel_coordinate{suffix}"] = (ovm.plot_parallel_coordinate, kw)
        if len(contour) == 2:
            jobs[f"contour_beta_latent_dim{suffix}"] = (ovm.plot_contour, {**kw, "params": contour})
    if len(metrics) > 1:
        jobs["pareto_front"] = (ovm.plot_pareto_front, {"target_names": list(metrics)})

    paths = {}
    for name, (plot, kwargs) in jobs.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning, and matplotlib's layout notes
                ax = plot(study, **kwargs)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(max(fig.get_figwidth(), 8), max(fig.get_figheight(), 6))
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            paths[name] = str(path)
        except Exception as e:  # noqa: BLE001 - a figure that needs more trials is not an error
            print(f"  (plot {name} skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            plt.close("all")
    return paths
