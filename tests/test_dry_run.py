"""``dry_run=true`` plans of the train and decode stages: the architecture read without weights equals the
model the loaders build, the published 7B / 8B numbers, refusals with the one change that fits, and
nothing loaded or written by the real command lines."""
from __future__ import annotations

from dataclasses import replace

import pytest

from bench.published import EMU3_8B, LUMINA_7B, tiny
from bench.published_emu3 import write_emu3
from bench.published_lumina import write_lumina
from core.config import compose_config
from models import load_adapter
from models.meta import model_facts, param_counts
from tests.cli_helpers import REPO, snapshot, stage
from tests.test_published_checkpoints import EMU3_TINY_VQ, HF_TINY_VQ
from train.config import train_config_from_dict
from train.dryrun import make_plan, what_to_change

LUMINA = {"family": "lumina_mgpt", "name": "lumina_mgpt_768", "path": "Alpha-VLLM/Lumina-mGPT-7B-768",
          "image_size": 768}
EMU3 = {"family": "emu3", "name": "emu3_720", "path": "BAAI/Emu3-Gen-hf", "image_size": 720}


def _lm_params(s, vocab: int, qk_norm: bool) -> int:
    """Parameters of the published language models, by hand (untied embeddings and head)."""
    hd, kv = s.head_dim, s.num_key_value_heads * s.head_dim
    attn = 2 * s.hidden_size * s.hidden_size + 2 * s.hidden_size * kv
    per_layer = attn + 3 * s.hidden_size * s.intermediate_size + 2 * s.hidden_size
    per_layer += 2 * 2 * hd if qk_norm else 0  # Chameleon's q/k LayerNorm over head_dim (weight + bias)
    return 2 * vocab * s.hidden_size + s.num_hidden_layers * per_layer + s.hidden_size


@pytest.mark.parametrize("family", ["lumina", "emu3"])
def test_config_only_facts_equal_the_loaded_model(tmp_path, family):
    """model_facts reads config.json only; the numbers equal those of the model the loader builds."""
    if family == "lumina":
        path = write_lumina(tmp_path / "m", tiny(LUMINA_7B), vq=HF_TINY_VQ, seed=1)
        cfg = {**LUMINA, "path": str(path), "image_size": 64, "vq_path": None, "device": "cpu", "dtype": "float32"}
    else:
        path = write_emu3(tmp_path / "m", tiny(EMU3_8B, heads=4), vq_config=EMU3_TINY_VQ, seed=1)
        cfg = {**EMU3, "path": str(path), "image_size": 64, "device": "cpu", "dtype": "float32"}
    facts = model_facts(cfg)
    extra = ["model.vq_path=null"] if family == "lumina" else []
    adapter = load_adapter(compose_config([f"model={cfg['name']}", f"model.path={path}", "model.device=cpu",
                                           "model.dtype=float32", "model.image_size=64", *extra]).model)
    assert str(path) in facts.source
    assert (facts.n_params, facts.largest_layer) == param_counts(adapter.model)
    assert facts.image_tokens == adapter.layout.n_tokens
    assert facts.vocab == adapter.vocab_size


def test_published_architectures_without_files():
    lumina, emu3 = model_facts(LUMINA), model_facts(EMU3)
    assert "published" in lumina.source and "published" in emu3.source
    assert (lumina.image_tokens, emu3.image_tokens) == (2357, 8193)  # DESIGN: the 2357 / 8193 step counts
    lm = _lm_params(LUMINA_7B, 65536, qk_norm=True)
    assert lm <= lumina.n_params <= lm * 1.01  # + transformers' unused encoder-only Chameleon VQ
    lm = _lm_params(EMU3_8B, 184622, qk_norm=False)
    assert lm < emu3.n_params < lm * 1.05  # + the VQ-VAE inside Emu3ForConditionalGeneration
    # KV bytes per token per stream in bf16: 524,288 measured on the real-size Lumina (bench.real_size)
    assert lumina.layers * 2 * lumina.kv_heads * lumina.head_dim * 2 == 524288


def _train(name: str, **kw):
    raw = compose_config([f"train={name}"], config_name="train").train
    from omegaconf import OmegaConf

    return replace(train_config_from_dict(OmegaConf.to_container(raw, resolve=True)), **kw)


def test_train_plan_memory_terms_scale_and_the_suggestion_fits():
    facts = model_facts(LUMINA)
    from train.dryrun import DataFacts

    data = DataFacts(80_000, 2357 + 128, "test")
    base = make_plan(_train("sjd2_lumina_mgpt"), facts, data, gpus=8, nodes=1, gpu_memory_gb=80)
    assert base.fits and 12 * 2**30 < base.states_bytes < 20 * 2**30  # 18 bytes/param over 8 GPUs + a layer
    more = make_plan(_train("sjd2_lumina_mgpt"), facts, data, gpus=16, nodes=2, gpu_memory_gb=80)
    assert more.states_bytes < base.states_bytes and more.activation_bytes == base.activation_bytes
    off = make_plan(_train("sjd2_lumina_mgpt", grad_checkpointing=False), facts, data, 8, 1, 80)
    assert off.activation_bytes > 10 * base.activation_bytes and not off.fits
    fix = what_to_change(off, _train("sjd2_lumina_mgpt", grad_checkpointing=False))
    assert fix == "set train.grad_checkpointing=true"
    # too few GPUs for the states: the suggested GPU count fits, the one below it does not
    two = make_plan(_train("sjd2_lumina_mgpt", micro_batch=1), facts, data, gpus=2, nodes=1, gpu_memory_gb=40)
    assert not two.fits
    fix = what_to_change(two, _train("sjd2_lumina_mgpt", micro_batch=1))
    g = int(fix.split("gpus=")[1].split()[0])
    fits = lambda n: make_plan(_train("sjd2_lumina_mgpt", micro_batch=1, grad_checkpointing=True), facts, data,
                               n, 1, 40).fits
    assert fits(g) and not fits(g // 2)


def test_train_dry_run_command_plans_and_writes_nothing(tmp_path):
    before = snapshot(REPO / "runs") if (REPO / "runs").is_dir() else {}
    run_dir = tmp_path / "run"
    out = stage("train", "model=lumina_mgpt_768", "train=sjd2_lumina_mgpt", "dry_run=true", "gpus=8",
                "gpu_memory_gb=80", "dry_run_records=80000", f"run_dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fits" in out.stdout and "1250 per epoch x 6 epochs = 7500 optimizer steps" in out.stdout
    assert "159,040 tokens per step" in out.stdout  # 64 x (2357 image + 128 prompt tokens)
    assert not run_dir.exists() and (snapshot(REPO / "runs") if (REPO / "runs").is_dir() else {}) == before
    bad = stage("train", "model=emu3_720", "train=sjd2_emu3", "dry_run=true", "gpus=2", "gpu_memory_gb=80",
                f"run_dir={run_dir}")
    lines = [x for x in bad.stderr.splitlines() if x.startswith("error:")]
    assert bad.returncode != 0 and len(lines) == 1 and "DOES NOT FIT" in bad.stdout
    assert "gpus=" in lines[0] and not run_dir.exists()


def test_make_finetune_dry_run(tmp_path):
    import subprocess

    from tests.cli_helpers import env

    out = subprocess.run(["launch/finetune.sh", "janus_pro_7b", "8", f"run_dir={tmp_path / 'r'}"], cwd=REPO,
                         env=env(DRY_RUN="1", PY=__import__("sys").executable), capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "8 GPUs" in out.stdout and "nothing loaded" in out.stdout and not (tmp_path / "r").exists()


def test_decode_dry_run_command(tmp_path):
    out_dir = tmp_path / "d"
    ok = stage("decode", "model=lumina_mgpt_768", "decoder=sjd2_lumina_mgpt", "dry_run=true", "batch_size=16",
               "gpu_memory_gb=80", "shard.count=8", f"out_dir={out_dir}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "batch_size 16" in ok.stdout and "fits" in ok.stdout and "shard 0 decodes 25" in ok.stdout
    assert not out_dir.exists()
    bad = stage("decode", "model=emu3_720", "decoder=sjd2_emu3", "dry_run=true", "batch_size=64",
                "gpu_memory_gb=80", f"out_dir={out_dir}")
    lines = [x for x in bad.stderr.splitlines() if x.startswith("error:")]
    assert bad.returncode != 0 and len(lines) == 1, bad.stderr[-2000:]
    n = int(lines[0].split("set batch_size=")[1])
    again = stage("decode", "model=emu3_720", "decoder=sjd2_emu3", "dry_run=true", f"batch_size={n}",
                  "gpu_memory_gb=80", f"out_dir={out_dir}")
    over = stage("decode", "model=emu3_720", "decoder=sjd2_emu3", "dry_run=true", f"batch_size={n + 1}",
                 "gpu_memory_gb=80", f"out_dir={out_dir}")
    assert again.returncode == 0 and over.returncode != 0 and not out_dir.exists()
