"""stages/pseudo_label.py: soft labels, the sidecar schema, which sidecars are trusted, and labeling real shards
in-process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stages.core.errors import DataError
from stages.data.shards import decode_image, image_field, iter_raw_samples, write_shards
from stages.models.factory import ModelSpec, create_model, load_model, model_card, save_model
from stages.models.transforms import clean_transform
from stages.pseudo_label import (
    SIDECAR_FORMAT,
    PseudoLabelConfig,
    ShardLabeler,
    build_table,
    made_by,
    soft_labels,
    truth_counts,
)
from stages.storage.artifacts import read_footer, trusted_table, write_table
from stages.storage.layout import shard_id, sidecar_file


def sidecar_path(out_dir: Path, shard: str) -> Path:
    return out_dir / sidecar_file(shard)


def write_sidecar(table: pa.Table, path: Path, bad: list | None = None, made: str = "teacher-a") -> None:
    write_table(table, path, format=SIDECAR_FORMAT, made_by=made, bad=json.dumps(bad or []), **truth_counts(table))


def sidecar_info(path: Path) -> dict | None:
    """What the stage reads back from a sidecar's footer (None when it is not a complete sidecar)."""
    footer = read_footer(path, SIDECAR_FORMAT)
    if footer is None:
        return None
    meta = footer.meta
    return {
        "rows": footer.rows,
        "bad": json.loads(meta["bad"]),
        "with_truth": int(meta["with_truth"]),
        "correct": int(meta["correct"]),
    }


# ---------------------------------------------------------------- soft_labels, config


def test_soft_labels_divide_logits_by_the_temperature():
    # logits (2, 0) at T = 2 -> softmax(1, 0) = (e / (e + 1), 1 / (e + 1)) = (.731059, .268941)
    e = math.e
    out = soft_labels(torch.tensor([[2.0, 0.0]]), temperature=2.0)
    torch.testing.assert_close(out, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))
    # T = 1 is the plain softmax; a higher T flattens, a lower T sharpens
    torch.testing.assert_close(
        soft_labels(torch.tensor([[2.0, 0.0]]), 1.0), torch.softmax(torch.tensor([[2.0, 0.0]]), -1)
    )
    assert soft_labels(torch.tensor([[2.0, 0.0]]), 0.5)[0, 0] > out[0, 0]


def test_soft_labels_are_float32_for_half_logits():
    assert soft_labels(torch.tensor([[2.0, 0.0]], dtype=torch.bfloat16), 1.0).dtype == torch.float32


@pytest.mark.parametrize(
    "field, value",
    [("temperature", 0.0), ("temperature", -1.0), ("topk", -1), ("batch_size", 0), ("max_bad_fraction", 1.5)],
)
def test_pseudo_label_config_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        PseudoLabelConfig(**{field: value})


# ---------------------------------------------------------------- build_table, the footer, trust

PROBS = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.5, 0.2, 0.2, 0.1], [0.05, 0.05, 0.1, 0.8]])
KEYS = ["k0", "k1", "k2"]
TRUTH = [1, 3, -1]  # row 0 right, row 1 wrong, row 2 has no .cls
BAD = [{"shard": "s.tar", "key": "kx", "reason": "undecodable image (x)"}]


def test_build_table_with_full_probabilities():
    table = build_table("s.tar", KEYS, PROBS.log(), TRUTH, topk=0)
    schema = table.schema
    assert schema.field("key").type == pa.string() and schema.field("shard").type == pa.string()
    assert schema.field("label").type == pa.int32() and schema.field("true_label").type == pa.int32()
    assert schema.field("confidence").type == pa.float32()
    assert schema.field("probs").type == pa.list_(pa.float16())
    assert "topk_idx" not in schema.names
    assert table.column("key").to_pylist() == KEYS and table.column("shard").to_pylist() == ["s.tar"] * 3
    assert table.column("label").to_pylist() == [1, 0, 3]
    np.testing.assert_allclose(table.column("confidence").to_pylist(), [0.6, 0.5, 0.8], rtol=1e-6)
    probs = table.column("probs").to_pylist()
    assert [len(row) for row in probs] == [4, 4, 4]
    np.testing.assert_allclose(probs, PROBS.numpy(), atol=1e-3)  # float16
    assert table.column("true_label").to_pylist() == TRUTH
    assert truth_counts(table) == {"with_truth": 2, "correct": 1}


@pytest.mark.parametrize("topk, width", [(2, 2), (3, 3), (9, 4)])  # k larger than the class count stores all
def test_build_table_with_topk(topk, width):
    table = build_table("s.tar", KEYS, PROBS.log(), TRUTH, topk=topk)
    schema = table.schema
    assert "probs" not in schema.names
    assert schema.field("topk_idx").type == pa.list_(pa.int32())
    assert schema.field("topk_prob").type == pa.list_(pa.float16())
    idx, prob = table.column("topk_idx").to_pylist(), table.column("topk_prob").to_pylist()
    assert [len(r) for r in idx] == [width] * 3 and [len(r) for r in prob] == [width] * 3
    assert idx[0][:2] == [1, 2] and idx[1][0] == 0 and idx[2][0] == 3
    for row_idx, row_prob, full in zip(idx, prob, PROBS.numpy(), strict=True):
        assert row_prob == sorted(row_prob, reverse=True)
        np.testing.assert_allclose(row_prob, full[row_idx], atol=1e-3)


def test_build_table_with_no_rows_is_valid(tmp_path):
    table = build_table("s.tar", [], torch.zeros(0, 4), [], topk=2)
    assert table.num_rows == 0 and table.schema.field("topk_idx").type == pa.list_(pa.int32())
    write_sidecar(table, tmp_path / "empty.parquet", BAD)
    assert sidecar_info(tmp_path / "empty.parquet") == {"rows": 0, "bad": BAD, "with_truth": 0, "correct": 0}


@pytest.fixture
def sidecar(tmp_path) -> Path:
    path = sidecar_path(tmp_path, "/data/u/unlabeled-000001.tar")
    write_sidecar(build_table("s.tar", KEYS, PROBS.log(), TRUTH, topk=0), path, BAD)
    return path


def test_sidecar_path_is_named_by_shard_id(tmp_path):
    assert sidecar_path(tmp_path, "/data/u/x.tar") == tmp_path / f"{shard_id('/data/u/x.tar')}.parquet"


def test_the_footer_of_a_complete_sidecar(sidecar):
    assert sidecar_info(sidecar) == {"rows": 3, "bad": BAD, "with_truth": 2, "correct": 1}
    assert not list(sidecar.parent.glob("*.tmp")), "the temporary file must be gone"


def test_a_sidecar_is_trusted_only_by_the_inputs_that_made_it(sidecar):
    assert trusted_table(sidecar, SIDECAR_FORMAT, "teacher-a") is not None
    assert trusted_table(sidecar, SIDECAR_FORMAT, "teacher-b") is None  # another teacher: labeled again
    assert trusted_table(sidecar, "selection/v3", "teacher-a") is None


def test_made_by_names_the_teacher_the_settings_and_the_shard_as_it_is(digits_root, tmp_path):
    shard = str(digits_root / "test" / "test-000001.tar")
    cfg = PseudoLabelConfig(temperature=0.5)
    base = made_by("sha-a", cfg, 1, shard)
    assert base == made_by("sha-a", cfg, 1, shard)
    others = [
        made_by("sha-b", cfg, 1, shard),
        made_by("sha-a", PseudoLabelConfig(temperature=1.0), 1, shard),
        made_by("sha-a", PseudoLabelConfig(temperature=0.5, topk=3), 1, shard),
        made_by("sha-a", cfg, 3, shard),
        made_by("sha-a", cfg, 1, str(digits_root / "test" / "test-000002.tar")),
    ]
    assert base not in others and len(set(others)) == len(others)
    copy = tmp_path / "copy.tar"
    copy.write_bytes(Path(shard).read_bytes())
    before = made_by("sha-a", cfg, 1, str(copy))
    copy.write_bytes(Path(shard).read_bytes() + b"\0" * 512)  # the shard rewritten: its stamp moves
    assert made_by("sha-a", cfg, 1, str(copy)) != before


def test_a_sidecar_damaged_in_place_at_the_same_size_is_not_trusted(sidecar):
    data = bytearray(sidecar.read_bytes())
    start = data.index(b"k1")  # inside the key column's data page
    data[start : start + 2] = b"zz"
    sidecar.write_bytes(bytes(data))
    assert read_footer(sidecar, SIDECAR_FORMAT) is not None  # the footer alone looks fine ...
    assert trusted_table(sidecar, SIDECAR_FORMAT, "teacher-a", verify=False) is not None
    assert trusted_table(sidecar, SIDECAR_FORMAT, "teacher-a") is None  # ... the rows do not hash as written


@pytest.mark.parametrize("damage", ["half", "tail", "garbage", "empty", "missing"])
def test_sidecar_info_refuses_a_damaged_file(sidecar, damage):
    data = sidecar.read_bytes()
    if damage == "missing":
        sidecar.unlink()
    else:
        sidecar.write_bytes(
            {"half": data[: len(data) // 2], "tail": data[:-3], "garbage": b"PAR1 not parquet PAR1", "empty": b""}[
                damage
            ]
        )
    assert sidecar_info(sidecar) is None
    assert trusted_table(sidecar, SIDECAR_FORMAT, "teacher-a") is None


def test_a_row_count_that_does_not_match_is_refused(tmp_path):
    write_sidecar(build_table("s.tar", KEYS, PROBS.log(), TRUTH, topk=0), tmp_path / "x.parquet")
    table = pq.read_table(tmp_path / "x.parquet")
    table = table.replace_schema_metadata({**table.schema.metadata, b"rows": b"4"})
    pq.write_table(table, tmp_path / "x.parquet")
    assert sidecar_info(tmp_path / "x.parquet") is None


def test_a_parquet_without_the_format_tag_is_refused(tmp_path):
    table = build_table("s.tar", KEYS, PROBS.log(), TRUTH, topk=0)
    pq.write_table(table, tmp_path / "x.parquet")
    assert sidecar_info(tmp_path / "x.parquet") is None


# ---------------------------------------------------------------- ShardLabeler on real shards

IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny saved teacher (random weights; BN statistics moved so eval differs from a fresh model)."""
    out = tmp_path_factory.mktemp("teacher")
    spec = ModelSpec("test_resnet")
    torch.manual_seed(0)
    model = create_model(spec, 10, 1, noised=True)
    with torch.no_grad():
        model.train()(torch.randn(16, 1, IMAGE_SIZE, IMAGE_SIZE))
    save_model(model, out, model_card(spec, 10, 1, IMAGE_SIZE, (0.5,), (0.5,)))
    return out


def _labeler(teacher_dir: Path, out_dir: Path, **cfg) -> ShardLabeler:
    return ShardLabeler(str(teacher_dir), str(out_dir), PseudoLabelConfig(**{"batch_size": 64, **cfg}), channels=1)


def _reference_probs(teacher_dir: Path, images: list[bytes]) -> np.ndarray:
    model, card = load_model(teacher_dir)
    transform = clean_transform(card["input_size"][-1], card["mean"], card["std"])
    x = torch.stack([transform(decode_image(data, 1)) for data in images])
    with torch.inference_mode():
        return torch.softmax(model(x), dim=-1).numpy()


def test_label_shard_writes_one_row_per_sample(teacher_dir, digits_root, tmp_path):
    shard = str(digits_root / "unlabeled" / "unlabeled-000002.tar")
    samples = list(iter_raw_samples(shard))
    result = _labeler(teacher_dir, tmp_path).process(shard, "m")
    assert result["bad"] == []
    assert result["rows"] == len(samples) > 64  # more than one inference batch
    path = sidecar_path(tmp_path, shard)
    assert sidecar_info(path)["rows"] == len(samples)
    table = pq.read_table(path)
    assert table.column("key").to_pylist() == [s["__key__"] for s in samples]
    assert set(table.column("shard").to_pylist()) == {shard}
    assert set(table.column("true_label").to_pylist()) == {-1}  # unlabeled shards carry no .cls
    probs = np.asarray(table.column("probs").to_pylist(), dtype=np.float32)
    assert probs.shape == (len(samples), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-2)
    np.testing.assert_array_equal(table.column("label").to_numpy(), probs.argmax(axis=1))
    # the un-noised teacher (eval mode, clean transform) gave these probabilities
    reference = _reference_probs(teacher_dir, [s["png"] for s in samples[:5] + samples[-5:]])
    np.testing.assert_allclose(np.concatenate([probs[:5], probs[-5:]]), reference, atol=2e-3)


def test_label_shard_records_truth_when_the_shard_has_it(teacher_dir, digits_root, tmp_path):
    shard = str(digits_root / "test" / "test-000000.tar")
    result = _labeler(teacher_dir, tmp_path, topk=3, temperature=2.0).process(shard, "m")
    table = pq.read_table(sidecar_path(tmp_path, shard))
    truth = [int(s["cls"]) for s in iter_raw_samples(shard)]
    assert table.column("true_label").to_pylist() == truth
    info = sidecar_info(sidecar_path(tmp_path, shard))
    assert info["rows"] == result["rows"] == len(truth) and info["with_truth"] == len(truth)
    assert info["correct"] == int((table.column("label").to_numpy() == np.asarray(truth)).sum())
    assert {len(r) for r in table.column("topk_idx").to_pylist()} == {3}


def test_label_shard_lists_bad_samples_and_labels_the_rest(teacher_dir, digits_root, tmp_path):
    good = list(iter_raw_samples(str(digits_root / "unlabeled" / "unlabeled-000000.tar")))[:4]
    samples = [{"__key__": s["__key__"], "png": s["png"]} for s in good]
    samples.insert(1, {"__key__": "broken", "png": b"\x89PNG\r\n\x1a\n truncated"})
    samples.insert(3, {"__key__": "imageless", "cls": b"4"})
    shard = write_shards(samples, tmp_path / "shards", "bad", 1)[0]
    result = _labeler(teacher_dir, tmp_path / "out").process(shard, "m")
    assert result["rows"] == 4
    assert [(b["key"], b["shard"]) for b in result["bad"]] == [("broken", shard), ("imageless", shard)]
    assert "undecodable" in result["bad"][0]["reason"] and "no image" in result["bad"][1]["reason"]
    path = sidecar_path(tmp_path / "out", shard)
    table = pq.read_table(path)
    assert table.column("key").to_pylist() == [s["__key__"] for s in good]
    assert sidecar_info(path) == {"rows": 4, "bad": result["bad"], "with_truth": 0, "correct": 0}
    reference = _reference_probs(teacher_dir, [image_field(s) for s in good])
    np.testing.assert_allclose(np.asarray(table.column("probs").to_pylist(), np.float32), reference, atol=2e-3)


def _cut(src: str, dst: Path, cut: int) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(Path(src).read_bytes()[:cut])
    return str(dst)


def test_a_shard_damaged_inside_a_member_is_an_error_and_writes_no_sidecar(teacher_dir, digits_root, tmp_path):
    src = str(digits_root / "unlabeled" / "unlabeled-000000.tar")
    shard = _cut(src, tmp_path / "shards" / "cut.tar", 1024 * 100 + 700)  # inside the 101st member's data
    with pytest.raises(DataError) as info:
        _labeler(teacher_dir, tmp_path / "out").process(shard, "m")
    assert shard in str(info.value) and "truncated" in str(info.value)
    assert not sidecar_path(tmp_path / "out", shard).exists()
    assert not list((tmp_path / "out").rglob("*.parquet*")), "no sidecar, not even a temporary one"


def test_a_shard_cut_in_half_is_an_error_and_writes_no_sidecar(teacher_dir, digits_root, tmp_path):
    src = str(digits_root / "unlabeled" / "unlabeled-000000.tar")
    shard = _cut(src, tmp_path / "shards" / "half.tar", Path(src).stat().st_size // 2)
    with pytest.raises(DataError, match=shard):
        _labeler(teacher_dir, tmp_path / "out").process(shard, "m")
    assert not sidecar_path(tmp_path / "out", shard).exists()


def test_label_shards_keeps_only_what_this_teacher_wrote_whole(teacher_dir, digits_root, tmp_path):
    """The stage's driver: a resume labels the shards whose sidecars are missing, from another teacher, or damaged."""
    from stages.core.stage import InProcess, LabelResources
    from stages.pseudo_label import label_shards

    shards = [str(digits_root / "test" / f"test-00000{i}.tar") for i in range(3)]
    cfg, out = PseudoLabelConfig(batch_size=64), tmp_path / "labels"

    def label(sha: str) -> dict:
        return label_shards(teacher_dir, sha, shards, out, cfg, 1, LabelResources(), InProcess(False), False)

    first = label("sha-a")
    assert (first["rows"], first["shards_resumed"], first["ran_as"]) == (270, 0, "in-process")
    from stages.data.decoders import DEFAULT, resolve

    assert first["decoders"] == {resolve(DEFAULT): 3}  # the CPU decoding backend, recorded per shard
    assert label("sha-a")["shards_resumed"] == 3
    assert label("sha-b")["shards_resumed"] == 0  # another teacher: everything again
    damaged = sidecar_path(out, shards[1])
    data = bytearray(damaged.read_bytes())
    data[data.index(b"test-") + 5] ^= 1  # one key's byte, same size
    damaged.write_bytes(bytes(data))
    assert label("sha-b")["shards_resumed"] == 2


@pytest.mark.parametrize(
    ("resources", "cluster", "actors", "threads"),
    [
        # auto on a CPU-only box: one single-threaded actor per CPU (two processes beat one with two threads here)
        (dict(), {"CPU": 2.0}, 2, 1),
        (dict(cpus_per_actor=2.0), {"CPU": 8.0}, 4, 2),
        # auto on a GPU cluster: one actor per GPU, whatever the CPU count
        (dict(gpus_per_actor=1.0, cpus_per_actor=4.0), {"CPU": 64.0, "GPU": 8.0}, 8, 4),
        (dict(gpus_per_actor=0.5), {"CPU": 4.0, "GPU": 2.0}, 4, 1),
        # an autoscaling GPU group at zero still gets one actor (it asks for a GPU and Ray scales up)
        (dict(gpus_per_actor=1.0), {"CPU": 2.0}, 1, 1),
        (dict(cpus_per_actor=4.0), {"CPU": 2.0}, 1, 4),
        # explicit values win
        (dict(actors=3, threads=2), {"CPU": 16.0}, 3, 2),
    ],
)
def test_label_resources_resolve_actor_count_and_threads(resources, cluster, actors, threads):
    from stages.core.stage import LabelResources

    res = LabelResources(**resources)
    assert res.actor_count(cluster) == actors
    assert res.torch_threads() == threads


# ---------------------------------------------------------------- decoding: threads, and the nvJPEG path run on the CPU


def _mixed_samples() -> list[dict]:
    """RGB JPEGs of several sizes, a PNG, a corrupt JPEG and a JPEG header with nothing after it, in that stream."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    samples = []
    for i in range(11):
        height, width = 20 + 7 * i, 30 + 3 * i
        pixels = (rng.random((height, width, 3)) * 64 + np.linspace(0, 190, width)[None, :, None]).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG" if i == 4 else "JPEG", quality=90)
        samples.append({"__key__": f"s{i:02d}", "png" if i == 4 else "jpg": buf.getvalue()})
    samples[7]["jpg"] = samples[7]["jpg"][:40]  # truncated: neither decoder can read it
    samples[9]["jpg"] = b"\xff\xd8 not a jpeg at all"
    return samples


CARD = {"input_size": [3, 24, 24], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}


def test_the_decoder_threads_keep_stream_order_and_record_bad_samples_in_place():
    from stages.data.decode import Decoder

    samples = _mixed_samples()
    serial_bad, threaded_bad = [], []
    keys1, x1, _ = Decoder(CARD, 3, threads=1)("s.tar", samples, serial_bad)
    keys3, x3, _ = Decoder(CARD, 3, threads=3)("s.tar", samples, threaded_bad)
    assert keys1 == keys3 == [s["__key__"] for i, s in enumerate(samples) if i not in (7, 9)]
    assert torch.equal(x1, x3)
    assert [b["key"] for b in threaded_bad] == [b["key"] for b in serial_bad] == ["s07", "s09"]
    assert all("undecodable" in b["reason"] for b in threaded_bad)


def _rotated_jpeg() -> bytes:
    """A JPEG whose EXIF says "rotate 90°": TorchCodec would apply it, ``decode_image`` does not."""
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 120, np.uint8)).save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("backend", ["torchcodec", "torchvision"])
def test_the_gpu_path_decodes_plain_jpegs_in_one_call_and_leaves_the_rest_to_the_cpu(monkeypatch, backend):
    """The GPU decode path with ``device=cpu`` (both batched decoders take either device): the plain JPEGs go
    through one batched call, the PNG, the EXIF-rotated JPEG and the two broken ones the CPU way, and the result
    matches the CPU decoder's."""
    import stages.data.decode as dec

    calls = []
    batch = dec.GPU_DECODERS[backend]

    def counting(data, channels, device):
        calls.append(len(data))
        return batch(data, channels, device)

    monkeypatch.setitem(dec.GPU_DECODERS, backend, counting)
    samples = [*_mixed_samples(), {"__key__": "s11", "jpg": _rotated_jpeg()}]
    bad, want_bad = [], []
    decoder = dec.Decoder(CARD, 3, threads=2, device=torch.device("cpu"))
    decoder.gpu_backend = backend
    keys, got, _ = decoder("s.tar", samples, bad)
    want_keys, want, _ = dec.Decoder(CARD, 3, threads=1, backend="pil")("s.tar", samples, want_bad)
    assert keys == want_keys and [b["key"] for b in bad] == ["s07", "s09"] == [b["key"] for b in want_bad]
    assert calls == [8]  # 12 samples less the PNG, the truncated JPEG, the not-a-JPEG and the rotated JPEG
    level = 1 / 255 / 0.5
    assert float((got - want).abs().max()) <= 2 * level  # bilinear: within a grey level or two of PIL
    for key in ("s04", "s11"):  # the PNG and the rotated JPEG took the CPU way on both
        assert torch.equal(got[keys.index(key)], want[keys.index(key)])
    assert decoder.name == f"{backend}-gpu+{decoder.backend}"


@pytest.mark.parametrize("error", [RuntimeError, TypeError])
def test_the_gpu_path_finds_a_bad_image_one_by_one_and_hands_over_to_torchvision(monkeypatch, caplog, error):
    import stages.data.decode as dec

    samples = _mixed_samples()[:4]  # four plain JPEGs
    refused = samples[2]["jpg"]
    seen = []

    def picky(data, channels, device):  # nvJPEG refusing one image fails the whole batched call
        seen.append(len(data))
        if refused in data:
            raise RuntimeError("nvjpeg: bad image")
        return dec.batch_torchvision(data, channels, device)

    monkeypatch.setitem(dec.GPU_DECODERS, "torchvision", picky)
    decoder = dec.Decoder(CARD, 3, threads=1, device=torch.device("cpu"))
    decoder.gpu_backend = "torchvision"
    bad: list[dict] = []
    keys, got, _ = decoder("s.tar", samples, bad)
    assert seen == [4, 1, 1, 1, 1] and len(keys) == 4 and not bad  # the refused one decoded the CPU way

    def no_device(data, channels, device):  # refuses every image, whatever the error says
        raise error("this TorchCodec has no decoder for this device")

    monkeypatch.setitem(dec.GPU_DECODERS, "torchcodec", no_device)
    monkeypatch.setitem(dec.GPU_DECODERS, "torchvision", dec.batch_torchvision)
    decoder = dec.Decoder(CARD, 3, threads=1, device=torch.device("cpu"))
    decoder.gpu_backend = "torchcodec"
    with caplog.at_level("WARNING"):
        keys2, got2, _ = decoder("s.tar", samples, bad)
    assert keys2 == keys and decoder.gpu_backend == "torchvision"
    assert torch.equal(got2[[0, 1, 3]], got[[0, 1, 3]])  # s02 was decoded the CPU way the first time
    assert "GPU JPEG decoding with torchcodec failed" in caplog.text
    assert dec.gpu_decoder(lambda module: module != "torchcodec") == "torchvision"
    assert dec.gpu_decoder(lambda module: True) == "torchcodec"


def test_a_gpu_decode_asked_of_a_cpu_actor_falls_back_and_says_so(teacher_dir, digits_root, tmp_path):
    shard = str(digits_root / "test" / "test-000001.tar")
    labeler = ShardLabeler(str(teacher_dir), str(tmp_path), PseudoLabelConfig(batch_size=64), 1, decode="gpu")
    result = labeler.process(shard, "m")
    want = "gpu" if torch.cuda.is_available() else "cpu"
    assert result["decode"] == want and result["rows"] == 90


@pytest.mark.parametrize(
    ("resources", "cluster", "shards", "pool"),
    [
        # autoscaling: starts with what the cluster holds, grows up to one actor per shard
        (dict(), {"CPU": 2.0}, 10, {"min_size": 1, "max_size": 10, "initial_size": 2}),
        # an autoscaling GPU group at zero: one actor to start, Ray scales the group up for more
        (dict(gpus_per_actor=1.0), {"CPU": 2.0}, 50, {"min_size": 1, "max_size": 50, "initial_size": 1}),
        (
            dict(gpus_per_actor=1.0, max_actors=8),
            {"CPU": 2.0, "GPU": 4.0},
            50,
            {"min_size": 1, "max_size": 8, "initial_size": 4},
        ),
        # never more actors than shards
        (dict(), {"CPU": 16.0}, 3, {"min_size": 1, "max_size": 3, "initial_size": 3}),
        (dict(actors=4), {"CPU": 16.0}, 3, {"size": 3}),
        (dict(actors=4), {"CPU": 16.0}, 30, {"size": 4}),
        # decode tasks on CPUs: the actors leave one task's CPUs free and do not grow into them
        (dict(decode="tasks"), {"CPU": 2.0}, 10, {"min_size": 1, "max_size": 1, "initial_size": 1}),
        (dict(decode="tasks", decode_cpus=2.0), {"CPU": 8.0}, 10, {"min_size": 1, "max_size": 6, "initial_size": 6}),
        # ... on GPUs the actors are counted by GPU, as without them
        (
            dict(decode="tasks", gpus_per_actor=1.0),
            {"CPU": 16.0, "GPU": 2.0},
            10,
            {"min_size": 1, "max_size": 10, "initial_size": 2},
        ),
    ],
)
def test_the_label_pool_follows_the_autoscaler(resources, cluster, shards, pool):
    from ray.data import ActorPoolStrategy

    from stages.core.stage import LabelResources

    got = LabelResources(**resources).pool(cluster, shards)
    assert got == pool
    ActorPoolStrategy(**got)  # Ray accepts it (initial_size between min and max)


@pytest.mark.parametrize(
    ("resources", "fits"),
    [
        (dict(), True),
        (dict(cpus_per_actor=2.0), True),
        (dict(cpus_per_actor=8.0), True),
        (dict(cpus_per_actor=9.0), False),  # no node has 9 CPUs
        (dict(gpus_per_actor=0.5), True),  # half a GPU fits on the 1-GPU node
        (dict(gpus_per_actor=2.0), False),
        (dict(cpus_per_actor=8.0, gpus_per_actor=1.0), False),  # CPUs on one node, the GPU on another
    ],
)
def test_a_label_actor_fits_only_where_one_node_has_all_it_asks_for(resources, fits):
    from stages.core.stage import LabelResources

    nodes = [{"CPU": 2.0, "GPU": 1.0, "memory": 1e9}, {"CPU": 8.0}]
    assert LabelResources(**resources).fits(nodes) is fits


def test_a_label_actor_too_big_for_the_local_ray_is_one_config_error(ray_session, teacher_dir, digits_root, tmp_path):
    """On a local Ray this process started no node will be added: waiting for one would hang the run forever."""
    from pipeline.distributed.executor import RayExecutor
    from stages.core.errors import ConfigError
    from stages.core.stage import LabelResources
    from stages.pseudo_label import label_shards

    shards = [str(digits_root / "test" / "test-000001.tar")]
    with pytest.raises(ConfigError) as info:
        label_shards(
            teacher_dir,
            "sha",
            shards,
            tmp_path,
            PseudoLabelConfig(),
            1,
            LabelResources(cpus_per_actor=3.0),
            RayExecutor(False),
            False,
        )
    message = str(info.value)
    assert "\n" not in message and "needs 3 CPUs" in message and "largest node has 2 CPUs and 0 GPUs" in message
    assert not list(tmp_path.glob("*.parquet"))


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0, 2.0])
def test_the_floor_reads_the_teachers_own_confidence_whatever_the_temperature(temperature):
    """A sample whose raw top probability is 0.2 is dropped at the paper's floor 0.3, even at T = 0.1 where its
    sharpened soft label is nearly one-hot; one at 0.5 is kept even at T = 2 where its soft label is flat."""
    from stages.maths.selection import SelectConfig, select_in_memory

    raw = torch.tensor([[0.2] + [0.8 / 9] * 9, [0.5] + [0.5 / 9] * 9])
    table = build_table("s.tar", ["low", "high"], raw.log(), [-1, -1], topk=0, temperature=temperature)
    assert table.column("confidence").to_pylist() == pytest.approx([0.2, 0.5], abs=1e-6)
    soft = np.asarray(table.column("probs").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(soft, torch.softmax(raw.log() / temperature, -1).numpy(), atol=1e-3)
    copies = select_in_memory(
        table.column("key").to_pylist(),
        table.column("label").to_numpy(),
        table.column("confidence").to_numpy(),
        10,
        SelectConfig(floor=0.3, mode="none"),
    )
    assert copies.tolist() == [0, 1]


# ---------------------------------------------------------------- decode tasks ahead of the label actors


def _assert_same_sidecars(got: Path, want: Path, shards: list[str]) -> None:
    """The same rows in the same order and footers; confidence and soft labels to rounding (the model ran on
    batches cut differently)."""
    for shard in shards:
        a, b = pq.read_table(sidecar_path(got, shard)).to_pydict(), pq.read_table(sidecar_path(want, shard)).to_pydict()
        np.testing.assert_allclose(a.pop("confidence"), b.pop("confidence"), rtol=1e-5)
        for column in ("probs", "topk_prob"):  # float16: a float32 difference can round either way
            if column in a:
                np.testing.assert_allclose(np.array(a.pop(column)), np.array(b.pop(column)), atol=1e-3)
        assert a == b and sidecar_info(sidecar_path(got, shard)) == sidecar_info(sidecar_path(want, shard))


def _bad_shard(digits_root: Path, tmp_path: Path) -> str:
    good = list(iter_raw_samples(str(digits_root / "test" / "test-000000.tar")))[:70]
    samples = [dict(s) for s in good]
    samples.insert(3, {"__key__": "broken", "png": b"\x89PNG\r\n\x1a\n truncated"})
    samples.insert(66, {"__key__": "imageless", "cls": b"4"})
    return write_shards(samples, tmp_path / "shards", "bad", 1)[0]


@pytest.mark.parametrize("topk", [0, 3])
def test_decode_tasks_write_the_sidecars_the_actors_write(teacher_dir, digits_root, tmp_path, topk):
    """``label_decode: tasks`` in this process: the same rows, order, probabilities, truth and unusable samples as
    the actors decoding themselves, over batches that straddle a shard's end and a shard of bad samples."""
    from stages.core.stage import InProcess, LabelResources
    from stages.pseudo_label import label_shards

    shards = [_bad_shard(digits_root, tmp_path), str(digits_root / "test" / "test-000001.tar")]
    cfg = PseudoLabelConfig(batch_size=32, topk=topk, temperature=2.0, max_bad_fraction=0.05)

    def label(out: str, decode: str) -> dict:
        resources = LabelResources(decode=decode)
        return label_shards(teacher_dir, "sha", shards, tmp_path / out, cfg, 1, resources, InProcess(False), False)

    actors, tasks = label("actors", "cpu"), label("tasks", "tasks")
    assert tasks["decode"] == {"tasks": 2} and actors["decode"] == {"cpu": 2}
    assert tasks["decoders"] == actors["decoders"]
    assert tasks["rows"] == actors["rows"] == 70 + 90 and [b["key"] for b in tasks["bad_samples"]] == [
        "broken",
        "imageless",
    ]
    _assert_same_sidecars(tmp_path / "tasks", tmp_path / "actors", shards)
    assert label("tasks", "tasks")["shards_resumed"] == 2  # the same sidecars: a resume keeps them


def test_an_unreadable_shard_in_a_decode_task_is_its_own_error_and_writes_no_sidecar(
    teacher_dir, digits_root, tmp_path
):
    from stages.core.stage import InProcess, LabelResources
    from stages.pseudo_label import label_shards

    src = str(digits_root / "unlabeled" / "unlabeled-000000.tar")
    shard = _cut(src, tmp_path / "shards" / "cut.tar", 1024 * 100 + 700)
    with pytest.raises(DataError) as info:
        resources = LabelResources(decode="tasks")
        label_shards(teacher_dir, "sha", [shard], tmp_path / "out", PseudoLabelConfig(), 1, resources, InProcess(False))
    assert shard in str(info.value) and "truncated" in str(info.value)
    assert not list((tmp_path / "out").rglob("*.parquet*"))


def _rows(shard: str, keys: list[str], start: int, logits: float) -> dict:
    n = len(keys)
    return {
        "key": np.array(keys, dtype=object),
        "shard": np.array([shard] * n, dtype=object),
        "index": np.arange(start, start + n),
        "truth": np.full(n, -1, np.int32),
        "rows": np.full(n, -1),
        "bad": np.array([""] * n, dtype=object),
        "decoder": np.array([""] * n, dtype=object),
        "error": np.array([b""] * n, dtype=object),
        "logits": np.full((n, 10), logits, np.float32),
        "device": np.array(["cpu"] * n, dtype=object),
    }


def _marker(shard: str, rows: int) -> dict:
    return _rows(shard, [""], rows, 0.0) | {
        "rows": np.array([rows]),
        "bad": np.array(["[]"], dtype=object),
        "decoder": np.array(["pil"], dtype=object),
    }


def test_the_assembler_takes_rows_in_any_order_each_key_once_and_writes_a_shard_once(tmp_path):
    """What retries deliver: the marker before the rows, a batch twice, a late copy after the shard was written."""
    from stages.pseudo_label import ShardAssembler

    made = {"s1": "m1", "s2": "m2"}
    assembler = ShardAssembler(tmp_path, PseudoLabelConfig(), made, 10)
    assert assembler.add(_marker("s1", 3)) == []
    assert assembler.add(_rows("s1", ["b", "c"], 1, 1.0)) == []
    assert assembler.add(_rows("s1", ["b", "c"], 1, 1.0)) == []  # a retried batch: still two of three
    assert assembler.add(_rows("s2", ["x"], 0, 0.0)) == []
    done = assembler.add(_rows("s1", ["a"], 0, 2.0))
    assert [(d["shard"], d["rows"], d["decode"], d["decoder"]) for d in done] == [("s1", 3, "tasks", "pil")]
    table = pq.read_table(sidecar_path(tmp_path, "s1"))
    assert table.column("key").to_pylist() == ["a", "b", "c"]  # the shard's order, not the arrival's
    assert read_footer(sidecar_path(tmp_path, "s1"), SIDECAR_FORMAT).made_by == "m1"
    assert assembler.add(_rows("s1", ["a"], 0, 2.0)) == []  # a late copy of a written shard
    assert assembler.pending() == ["s2"]  # begun, never completed: the stage reports it lost
    assert assembler.add(_marker("s2", 1))[0]["rows"] == 1
    assert assembler.pending() == []


def test_decode_tasks_on_ray_write_what_this_process_writes(ray_session, teacher_dir, digits_root, tmp_path):
    """The Ray executor's decode tasks (their own operator, not fused into the actors) feeding a label actor: the
    sidecars match the in-process ones; a decode task's error reaches the driver as itself."""
    from pipeline.distributed.executor import RayExecutor
    from stages.core.errors import ConfigError
    from stages.core.stage import InProcess, LabelResources
    from stages.pseudo_label import label_shards

    shards = [_bad_shard(digits_root, tmp_path), str(digits_root / "test" / "test-000001.tar")]
    cfg, resources = PseudoLabelConfig(batch_size=32, max_bad_fraction=0.05), LabelResources(decode="tasks")
    label_shards(teacher_dir, "sha", shards, tmp_path / "here", cfg, 1, resources, InProcess(False), False)
    summary = label_shards(teacher_dir, "sha", shards, tmp_path / "ray", cfg, 1, resources, RayExecutor(False), False)
    assert (summary["ran_as"], summary["decode"], summary["rows"]) == ("ray", {"tasks": 2}, 160)
    _assert_same_sidecars(tmp_path / "ray", tmp_path / "here", shards)

    cut = _cut(shards[1], tmp_path / "shards" / "cut.tar", 1024 * 50 + 700)
    with pytest.raises(DataError, match="truncated"):
        label_shards(teacher_dir, "sha", [cut], tmp_path / "cut", cfg, 1, resources, RayExecutor(False), False)
    with pytest.raises(ConfigError) as info:  # two 1-CPU actors on 2 CPUs would starve the decode tasks for ever
        too_many = LabelResources(actors=2, decode="tasks")
        label_shards(teacher_dir, "sha", shards, tmp_path / "no", cfg, 1, too_many, RayExecutor(False), False)
    assert "\n" not in str(info.value) and "leave none of this local Ray's 2 CPUs" in str(info.value)
