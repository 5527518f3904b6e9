"""The pure pieces of the training loop: LR schedule, weight EMA, augmentation, device batches, evaluation."""

import pytest
import torch


def test_lr_schedule_warms_up_then_follows_a_cosine():
    from training.loop import get_lr

    lrs = [get_lr(s, 100, 10, 1.0, 0.01) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[100] == pytest.approx(0.01)


def test_ema_follows_in_place_updates_of_weights_and_buffers():
    from training.loop import ModelEma

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = ModelEma(net, decay=0.5, warmup=False)
    expected = {k: v.clone().float() for k, v in net.state_dict().items()}
    for _ in range(3):  # what training does: in-place optimizer steps and BN statistics
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(8, 3))
        ema.update(net)
        for k, v in net.state_dict().items():
            expected[k] = v.float() if not v.dtype.is_floating_point else expected[k] + 0.5 * (v - expected[k])
    for k, v in ema.module.state_dict().items():
        assert torch.allclose(v.float(), expected[k]), k
    assert int(ema.module[1].num_batches_tracked) == 3


def test_batch_augment_keeps_uint8_images_and_shapes():
    from training.data import batch_augment

    x = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    y = batch_augment(x.clone(), pad=4, hflip=True, erase_p=0.5)
    assert y.dtype == torch.uint8 and y.shape == x.shape and not torch.equal(x, y)
    assert torch.equal(batch_augment(x.clone(), pad=0, hflip=False), x)


def test_random_erasing_fills_one_rectangle_on_about_the_asked_fraction():
    from training.data import batch_augment

    torch.manual_seed(0)
    x = torch.zeros(400, 1, 32, 32, dtype=torch.uint8)
    y = batch_augment(x, pad=0, hflip=False, erase_p=0.25)
    changed = (y != 0).flatten(1).any(1)
    assert 0.15 < changed.float().mean() < 0.35
    for img in y[changed][:20, 0]:
        rows, cols = (img != 0).any(1).nonzero().flatten(), (img != 0).any(0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert 0.02 * 1024 * 0.5 <= h * w <= 0.2 * 1024 * 1.5  # one rectangle of 2-20% of the area (rounding)


def test_device_batches_shard_like_the_distributed_sampler_and_augment_per_chunk():
    from torch.utils.data.distributed import DistributedSampler

    from training.data import DeviceBatches, TensorImages

    n = 100
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    data = TensorImages(images, torch.arange(n))
    seen = []
    for rank in range(2):
        batches = DeviceBatches(data, batch_size=16, device="cpu", rank=rank, world=2, seed=3)
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=3, drop_last=True)
        batches.set_epoch(5)
        sampler.set_epoch(5)
        got = [(x, y) for x, y in batches]
        assert len(got) == len(batches) == 50 // 16  # the DataLoader's count with drop_last
        labels = torch.cat([y for _, y in got]).tolist()
        assert labels == list(sampler)[: len(labels)]  # the same order as the DataLoader path
        assert all(torch.equal(x[:, 0, 0, 0].long(), y) for x, y in got)  # images stay with their labels
        seen += labels
    assert len(set(seen)) == len(seen)  # disjoint shards

    calls = []

    def policy(part):
        calls.append(len(part))
        return part + 1

    data = TensorImages(torch.zeros(40, 1, 4, 4, dtype=torch.uint8), torch.zeros(40, dtype=torch.long), policy)
    x, _ = next(iter(DeviceBatches(data, batch_size=20, device="cpu", chunk=8)))
    assert calls == [8, 8, 4] and bool((x == 1).all())


def test_per_class_accuracy_is_null_for_a_class_without_test_images():
    from training.loop import evaluate

    class Always0(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[1.0, 0.0, 0.0]]).expand(len(x), 3)

    batches = [(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]))]
    out = evaluate(Always0(), batches, lambda x: x.float(), 3, torch.device("cpu"), channels_last=False)
    assert out["per_class"] == [1.0, 0.0, None]
