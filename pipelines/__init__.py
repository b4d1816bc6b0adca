"""pipelines: the Prefect flows that train, evaluate, register and retrain the VAE.

Modules: ``training`` (the ``vae-training`` flow and the ``vae-pipeline`` command), ``tasks``
(its Prefect tasks, each around one library call), ``registry`` (the ``vae-mnist`` model in
MLflow's registry, aliases ``champion``/``challenger``), ``vae_pyfunc`` (the registered model's
code), ``retraining`` (the ``vae-retraining`` flow: promote only a better model), ``compare``
(runs of an experiment side by side), ``demo`` (``make demo``), ``console`` (what the commands
print: one line for a user's error, strict JSON) and ``local_loop`` (a Prefect server, pool and
worker on loopback). The sweep flow is ``tuning.flow``.
"""
