import pytest
import torch

from dfine.data.collate import BatchCollator, build_dataloader, multiscale_sizes, set_loader_epoch
from dfine.data.synthetic import make_synthetic_coco


def test_published_scales_for_base_640():
    sizes = multiscale_sizes(640, 3)
    assert [h for h, _ in sizes] == [480, 512, 544, 576, 608, 640, 640, 640, 800, 768, 736, 704, 672]
    assert all(h == w for h, w in sizes)
    assert multiscale_sizes(640, None) == []
    assert multiscale_sizes(640, 20).count((640, 640)) == 20


@pytest.mark.parametrize("base", [320, 416, (320, 480)])
def test_scales_for_other_bases_are_multiples_of_32_around_the_base(base):
    sizes = multiscale_sizes(base, 2)
    bh, bw = (base, base) if isinstance(base, int) else base
    assert len(sizes) == 12 and sizes[5] == sizes[6] == (bh, bw)
    for h, w in sizes:
        assert h % 32 == 0 and w % 32 == 0
        assert 0.75 * bh - 16 <= h <= 1.25 * bh + 16 and 0.75 * bw - 16 <= w <= 1.25 * bw + 16
    assert min(h for h, _ in sizes) < bh < max(h for h, _ in sizes)


def batch(ids, size=64):
    return [(torch.rand(3, size, size), {"image_id": torch.tensor(i), "boxes": torch.rand(2, 4)}) for i in ids]


def test_collate_stacks_and_resizes_until_the_stop_epoch():
    col = BatchCollator(base_size=320, base_size_repeat=1, stop_epoch=2, seed=0)
    allowed = set(multiscale_sizes(320, 1))
    seen = set()
    for start in range(0, 40, 4):
        items = batch(range(start, start + 4), size=320)
        images, targets = col(items)
        assert images.shape[:2] == (4, 3) and tuple(images.shape[-2:]) in allowed
        assert [int(t["image_id"]) for t in targets] == list(range(start, start + 4))
        assert targets[0] is items[0][1]
        seen.add(tuple(images.shape[-2:]))
        # nearest interpolation: a same-size batch is untouched
        if tuple(images.shape[-2:]) == (320, 320):
            assert torch.equal(images, torch.stack([x for x, _ in items]))
    assert len(seen) >= 3
    col.set_epoch(2)
    for start in range(0, 40, 4):
        images, _ = col(batch(range(start, start + 4), size=320))
        assert tuple(images.shape[-2:]) == (320, 320)


def test_collate_scale_is_deterministic_per_seed_epoch_and_batch():
    a = BatchCollator(base_size=64, base_size_repeat=1, seed=5)
    b = BatchCollator(base_size=64, base_size_repeat=1, seed=5)
    sizes_a = [a.pick_size([i, i + 1]) for i in range(30)]
    assert sizes_a == [b.pick_size([i, i + 1]) for i in range(30)]
    b.set_epoch(1)
    assert sizes_a != [b.pick_size([i, i + 1]) for i in range(30)]
    c = BatchCollator(base_size=64, base_size_repeat=1, seed=6)
    assert sizes_a != [c.pick_size([i, i + 1]) for i in range(30)]


def test_collate_without_multiscale_only_stacks():
    col = BatchCollator(base_size=64, base_size_repeat=None)
    images, targets = col(batch([1, 2, 3], size=48))
    assert images.shape == (3, 3, 48, 48) and len(targets) == 3


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("syn"), seed=0, num_train=6, num_val=3, image_size=96)


def loader_cfg(paths, **kw):
    cfg = dict(img_folder=paths["train_images"], ann_file=paths["train_annotations"], image_size=64,
               batch_size=2, num_workers=0, stop_epoch=2, base_size_repeat=1, seed=0)
    cfg.update(kw)
    return cfg


def epoch_ids(loader, epoch):
    set_loader_epoch(loader, epoch)
    return [[int(t["image_id"]) for t in targets] for _, targets in loader]


def test_loader_shuffles_per_epoch_deterministically(tiny_synthetic):
    loader = build_dataloader(loader_cfg(tiny_synthetic))
    again = build_dataloader(loader_cfg(tiny_synthetic))
    e0, e1 = epoch_ids(loader, 0), epoch_ids(loader, 1)
    assert e0 == epoch_ids(again, 0) and e1 == epoch_ids(again, 1)
    assert e0 != e1
    assert sorted(sum(e0, [])) == list(range(1, 7))
    state = torch.get_rng_state()
    epoch_ids(loader, 0)
    assert torch.equal(torch.get_rng_state(), state)  # iterating leaves the global RNG alone


def test_loader_batches_and_val_loader(tiny_synthetic):
    loader = build_dataloader(loader_cfg(tiny_synthetic, batch_size=4, drop_last=True))
    set_loader_epoch(loader, 0)
    batches = list(loader)
    assert len(batches) == 1  # 6 images, batch 4, drop_last
    images, targets = batches[0]
    assert images.dtype == torch.float32 and images.shape[:2] == (4, 3) and len(targets) == 4
    val = build_dataloader(dict(img_folder=tiny_synthetic["val_images"], ann_file=tiny_synthetic["val_annotations"],
                                train=False, image_size=64, batch_size=2, base_size_repeat=1))
    ids = []
    for images, targets in val:
        assert images.shape[-2:] == (64, 64)  # never multi-scale at validation
        ids += [int(t["image_id"]) for t in targets]
    assert ids == [1, 2, 3]  # no shuffle, nothing dropped


def test_batches_do_not_depend_on_worker_count(tiny_synthetic):
    cfg = loader_cfg(tiny_synthetic, image_size=320, base_size_repeat=1)
    in_process = build_dataloader(cfg)
    with_workers = build_dataloader(dict(cfg, num_workers=2))
    for epoch in (0, 3):
        set_loader_epoch(in_process, epoch)
        set_loader_epoch(with_workers, epoch)
        for (xa, ta), (xb, tb) in zip(in_process, with_workers, strict=True):
            assert torch.equal(xa, xb)
            assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(ta, tb))


def test_epoch_reaches_persistent_workers(tiny_synthetic):
    # after the stop epoch the collator in the worker process must stop multi-scale
    cfg = loader_cfg(tiny_synthetic, num_workers=1, stop_epoch=1, base_size_repeat=0, image_size=320)
    loader = build_dataloader(cfg)
    set_loader_epoch(loader, 0)
    sizes0 = {tuple(images.shape[-2:]) for images, _ in loader}
    set_loader_epoch(loader, 1)
    sizes1 = {tuple(images.shape[-2:]) for images, _ in loader}
    assert sizes0 and sizes0 != {(320, 320)}
    assert sizes1 == {(320, 320)}


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_worker(rank, world, port, cfg, out_dir):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loader = build_dataloader(cfg)
        torch.save({e: epoch_ids(loader, e) for e in (0, 1)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_loader_shards_the_dataset(tiny_synthetic, tmp_path):
    import torch.multiprocessing as mp

    cfg = loader_cfg(tiny_synthetic, batch_size=1, drop_last=False)
    mp.start_processes(_shard_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for epoch in (0, 1):
        ids0, ids1 = sum(r0[epoch], []), sum(r1[epoch], [])
        assert len(ids0) == len(ids1) == 3
        assert sorted(ids0 + ids1) == list(range(1, 7))
    assert r0[0] != r0[1]
