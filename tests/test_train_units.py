"""Fast checks of the training infrastructure's pieces (no Ray; one small DeepSpeed engine)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sepit.config.base import ConfigError, from_dict, to_dict
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


# --------------------------------------------------------------------------- train.deepspeed passthrough
def test_user_deepspeed_config_merges_over_the_generated_one(tmp_path):
    user = {
        "zero_optimization": {"stage": "auto", "reduce_bucket_size": 1000, "overlap_comm": True},
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "fp16": {"loss_scale_window": 100}, "communication_data_type": "fp32",
    }
    cfg = TrainConfig(zero_stage=2, micro_batch_size=3, grad_accum_steps=2, num_workers=2, deepspeed=user)
    ds = build_deepspeed_config(cfg, precision="fp32")
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["reduce_bucket_size"] == 1000 and zero["overlap_comm"] is True
    assert zero["allgather_bucket_size"] == int(5e7)  # generated keys the user left alone stay
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["train_batch_size"] == 3 * 2 * 2
    assert ds["fp16"] == {"enabled": False, "initial_scale_power": 16, "loss_scale_window": 100}
    assert ds["communication_data_type"] == "fp32"
    assert "train_batch_size" not in build_deepspeed_config(TrainConfig(), precision="fp32")
    # A JSON file is read once, when the config is built; the saved config holds its contents.
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    from_file = from_dict(TrainConfig, {"zero_stage": 2, "micro_batch_size": 3, "grad_accum_steps": 2,
                                        "num_workers": 2, "deepspeed": str(path)})
    path.unlink()
    assert from_file.deepspeed == user and build_deepspeed_config(from_file, precision="fp32") == ds
    assert from_dict(TrainConfig, to_dict(from_file)) == from_file
    assert from_dict(TrainConfig, {"deepspeed": None}).deepspeed is None


@pytest.mark.parametrize("user, match", [
    ({"train_micro_batch_size_per_gpu": 8},
     r"train\.deepspeed\.train_micro_batch_size_per_gpu=8 disagrees with train\.micro_batch_size=4"),
    ({"gradient_accumulation_steps": 4}, r"train\.deepspeed\.gradient_accumulation_steps=4 .*train\.grad_accum_steps=1"),
    ({"zero_optimization": {"stage": 3}}, r"train\.deepspeed\.zero_optimization\.stage=3 disagrees with train\.zero_stage=0"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     r"train\.deepspeed\.zero_optimization\.offload_optimizer\.device='cpu' .*train\.offload_optimizer=False"),
    ({"gradient_clipping": 5.0}, r"train\.deepspeed\.gradient_clipping=5\.0 .*train\.grad_clip=1\.0"),
    ({"bf16": {"enabled": True}}, r"train\.deepspeed\.bf16\.enabled=True .*train\.precision='fp32'"),
    ({"train_batch_size": 16}, r"train\.deepspeed\.train_batch_size=16 but .*\(4\) x .*\(1\) x .*\(2, train\.num_workers\) = 8"),
    ({"optimizer": {"type": "Adam"}}, r"train\.deepspeed\.optimizer is not accepted: .*train\.lr"),
    ({"scheduler": {"type": "WarmupLR"}}, r"train\.deepspeed\.scheduler is not accepted"),
    ({"zero_optimization": 2}, r"train\.deepspeed\.zero_optimization: expected a mapping"),
    ({"flops_profiler": "auto"}, r"train\.deepspeed\.flops_profiler='auto': sepit fills 'auto' only"),
    ({"zero_allow_untested_optimizer": False}, r"train\.deepspeed\.zero_allow_untested_optimizer=False: must be True"),
    ("/nonexistent/ds.json", r"train\.deepspeed='/nonexistent/ds\.json': no such file"),
    (3, r"train\.deepspeed: expected a mapping or the path of a DeepSpeed JSON file, got int"),
])
def test_user_deepspeed_config_refusals_name_the_key(user, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(num_workers=2, precision="fp32", deepspeed=user)


def test_user_deepspeed_file_errors_and_checks_on_the_merged_result(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable JSON file"):
        TrainConfig(deepspeed=str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object, got list"):
        TrainConfig(deepspeed=str(bad))
    # precision=auto is resolved on the worker: checked when the worker builds the config.
    cfg = TrainConfig(deepspeed={"bf16": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"bf16\.enabled=True .*train\.precision='auto' \(resolved to fp32\)"):
        build_deepspeed_config(cfg, precision="fp32")
    assert build_deepspeed_config(cfg, precision="bf16")["bf16"]["enabled"] is True
    # A config changed after it was built (a sweep's trial) is checked again: MoE under ZeRO-3,
    # named by the key the stage came from, and the batch arithmetic over the real world size.
    cfg = TrainConfig(zero_stage=2)
    cfg.deepspeed = {"zero_optimization": {"stage": 3}}
    with pytest.raises(ConfigError, match=r"train\.deepspeed\.zero_optimization\.stage=3: stage 2 trains DeepSpeed MoE"):
        build_deepspeed_config(cfg, precision="fp32", moe=True)
    cfg.deepspeed = {"train_batch_size": 4}
    build_deepspeed_config(cfg, precision="fp32", world_size=1)
    with pytest.raises(ConfigError, match=r"train_batch_size=4 but .* = 12"):
        build_deepspeed_config(cfg, precision="fp32", world_size=3)
    from sepit.train.stage2 import Stage2JobConfig

    with pytest.raises(ConfigError, match="ZeRO-3"):
        from_dict(Stage2JobConfig, {"train": {"zero_stage": 3, "deepspeed": {"zero_optimization": {"stage": 3}}}})


def test_deepspeed_engine_takes_the_merged_config(process_group):
    """A real deepspeed.initialize (ZeRO-1, gloo, torch AdamW) on the merged config: the user's
    bucket size and the platform's batch arithmetic are what the engine runs with."""
    import deepspeed
    import torch

    cfg = TrainConfig(zero_stage=1, micro_batch_size=2, grad_accum_steps=3, num_workers=1, precision="fp32",
                      deepspeed={"zero_optimization": {"reduce_bucket_size": 12345, "overlap_comm": False},
                                 "train_batch_size": 6})
    ds = build_deepspeed_config(cfg, precision="fp32", world_size=process_group.get_world_size())
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds)
    assert engine.zero_optimization_stage() == 1 and engine.zero_reduce_bucket_size() == 12345
    assert engine.train_batch_size() == 6 and engine.gradient_accumulation_steps() == 3
    for _ in range(3):  # one optimizer step = 3 micro-batches of 2
        engine.backward(engine(torch.ones(2, 4)).sum())
        engine.step()
    assert engine.global_steps == 1


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
