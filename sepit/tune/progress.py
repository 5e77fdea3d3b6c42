"""Progress lines of a running sweep (a Ray Tune callback on the driver)."""

from __future__ import annotations

import sys

from ray.tune import Callback


class TrialProgress(Callback):
    """One line per trial start / finish / failure (Tune's own table stays terse).  Holds no
    function (Tune pickles its callbacks with the experiment state)."""

    def __init__(self, metric: str):
        self.metric = metric

    def on_trial_start(self, iteration, trials, trial, **info):
        _say(f"[sweep] trial {trial.trial_id} started: {trial.config}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        state = "finished" if last.get("completed") else "stopped early"
        _say(f"[sweep] trial {trial.trial_id} {state}: {self.metric}={last.get(self.metric)} at step {last.get('step')}")

    def on_trial_error(self, iteration, trials, trial, **info):
        _say(f"[sweep] trial {trial.trial_id} FAILED (see {trial.path})")


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
