"""Data-parallel training with Ray Train (``train.workers``): two workers on a private
local Ray instance, each training on its half of every batch, DDP averaging the
gradients; logged and checkpointed by the stage process like one training actor."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import training_run
from pipeline.checkpoint import build_from_spec
from pipeline.config import ParamsError, ResourcesConfig
from pipeline.local_cluster import free_port
from pipeline.training_run import train_resumable
from tests.test_train import data, spec, train_cfg

RESOURCES = ResourcesConfig(train_num_cpus=1)


def _train(tmp_path, cache, epochs, workers=2):
    return train_resumable("train_baseline", spec(), data(96), data(32, seed=1), train_cfg(epochs=epochs, workers=workers),
                           0, RESOURCES, True, tmp_path / cache, "data-parallel", {}, {},
                           desc="dp")


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_two_workers_train_and_resume_exactly(tmp_path, ray_local, tracking, monkeypatch):
    weights, history, run_id = _train(tmp_path, "straight", epochs=3)
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert all(h["train_images"] == 96 for h in history)  # the two shards together cover the data once
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # the last epoch's test accuracy, recomputed from the returned weights on the test images
    model = build_from_spec({**spec(), "state_dict": weights})
    test_x, test_y = data(32, seed=1)
    with torch.no_grad():
        pred = model(test_x.float() / 255).argmax(1)
    assert history[-1]["test_accuracy"] == int((pred == test_y).sum()) / len(test_y)
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags["train_workers"] == "2" and tags["node_ids"] and tags["precision"] == "fp32"

    # a stage killed after its first epoch, then rerun: it resumes from the checkpoint
    real = training_run._RayTrainEpochs.epochs

    def stop_after_one(self, start, state):
        for item in real(self, start, state):
            yield item
            raise KeyboardInterrupt

    monkeypatch.setattr(training_run._RayTrainEpochs, "epochs", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "resumed", epochs=3)
    monkeypatch.setattr(training_run._RayTrainEpochs, "epochs", real)
    resumed, history2, _ = _train(tmp_path, "resumed", epochs=3)
    assert [h["epoch"] for h in history2] == [0, 1, 2]
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)


def test_shards_partition_every_global_batch(monkeypatch):
    """Rank r of w takes batch[r::w] of the same seeded order: together the ranks see
    exactly the unsharded run's batches (images numbered by their constant value)."""
    import torch.distributed as dist

    from pipeline.train import Trainer

    n = 100
    x = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 32, 32).contiguous()
    y = torch.arange(n) % 10
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)  # DDP needs a group; one process plays both ranks
    try:
        def batches(shard):
            trainer = Trainer(spec(), (x, y), (x[:10], y[:10]), train_cfg(batch_size=32), seed=0, shard=shard)
            return [xb[:, 0, 16, 16].tolist() for xb, _ in trainer._epoch_batches(epoch=1)]

        full, r0, r1 = batches((0, 1)), batches((0, 2)), batches((1, 2))
    finally:
        dist.destroy_process_group()
    assert len(full) == len(r0) == len(r1) == 4  # 100 images, batches of 32
    for whole, a, b in zip(full, r0, r1, strict=True):
        assert sorted(a + b) == sorted(whole) and not set(a) & set(b)
        assert abs(len(a) - len(b)) <= 1


def test_more_workers_than_the_cluster_has_is_a_params_error(tmp_path, ray_local, tracking):
    with pytest.raises(ParamsError, match="train.workers=3 .* needs 3 CPUs; the Ray cluster has 2"):
        _train(tmp_path, "too-many", epochs=1, workers=3)
