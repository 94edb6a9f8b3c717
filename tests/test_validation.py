"""The validation split: a deterministic stratified carve, never trained on, never fed back, recorded and kept on
resume; validation images found among test or training images stop the run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.choices import check_recorded, load_validation
from pipeline.rounds import preflight
from stages.core.errors import ConfigError, DataError
from stages.core.stage import InProcess
from stages.data.labeled_scan import LabeledIndex, scan_split
from stages.data.shards import LabeledSet, expand_shards, load_labeled
from stages.data_check import CheckSettings, check_data
from stages.maths.validation import carve_keys, split_off
from stages.models.factory import ModelSpec
from stages.models.transforms import clean_transform
from stages.train import TrainConfig, TrainPlan, build_stream

# ---------------------------------------------------------------- the carve (pure)


def test_carve_is_stratified_deterministic_and_independent_of_key_order():
    keys = [f"k{i:03d}" for i in range(60)]
    labels = np.repeat(np.arange(3), 20)
    carved = carve_keys(keys, labels, 4, seed=0)
    assert len(carved) == 12 and carved == sorted(carved)
    by_class = np.bincount([labels[keys.index(k)] for k in carved], minlength=3)
    assert by_class.tolist() == [4, 4, 4]
    shuffled = np.random.default_rng(1).permutation(60)
    assert carve_keys([keys[i] for i in shuffled], labels[shuffled], 4, seed=0) == carved
    assert carve_keys(keys, labels, 4, seed=1) != carved


def test_carve_refuses_to_take_a_whole_class():
    with pytest.raises(ValueError, match=r"val_per_class: class 1 has 2 labeled sample\(s\)"):
        carve_keys(["a", "b", "c", "d", "e"], np.array([0, 0, 0, 1, 1]), 2, seed=0)


def test_split_off_partitions_the_labeled_set():
    labeled = LabeledSet(["a", "b", "c", "d"], [None] * 4, np.array([0, 1, 0, 1]), [])
    train, val = split_off(labeled, {"b", "c"})
    assert (train.keys, val.keys) == (["a", "d"], ["b", "c"])
    assert train.labels.tolist() == [0, 1] and val.labels.tolist() == [1, 0]


# ---------------------------------------------------------------- never trained on


def test_carved_keys_never_appear_in_a_training_batch(digits_root):
    """Through the real training input (TrainPlan -> build_stream -> MixedStream -> DataLoader), clean transform:
    over ten passes' worth of batches no row equals a carved image, and every other labeled image does turn up."""
    shards = expand_shards([f"{digits_root}/labeled/*.tar"])
    labeled = load_labeled(shards, 10, 1)
    carved = set(carve_keys(labeled.keys, labeled.labels, 2, seed=0))
    train, val = split_off(labeled, carved)
    cfg = TrainConfig(epochs=1, batch_size=16, loader_workers=0)
    plan = TrainPlan(
        spec=ModelSpec(randaug_n=0),
        cfg=cfg,
        num_classes=10,
        channels=1,
        image_size=8,
        mean=(0.0,),
        std=(1.0,),
        labeled=tuple(shards),
        pseudo=(),
        labeled_count=len(train),
        pseudo_count=0,
        metrics_path="",
        exclude_keys=frozenset(carved),
    )
    clean = clean_transform(8, (0.0,), (1.0,))

    def fingerprint(x: torch.Tensor) -> bytes:
        return x.numpy().tobytes()

    held_out = {fingerprint(clean(im)) for im in val.images}
    trained = {fingerprint(clean(im)) for im in train.images}
    assert len(held_out) == 20 and not held_out & trained  # digits' images are pairwise distinct
    batches = iter(build_stream(plan, epoch=0, rank=0, world_size=1))
    seen = [fingerprint(row) for _ in range(10 * len(train) // 16) for row in next(batches)["x"]]
    assert not held_out & set(seen), "a carved validation image was trained on"
    assert set(seen) == trained


def test_the_carve_is_recorded_and_a_resume_that_would_carve_differently_is_refused(tiny_config):
    cfg = tiny_config("data.val=[]", "data.val_per_class=2")
    ctx = preflight(cfg, progress=False).data
    record = ctx.validation
    assert record["source"] == "carved from data.labeled" and len(record["carved_keys"]) == 20
    assert len(ctx.labeled) == 80 and len(ctx.val) == 20 and ctx.exclude_keys == frozenset(record["carved_keys"])
    assert not set(ctx.labeled.keys) & set(ctx.val.keys)
    assert preflight(cfg, progress=False).data.validation == record  # deterministic: a resume carves the same
    check_recorded(record, record)
    changed = dict(record, carved_keys=record["carved_keys"][1:] + ["other"])
    with pytest.raises(ConfigError, match="would carve a different set"):
        check_recorded(record, changed)


def test_a_carve_too_large_for_a_class_is_one_config_line(tiny_config):
    cfg = tiny_config("data.val=[]", "data.val_per_class=10")
    labeled = load_labeled(expand_shards(cfg.data.labeled), 10, 1)
    with pytest.raises(ConfigError, match=r"^config\.data\.val_per_class: class 0 has 10 labeled"):
        load_validation(cfg, labeled)


def test_validation_shards_and_a_carve_together_are_refused(tiny_config):
    with pytest.raises(ConfigError, match="data.val_per_class: give validation shards"):
        tiny_config("data.val_per_class=2")


# ---------------------------------------------------------------- never fed back


def test_validation_images_among_the_unlabeled_or_test_stop_the_run(digits_root, tiny_config):
    """The pseudo-label stage reads the unlabeled shards: a validation image there would be trained on."""
    data = tiny_config().data
    split = {name: expand_shards(getattr(data, name)) for name in ("labeled", "unlabeled", "test")}
    labeled, test = scan_split(split["labeled"], 10, 1), scan_split(split["test"], 10, 1)
    val = scan_split(expand_shards(data.val), 10, 1)
    settings, executor = CheckSettings(1), InProcess(False)
    clean = check_data(settings, labeled, test, split | {"val": expand_shards(data.val)}, executor, val=val)
    assert clean["validation"] == {"images": 100, "in_test": 0, "in_labeled": 0, "in_unlabeled": 0, "examples": []}
    # the unlabeled shards themselves, passed as validation: every image found there, with no second scan
    from stages.data.contamination import image_digest
    from stages.data.shards import decode_image, image_field, iter_raw_samples

    samples = [s for shard in split["unlabeled"][:1] for s in iter_raw_samples(shard)][:5]
    digests = [image_digest(decode_image(image_field(s), 1)) for s in samples]
    leaked = LabeledIndex([f"v{i}" for i in range(5)], np.zeros(5, int), digests, np.zeros(5, int), ["u"], [])
    with pytest.raises(DataError, match=r"5 validation image\(s\) are also test or training images .*unlabeled 5"):
        check_data(settings, labeled, test, split | {"val": split["unlabeled"][:1]}, executor, val=leaked)
    mixed = test.take([0])
    with pytest.raises(DataError, match=r"test 1, labeled 0, unlabeled 0"):
        check_data(settings, labeled, test, split | {"val": split["test"][:1]}, executor, val=mixed)
