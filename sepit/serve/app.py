"""Build the SEPIT Serve application, and the ``sepit serve`` command.

Three ways to run the same application:

* ``sepit serve --model DIR`` (or ``python jobs/serve.py --model DIR``): starts or joins Ray,
  starts Serve on ``host:port`` (loopback by default), deploys, waits until the replicas are warm
  and serves until interrupted (or returns at once with ``--detach`` on an existing cluster);
* ``serve deploy cluster/serve_config.yaml`` / ``serve run``: Ray Serve calls
  :func:`app_builder` with the YAML's ``args`` (``ServeConfig`` fields, or ``config: file.yaml``);
* Python: ``serve.run(build_app(ServeConfig(model_dir=...)))``.

The application is two deployments: ``SepitIngress`` (FastAPI, no model, CPU only) and
``SepitModelRunner`` (one model per replica, on CPU or one GPU, continuous batching).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from dataclasses import replace
from typing import Any, Optional

from sepit.config.base import ConfigError, from_dict, load_config, load_yaml, merge
from sepit.errors import SepitError
from sepit.serve.config import ServeConfig

RUNNER_NAME = "SepitModelRunner"
INGRESS_NAME = "SepitIngress"


def model_runner_deployment(config: ServeConfig):
    """The model-replica deployment: one model per replica, CPU or one GPU, fixed or autoscaled."""
    from ray import serve

    from sepit.serve.model_runner import SepitModelRunner

    options: dict[str, Any] = {
        "name": RUNNER_NAME,
        "ray_actor_options": {"num_cpus": config.num_cpus_per_replica, "num_gpus": config.num_gpus_per_replica},
        "max_ongoing_requests": config.max_ongoing_requests,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 60.0,
    }
    if config.autoscaling is not None:
        options["autoscaling_config"] = config.autoscaling.to_serve()
    else:
        options["num_replicas"] = config.replicas
    return serve.deployment(SepitModelRunner, **options)


def ingress_deployment(config: ServeConfig):
    """The HTTP ingress deployment (no model, no CPU reservation)."""
    from ray import serve

    from sepit.serve.ingress import SepitIngress

    max_runners = config.autoscaling.max_replicas if config.autoscaling else config.replicas
    # It only validates and forwards, but must admit enough concurrent requests to fill every
    # model replica's batches.
    return serve.deployment(SepitIngress, name=INGRESS_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0},
                            max_ongoing_requests=max(config.max_ongoing_requests * max_runners, 16))


def build_app(config: ServeConfig):
    """The Serve application (ingress bound to the model runner) for ``config``."""
    from sepit.serve.auth import resolve_api_key_digest

    runner = model_runner_deployment(config).bind(config)
    return ingress_deployment(config).bind(config, runner, resolve_api_key_digest(config))


def config_from_args(args: dict[str, Any]) -> ServeConfig:
    """``ServeConfig`` from a ``serve deploy`` args mapping; ``config: path.yaml`` is read first."""
    args = dict(args or {})
    path = args.pop("config", None)
    data = load_yaml(path) if path else {}
    return from_dict(ServeConfig, merge(data, args))


def app_builder(args: dict):
    """Application builder for ``serve deploy`` / ``serve run`` (``import_path: sepit.serve.app:app_builder``)."""
    return build_app(config_from_args(args))


# --------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", help="exported model folder (ServeConfig.model_dir); also s3://..., "
                        "models:/NAME@ALIAS or runs:/RUN_ID/model (from MLFLOW_TRACKING_URI)")
    parser.add_argument("--config", metavar="YAML", help="ServeConfig YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set limits.max_questions=4 (repeatable)")
    parser.add_argument("--host", help="bind address (default 127.0.0.1: loopback only)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--replicas", type=int, help="model replicas")
    parser.add_argument("--num-gpus", type=float, choices=[0, 1], help="GPUs per model replica (0 or 1)")
    parser.add_argument("--max-batch-size", type=int, help="most rows decoding together per replica")
    parser.add_argument("--api-key-env", help="environment variable holding the API key (default SEPIT_API_KEY)")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or a new local Ray)")
    parser.add_argument("--num-cpus", type=int, help="logical CPUs of a new local Ray")
    parser.add_argument("--log-dir", default="runs/serve",
                        help="Ray Serve and replica output goes to LOG_DIR/logs/ (default runs/serve; --verbose shows it)")
    parser.add_argument("--detach", action="store_true",
                        help="deploy and return (only with an existing cluster; the app keeps running there)")


def cli_config(args: argparse.Namespace) -> ServeConfig:
    overrides = list(args.overrides)
    for flag, key in (("model", "model_dir"), ("host", "host"), ("port", "port"), ("replicas", "replicas"),
                      ("num_gpus", "num_gpus_per_replica"), ("max_batch_size", "max_batch_size"),
                      ("api_key_env", "api_key_env")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(ServeConfig, args.config, overrides=overrides)


def deploy(config: ServeConfig, address: Optional[str] = None, num_cpus: Optional[int] = None) -> str:
    """Start/join Ray, start Serve on ``config.host:port``, deploy and wait until warm; return the URL."""
    from ray import serve

    from sepit.ray_runtime import init_ray

    init_ray(address=address, num_cpus=num_cpus)
    serve.start(http_options={
        "host": config.host, "port": config.port,
        # Backstop only: the ingress answers 504 itself at request_timeout_s.
        "request_timeout_s": config.request_timeout_s + 30.0,
    })
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    prefix = config.route_prefix.rstrip("/")
    return f"http://{config.host}:{config.port}{prefix}"


def check_model_folder(path: str) -> None:
    """Fail fast (before starting Ray) when ``path`` is not an exported SEPIT model folder."""
    from sepit.models.io import read_config
    from sepit.models.sepit_lm import MODEL_TYPE

    data = read_config(path)
    if data.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{path}: config.json is not a sepit model (model_type={data.get('model_type')!r})")


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from sepit.ray_runtime import cluster_address
    from sepit.serve.auth import resolve_api_key_digest

    try:
        config = cli_config(args).require_model_dir()
        from sepit.tracking.models import is_model_uri, localize_model, pin_model_uri

        if is_model_uri(config.model_dir):  # models:/NAME@ALIAS -> one version for every replica
            config = replace(config, model_dir=pin_model_uri(config.model_dir), model_name=config.served_model_name)
        check_model_folder(str(localize_model(config.model_dir)))  # an s3:// / MLflow model is fetched (and cached) here too
    except SepitError as exc:
        print(f"sepit serve: {exc}", file=sys.stderr)
        return 2
    auth_on = resolve_api_key_digest(config) is not None
    if config.host not in ("127.0.0.1", "localhost", "::1") and not auth_on:
        print(f"sepit serve: WARNING: listening on {config.host} without an API key "
              f"(set {config.api_key_env} to require one)", file=sys.stderr)
    joined = bool(cluster_address(args.address))
    from sepit.console import capture_logs

    with capture_logs(args.log_dir) as logs:  # Ray Serve's and the replicas' output -> <log-dir>/logs/
        url = deploy(config, address=args.address, num_cpus=args.num_cpus)
        print(f"sepit serve: model {config.served_model_name!r} ready at {url} (docs: {url.rstrip('/')}/docs, "
              f"auth {'on' if auth_on else 'off'}; Ray Serve logs: {logs})", flush=True)
        if args.detach and joined:
            return 0
        if args.detach:
            print("sepit serve: --detach needs an existing cluster (--address); serving in the foreground",
                  file=sys.stderr)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        if joined:
            serve.delete(config.app_name)  # leave the cluster as we found it
        else:
            ray.shutdown()  # stops the local Ray (and Serve with it) that deploy() started
    print("sepit serve: stopped", flush=True)
    return 0
