"""Fast checks of the training infrastructure's pieces (no Ray, no DeepSpeed engine)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sepit.config.base import ConfigError, from_dict
from sepit.train.config import TrainConfig
from sepit.train.data import bucketed_batches, shuffled
from sepit.train.deepspeed_config import build_deepspeed_config, check_zero_for_moe
from sepit.train.lineage import ParentNotFoundError, resolve_parent
from sepit.train.schedule import lr_multiplier
from sepit.train.step_log import StepLog, read_step_log


def test_schedule_warmup_then_cosine_to_floor():
    m = [lr_multiplier(s, max_steps=20, warmup_steps=4, decay="cosine", min_lr_ratio=0.1) for s in range(20)]
    assert m[:4] == [0.25, 0.5, 0.75, 1.0]  # first step already moves
    assert m[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(m[4:], m[5:]))  # monotone decay
    assert m[-1] == pytest.approx(0.1)
    lin = [lr_multiplier(s, max_steps=12, warmup_steps=1, decay="linear", min_lr_ratio=0.0) for s in range(12)]
    assert lin[1] == pytest.approx(1.0) and lin[-1] == pytest.approx(0.0) and lin[6] == pytest.approx(0.5)
    assert lr_multiplier(50, max_steps=20, warmup_steps=0, decay="cosine", min_lr_ratio=0.2) == pytest.approx(0.2)


def test_bucketing_pads_less_and_is_deterministic():
    rng = np.random.default_rng(0)
    rows = [{"id": i, "n": int(n)} for i, n in enumerate(rng.integers(10, 500, size=203))]

    def batches(seed):
        return list(bucketed_batches(iter(rows), micro_batch_size=8, window_batches=5,
                                     length_of=lambda r: r["n"], rng=np.random.default_rng(seed)))

    a, b = batches(1), batches(1)
    assert [[r["id"] for r in x] for x in a] == [[r["id"] for r in x] for x in b]
    assert sorted(r["id"] for x in a for r in x) == list(range(203))  # every row exactly once
    assert len(a) == sum(math.ceil(min(40, 203 - s) / 8) for s in range(0, 203, 40))
    padded = sum(len(x) * max(r["n"] for r in x) for x in a)
    naive = sum(len(rows[s:s + 8]) * max(r["n"] for r in rows[s:s + 8]) for s in range(0, 203, 8))
    assert padded < 0.8 * naive  # length buckets cut padding substantially
    assert [[r["id"] for r in x] for x in batches(2)] != [[r["id"] for r in x] for x in a]


def test_shuffle_buffer_is_seeded_permutation():
    rows = [{"i": i} for i in range(100)]
    a = [r["i"] for r in shuffled(iter(rows), 32, np.random.default_rng([0, 1]))]
    b = [r["i"] for r in shuffled(iter(rows), 32, np.random.default_rng([0, 1]))]
    c = [r["i"] for r in shuffled(iter(rows), 32, np.random.default_rng([0, 2]))]
    assert a == b and a != c and sorted(a) == list(range(100)) and a != list(range(100))


def test_train_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="train.zero_stage"):
        TrainConfig(zero_stage=4)
    with pytest.raises(ConfigError, match="offload_optimizer"):
        TrainConfig(offload_optimizer=True, zero_stage=0)
    with pytest.raises(ConfigError, match="unknown field"):
        from_dict(TrainConfig, {"max_step": 3})


def test_deepspeed_config_and_moe_zero3_refusal():
    cfg = TrainConfig(zero_stage=2, micro_batch_size=3, grad_accum_steps=2, grad_clip=0.5)
    ds = build_deepspeed_config(cfg, precision="bf16")
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["zero_allow_untested_optimizer"]
    with pytest.raises(ConfigError, match="ZeRO-3"):
        check_zero_for_moe(3)
    with pytest.raises(ConfigError, match="ZeRO-3"):
        build_deepspeed_config(TrainConfig(zero_stage=3), precision="fp32", moe=True)
    check_zero_for_moe(2)


def test_step_log_keeps_last_value_per_step(tmp_path):
    log = StepLog(tmp_path / "log.jsonl", tracking_uri=None, run_id=None)
    log.log(1, {"loss": 3.0})
    log.log(2, {"loss": 2.5})
    log.log(2, {"loss": 2.4})  # step 2 re-run after a restart
    log.log(2, {"val_loss": 2.6}, kind="val")
    train = read_step_log(tmp_path / "log.jsonl")
    assert list(train) == [1, 2] and train[2]["loss"] == 2.4
    assert read_step_log(tmp_path / "log.jsonl", "val")[2]["val_loss"] == 2.6


def test_resolve_parent(tmp_path):
    model = tmp_path / "stage0" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "lineage.json").write_text(json.dumps({"stage": "stage0", "mlflow_run_id": "a" * 32}))
    ref = resolve_parent(str(tmp_path / "stage0"), None)  # the stage's output folder works too
    assert ref.path == str(model.resolve()) and ref.stage == "stage0" and ref.run_id == "a" * 32
    with pytest.raises(ParentNotFoundError, match="neither"):
        resolve_parent(str(tmp_path / "nope"), None)
    with pytest.raises(ParentNotFoundError, match="model"):
        resolve_parent("0" * 32, f"sqlite:///{tmp_path / 'm.db'}")


class _IdTask:
    """Collates rows to their ids; lengths from the row (what EpochFeeder needs from a task)."""

    def row_length(self, row):
        return row["n"]

    def collate(self, rows, *, train):
        return {"ids": [r["id"] for r in rows]}


def test_epoch_feeder_resumes_mid_epoch_and_prefetches_the_same_batches(ray_local):
    """On a real Ray Data iterator: 2.5 epochs uninterrupted == the same run resumed from a
    recorded (epoch, batch) position, with and without the prefetch thread."""
    import ray.data

    from sepit.train.data import EpochFeeder

    rows = [{"id": i, "n": (i * 37) % 101} for i in range(50)]
    shard = ray.data.from_items(rows).iterator()

    def feeder(**kw):
        return EpochFeeder(shard, _IdTask(), micro_batch_size=4, window_batches=3, seed=7, rank=0,
                           shuffle_rows=16, **kw)

    full, positions = [], []
    f = feeder()
    for _ in range(32):  # 13 batches per epoch
        full.append(f.next_batch()["ids"])
        positions.append((f.epoch, f.batch_in_epoch))
    assert positions[12] == (0, 13) and positions[13] == (1, 1) and f.epoch == 2
    assert sorted(i for b in full[:13] for i in b) == list(range(50))  # an epoch is every row once
    assert full[:13] != full[13:26]  # re-shuffled per epoch

    epoch, pos = positions[17]
    resumed = feeder(epoch=epoch, batch_in_epoch=pos)
    assert [resumed.next_batch()["ids"] for _ in range(14)] == full[18:]
    ahead = feeder(prefetch=3)
    assert [ahead.next_batch()["ids"] for _ in range(32)] == full
    ahead.close()


def test_capped_validation_spans_all_lengths_and_ranks_agree(ray_local):
    import ray

    from sepit.train.data import ValidationRows

    class Task:
        def row_length(self, row):
            return row["n"]

        def collate(self, rows, train):
            return {"n": [r["n"] for r in rows]}

    rng = np.random.default_rng(0)
    items = [{"n": int(n)} for n in rng.integers(1, 1000, size=203)]
    ds = ray.data.from_items(items)
    per_rank = []
    for rank in range(2):
        val = ValidationRows(ds.iterator(), Task(), n_rows=len(items), rank=rank, world=2)
        full = [n for b in val.batches(4) for n in b["n"]]
        capped = [b["n"] for b in val.batches(4, max_batches=5)]
        assert len(full) == 101 and len(capped) == 5 and all(len(b) == 4 for b in capped)
        flat = [n for b in capped for n in b]
        assert flat == sorted(flat) and set(flat) <= set(full)
        # the cap keeps the length range: shortest row in, and rows from the longest tenth too
        assert flat[0] == min(full) and flat[-1] >= sorted(full)[90]
        assert [b["n"] for b in val.batches(4, max_batches=5)] == capped  # same rows every time
        assert len(list(val.batches(4, max_batches=100))) == 26  # a cap above the shard is no cap
        per_rank.append(len(capped))
    assert per_rank[0] == per_rank[1]
