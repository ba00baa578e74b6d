"""The decode stage with ``batch_size > 1``: the same images and records as batch 1, honest speed fields,
resume that loses only the images in flight, sharding, and eval's refusal of batch-1 latency."""
from __future__ import annotations

import pytest

from decode.run import decode_run
from tests.test_decode_stage import decode_cfg, make_micro_adapter, records_by_idx

PER_IMAGE = ("tokens", "n_forwards", "n_tokens", "accepted_per_forward", "extra", "seed", "image")


@pytest.fixture(scope="module")
def adapter():
    return make_micro_adapter()


class DiesAtImage:
    """The adapter, except that decoding the ``n``-th finished image to pixels raises (a killed job)."""

    def __init__(self, inner, n: int):
        self.inner, self.n, self.calls = inner, n, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode_image(self, tokens):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt("killed")
        return self.inner.decode_image(tokens)


def test_batched_run_records_what_each_row_did(tmp_path, adapter):
    one, many = tmp_path / "b1", tmp_path / "b3"
    decode_run(decode_cfg(one, "decoder=sjd", "prompts.limit=7"), adapter=adapter)
    summary = decode_run(decode_cfg(many, "decoder=sjd", "prompts.limit=7", "batch_size=3"), adapter=adapter)
    assert summary.n_decoded == 7
    a, b = records_by_idx(one), records_by_idx(many)
    assert sorted(a) == sorted(b) == list(range(7))
    for i in a:
        assert {k: a[i][k] for k in PER_IMAGE} == {k: b[i][k] for k in PER_IMAGE}
        assert (one / a[i]["image"]).read_bytes() == (many / b[i]["image"]).read_bytes()
        assert b[i]["n_forwards"] == len(b[i]["accepted_per_forward"]) and sum(b[i]["accepted_per_forward"]) == 25
        assert a[i]["batch_size"] == 1 and a[i]["latency_s"] > 0 and a[i]["in_batch_s"] is None
        assert b[i]["batch_size"] == 3 and b[i]["latency_s"] is None and b[i]["in_batch_s"] > 0
    assert len({r["loop_id"] for r in b.values()}) == 1
    assert max(r["loop_s"] for r in b.values()) >= max(r["in_batch_s"] for r in b.values())


def test_eval_reports_throughput_not_latency_for_batched_runs(tmp_path, adapter):
    from eval.compare import compare_metric
    from eval.run import load_run
    from eval.speed import latency_stats, speed_scores
    from eval.tables import build_table

    one, many = tmp_path / "b1", tmp_path / "b2"
    decode_run(decode_cfg(one, "decoder=sjd", "prompts.limit=4"), adapter=adapter)
    decode_run(decode_cfg(many, "decoder=sjd", "prompts.limit=4", "batch_size=2"), adapter=adapter)
    r1, r2 = load_run(one), load_run(many)
    s1, s2 = speed_scores(r1.records), speed_scores(r2.records)
    assert s1["batch_size"] == 1 and s1["latency_mean_s"] > 0 and s1["throughput_img_s"] > 0
    assert s2["batch_size"] == 2 and "latency_mean_s" not in s2 and s2["throughput_img_s"] > 0
    assert "batched" in s2["latency_note"]
    with pytest.raises(ValueError, match="decoded in batches"):
        latency_stats(r2.records)
    with pytest.raises(ValueError, match="decoded in batches"):
        compare_metric([r2], [r1], "latency_mean_s", n_boot=10)
    assert compare_metric([r2], [r1], "step_compression", n_boot=10)["diff"] == pytest.approx(0.0)
    # tables: a batched SJD row gets no latency speed-up from a batch-1 AR row, and a throughput speed-up
    # only over AR at its own batch size
    ar1 = {"run_dir": "ar1", "decoder": "ar", "model": "m", "prompts": "p", "seed": 0, "sampling": {}, "decoder_options": {}, "n_images": 4,
           "metrics": {"latency_mean_s": 2.0, "batch_size": 1, "throughput_img_s": 0.5}}
    ar2 = {**ar1, "run_dir": "ar2", "metrics": {"batch_size": 2, "throughput_img_s": 0.8}}
    sjd2 = {**ar1, "run_dir": "sjd", "decoder": "sjd", "metrics": {"batch_size": 2, "throughput_img_s": 2.0}}
    header, rows = build_table([ar1, ar2, sjd2])
    row = dict(zip(header, rows[2]))
    assert row.get("latency_speedup") in (None, "") and row["throughput_speedup"] == pytest.approx(2.5)


def test_killed_batched_run_loses_only_the_images_in_flight(tmp_path, adapter):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    decode_run(decode_cfg(whole, "decoder=sjd", "prompts.limit=7", "batch_size=3"), adapter=adapter)
    dying = DiesAtImage(adapter, n=4)  # three images saved, then the job dies with rows in flight
    with pytest.raises(KeyboardInterrupt):
        decode_run(decode_cfg(broken, "decoder=sjd", "prompts.limit=7", "batch_size=3"), adapter=dying)
    saved = records_by_idx(broken)
    assert len(saved) == 3
    summary = decode_run(decode_cfg(broken, "decoder=sjd", "prompts.limit=7", "batch_size=3"), adapter=adapter)
    assert summary.n_skipped == 3 and summary.n_decoded == 4  # only the unsaved images were decoded again
    a, b = records_by_idx(whole), records_by_idx(broken)
    assert sorted(a) == sorted(b) == list(range(7))
    assert all(a[i]["tokens"] == b[i]["tokens"] for i in a)
    assert len({r["loop_id"] for r in b.values()}) == 2  # two invocations, each its own throughput span


def test_batched_shards_together_equal_one_process(tmp_path, adapter):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    decode_run(decode_cfg(single, "decoder=ar", "prompts.limit=5"), adapter=adapter)
    for rank in (0, 1):
        decode_run(decode_cfg(sharded, "decoder=ar", "prompts.limit=5", "batch_size=2", f"shard.index={rank}",
                              "shard.count=2"), adapter=adapter)
    a, b = records_by_idx(single), records_by_idx(sharded)
    assert sorted(a) == sorted(b) == list(range(5))
    assert all(a[i]["tokens"] == b[i]["tokens"] and b[i]["shard"] == i % 2 for i in a)


def test_bad_batch_size_fails_before_the_run_dir_exists(tmp_path, adapter):
    out = tmp_path / "bad"
    with pytest.raises(Exception, match="batch_size"):
        decode_run(decode_cfg(out, "decoder=sjd", "batch_size=0"), adapter=adapter)
    assert not out.exists()
