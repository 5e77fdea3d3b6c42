"""sepit.train: stages 0-2 on Ray Train + DeepSpeed, tracked in MLflow, resumable.

Entry points (each also a ``sepit stageN`` command and a ``jobs/stageN.py`` job):

- :func:`sepit.train.stage0.run_stage0` (:class:`~sepit.train.stage0.Stage0JobConfig`)
- :func:`sepit.train.stage1.run_stage1` (:class:`~sepit.train.stage1.Stage1JobConfig`)
- :func:`sepit.train.stage2.run_stage2` (:class:`~sepit.train.stage2.Stage2JobConfig`)

each returning ``{output_dir, model_dir, mlflow_run_id, tracking_uri, metrics, checkpoint}`` and
taking ``parent_run_id`` to nest under a pipeline run.  Pieces: ``config`` (TrainConfig),
``task`` (what a stage plugs in), ``loop`` (the worker loop), ``launch`` (driver: Ray, MLflow,
export, lineage), ``data`` (Ray Data feeding), ``checkpoint``, ``schedule``,
``deepspeed_config``, ``lineage``, ``step_log``, ``curves``.
"""
