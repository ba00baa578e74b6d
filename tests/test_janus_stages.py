"""Janus-Pro in every stage, on tiny random configs: greedy SJD / SJD2 (clean-only) == AR at batch 1 and in
batches; SJD2 fine-tuning with the noise in the aligner's output space (plain and, slow, ZeRO-3 on 2 CPU
processes), its export decoding with the presets; a guidance scale of 1 recorded; the eval suite's rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from decode.sampling import SamplingConfig
from models.janus import N_CODES, JanusProConfig, RandomSizes, build_random
from tests.conftest import reinit
from tests.hf_helpers import random_config
from tests.test_batch import TEXTS, alone_and_batched, assert_rows_equal

REPO = Path(__file__).resolve().parents[1]
GREEDY = SamplingConfig(cfg_scale=5.0, top_k=1)
TINY = ["model=janus_tiny_random", "model.image_size=64"]
# micro_batch 1 x accumulation 4 (1 process) or x 2 (2 processes) = global batch 4; 5 noise levels
TRAIN = [*TINY, "train=sjd2_janus_pro", "train.bf16=false", "train.data.source=random", "train.data.n_examples=8",
         "train.max_steps=3", "train.micro_batch=1", "train.global_batch=4", "train.optim.lr=3e-3",
         "train.optim.warmup_steps=1", "train.noise.levels=5", "train.layout.span_max=8",
         "train.objective.loss_chunk_tokens=8", "train.ckpt_every=0", "progress=false"]


@pytest.fixture(scope="module")
def janus64():
    cfg = random_config(JanusProConfig, RandomSizes(), {"name": "janus_b", "image_size": 64, "seed": 1})
    return reinit(build_random(cfg), seed=2)


@pytest.mark.parametrize("name", ["sjd", "sjd2"])
def test_greedy_sjd_and_clean_only_sjd2_equal_ar_alone_and_in_batches(janus64, name):
    """Batch 4 with refill (5 prompts of different lengths): every row equals its batch-1 decode, which
    equals greedy AR token for token (sjd2: accept_only_clean_inputs=true, untrained model)."""
    texts = TEXTS[:5]
    ar_alone, ar_batched, _, _ = alone_and_batched(janus64, "ar", GREEDY, texts=texts)
    assert_rows_equal(ar_alone, ar_batched)
    alone, batched, _, _ = alone_and_batched(janus64, name, GREEDY, texts=texts)
    assert_rows_equal(alone, batched)
    assert len({len(janus64.prompt_ids(t)) for t in texts}) > 2
    for a, ar in zip(alone, ar_alone):
        assert torch.equal(a.tokens, ar.tokens) and ar.n_forwards == 16
    assert any(a.n_forwards < 16 for a in alone)  # windows committed several codes somewhere


@pytest.fixture(scope="module")
def janus384():
    from core.config import compose_config
    from models import load_adapter

    return reinit(load_adapter(compose_config(["model=janus_tiny_random"]).model))


def _greedy_576(adapter, decoder: str, *extra: str):
    from omegaconf import OmegaConf

    from core.config import compose_config
    from decode.api import generate

    dec = OmegaConf.to_container(compose_config([f"decoder={decoder}", *extra]).decoder, resolve=True)
    return generate(adapter, "a red circle", dec, GREEDY, torch.Generator().manual_seed(0))


def test_the_sjd_preset_decodes_576_codes_as_greedy_ar(janus384):
    """decoder=sjd_janus_pro (window 16) at 384 px: the AR tokens in fewer forwards (316 of 576 here)."""
    ar, sjd = _greedy_576(janus384, "ar"), _greedy_576(janus384, "sjd_janus_pro")
    assert ar.n_forwards == ar.tokens.numel() == 576
    assert torch.equal(sjd.tokens, ar.tokens) and sjd.n_forwards < 576


@pytest.mark.slow
def test_the_sjd2_preset_clean_only_decodes_576_codes_as_greedy_ar(janus384):
    """decoder=sjd2_janus_pro (window 96, 25 steps) with accept_only_clean_inputs=true (~30 s on 1 core)."""
    ar = _greedy_576(janus384, "ar")
    sjd2 = _greedy_576(janus384, "sjd2_janus_pro", "decoder.accept_only_clean_inputs=true")
    assert torch.equal(sjd2.tokens, ar.tokens) and sjd2.n_forwards < 576


def test_noisy_inputs_live_in_the_aligners_output_space(janus64):
    """NoisyLM's inputs: clean positions exactly adapter.embed (text table / generation embedding + aligner),
    noisy ones the SJD2 noise around the aligned code embedding, normalised by the aligned rows' statistics;
    labels are codes; the distillation teacher (a copy of the model) embeds the same way."""
    from models.noisy import EmbeddingNorm, NoiseConfig, make_signal, noisy_embedding
    from train.noising import NoiseLayoutConfig, make_batch, unconditional_ids
    from train.objective import NoisyLM, ObjectiveConfig, row_noise
    from train.run import random_records

    noise = NoiseConfig(levels=5)
    norm = EmbeddingNorm.from_adapter(janus64)
    module = NoisyLM(janus64, noise, norm, ObjectiveConfig(distill=1.0))
    layout_cfg = NoiseLayoutConfig(clean_share=0.0, prompt_dropout=0.0, span_max=8)
    batch = make_batch(random_records(janus64, 2, 0), [(0, 0), (0, 1)], janus64.layout, unconditional_ids(janus64),
                       janus64.pad_id, layout_cfg, noise.levels, seed=0)
    with torch.no_grad():
        got = module.inputs_embeds(batch.input_ids, batch.levels, batch.noise_seeds)
        clean = janus64.embed(batch.input_ids)
        noisy = batch.levels > 0
        eps = row_noise(batch.levels, batch.noise_seeds, clean.shape[-1], clean.device)
        want = noisy_embedding(clean[noisy], batch.levels[noisy], eps, norm, noise, make_signal(noise, janus64))
        out = module(batch.input_ids, batch.attention_mask, batch.labels, batch.levels, batch.noise_seeds,
                     image_start=batch.image_start)
    assert int(noisy.sum()) > 0 and torch.equal(got[~noisy], clean[~noisy])
    torch.testing.assert_close(got[noisy], want)
    labels = batch.labels[batch.labels != -100]
    assert labels.numel() == 2 * 16 and int(labels.max()) < N_CODES
    assert torch.isfinite(out["loss"]) and abs(float(out["distill"])) < 1e-6  # the untrained teacher == the model


def _decode(tmp_path: Path, name: str, *overrides: str, adapter=None):
    from core.config import compose_config
    from decode.run import decode_run

    out = tmp_path / name
    decode_run(compose_config([*TINY, "prompts.limit=2", "progress=false", "warmup=false", f"out_dir={out}",
                               *overrides]), adapter=adapter)
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return yaml.safe_load((out / "config.yaml").read_text()), records


def test_finetune_exports_a_recipe_that_decodes_with_sjd2(tmp_path):
    from core.config import compose_config
    from models import load_adapter
    from models.noisy import EmbeddingNorm
    from train.run import compose, run

    res = run(compose([*TRAIN, f"run_dir={tmp_path / 'run'}", f"train.export_dir={tmp_path / 'x'}"]))
    assert res.steps_done == 3 and res.losses[-1] < res.losses[0]
    export = [f"model.path={tmp_path / 'x'}", "model.random_init=false", "model.name=janus_sjd2"]
    loaded = load_adapter(compose_config([*TINY, *export]).model)
    recipe = loaded.trained_recipe()
    start = load_adapter(compose_config(TINY).model)
    assert recipe.noise.levels == 5 and recipe.training["name"] == "sjd2_janus_pro"
    assert torch.equal(recipe.norm.mean, EmbeddingNorm.from_adapter(start).mean)  # statistics of the start
    moved = [k for k, v in loaded.model.state_dict().items() if not torch.equal(v, start.model.state_dict()[k])]
    assert any("generation_" in k for k in moved) and any("language_model" in k for k in moved)
    greedy = ["sampling.top_k=1"]
    _, ar = _decode(tmp_path, "ar", *export, *greedy)
    _, sjd2 = _decode(tmp_path, "sjd2", *export, *greedy, "decoder=sjd2_janus_pro", "decoder.window=6",
                      "decoder.denoise_steps=5", "decoder.accept_only_clean_inputs=true")
    assert [r["tokens"] for r in sjd2] == [r["tokens"] for r in ar] and all(r["n_forwards"] == 16 for r in ar)
    _, lossy = _decode(tmp_path, "lossy", *export, "decoder=sjd2_janus_pro", "decoder.window=6",
                       "decoder.denoise_steps=5")
    assert all(len(r["tokens"]) == 16 and r["n_forwards"] <= 16 for r in lossy)


class StreamCounter:
    """The adapter, recording how many streams (CFG rows) every forward carries."""

    def __init__(self, inner):
        self.inner, self.streams = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, inputs_embeds, *args, **kwargs):
        self.streams.append(int(inputs_embeds.shape[0]))
        return self.inner.forward(inputs_embeds, *args, **kwargs)


def test_guidance_scale_1_is_allowed_and_recorded(tmp_path, janus64):
    """Janus-Pro expects 5; 1 (no guidance: one stream) runs, and config.yaml says so beside the default."""
    one, five = StreamCounter(janus64), StreamCounter(janus64)
    conf, records = _decode(tmp_path, "cfg1", "sampling.cfg_scale=1", adapter=one)
    assert conf["sampling"]["cfg_scale"] == 1.0 and conf["model"]["sampling_defaults"]["cfg_scale"] == 5.0
    default, _ = _decode(tmp_path, "cfg5", adapter=five)
    assert default["sampling"]["cfg_scale"] == 5.0
    assert set(one.streams) == {1} and set(five.streams) == {2} and all(r["n_forwards"] == 16 for r in records)


def test_the_eval_suite_and_make_run_janus_pro():
    from bench.eval_suite import plan

    rows = plan("janus_pro_1b", "coco2017_5k", Path("out"), "/coco", None, None, 0)
    assert [r[1][:2] for r in rows] == [["model=janus_pro_1b", "decoder=ar"],
                                        ["model=janus_pro_1b", "decoder=sjd_janus_pro"]]
    rows = plan("janus_pro_7b", "geneval", Path("out"), None, "/x", 8, 0)
    assert rows[-1][1][:5] == ["model=janus_pro_7b", "decoder=sjd2_janus_pro", "prompts=geneval", "prompts.limit=8",
                               "model.path=/x"] and "model.random_init=false" in rows[-1][1]
    for target, want in (("eval-coco", "--set coco2017_5k --model janus_pro_1b"),
                         ("eval-geneval", "--set geneval --model janus_pro_1b"), ("finetune", "finetune.sh janus_pro_1b 8")):
        out = subprocess.run(["make", "-n", target, "MODEL=janus_pro_1b", "COCO=/coco"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
        assert want in out, (target, out)


@pytest.mark.slow
def test_zero3_on_two_cpu_processes_matches_one_process_and_exports(tmp_path):
    """launch/finetune.sh janus_tiny_random 2 (DeepSpeed ZeRO-3, gloo): the loss curve of one plain process,
    and an export that loads and decodes."""
    from core.config import compose_config
    from models import load_adapter
    from train.loop import LossLog
    from train.run import compose, run

    plain = run(compose([*TRAIN, f"run_dir={tmp_path / 'plain'}", f"train.export_dir={tmp_path / 'plain_x'}"]))
    env = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(["bash", "launch/finetune.sh", "janus_tiny_random", "2", *TRAIN[1:], f"run_dir={tmp_path / 'ds'}",
                           f"train.export_dir={tmp_path / 'ds_x'}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DeepSpeed" in proc.stdout + proc.stderr
    ds = [float(r["loss"]) for r in LossLog.read(tmp_path / "ds" / "loss.csv")]
    assert ds == pytest.approx(plain.losses, rel=1e-4) and ds[-1] < ds[0]
    loaded = load_adapter(compose_config([*TINY, f"model.path={tmp_path / 'ds_x'}", "model.random_init=false"]).model)
    assert loaded.trained_recipe().noise.levels == 5
    ref = load_adapter(compose_config([*TINY, f"model.path={tmp_path / 'plain_x'}", "model.random_init=false"]).model)
    for name, value in loaded.model.state_dict().items():
        rel = float((value - ref.model.state_dict()[name]).norm() / ref.model.state_dict()[name].norm().clamp_min(1e-12))
        assert rel < 1e-3, (name, rel)
