"""tuning: Optuna sweeps of the VAE, tracked in MLflow, runnable from the CLI or a Prefect flow.

Modules: ``space`` (search space and its grammar), ``options`` (checked sweep options),
``study`` (storages, samplers, pruners, best config), ``objective`` (trial -> config ->
``VAETrainer``), ``runs`` (MLflow parent and trial runs), ``plots`` (study figures), ``sweep``
(running a study in one or more processes), ``worker``, ``flow`` (the ``vae-sweep`` flow) and
``__main__`` (``python -m tuning``).
"""
