"""The SJD2 objective and the single-process training loop (train/objective.py, train/loop.py, train/run.py)."""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.noisy import EmbeddingNorm, NoiseConfig, make_signal, noisy_embedding
from models.tiny import build
from tests.conftest import micro_config
from tests.test_noising import records
from train.config import DataConfig, OptimConfig, TrainConfig, train_config_from_dict
from train.engines import deepspeed_config, lr_factor
from train.loop import LossLog, fit
from train.noising import NoiseLayoutConfig, make_batch, unconditional_ids
from train.objective import NoisyLM, ObjectiveConfig, row_noise
from train.plan import BatchPlan

NOISE = NoiseConfig(levels=5)


def micro(seed: int = 0):
    """A fresh micro tiny model (the same weights for the same seed): 4x4 codes, 8 codes, 1 layer."""
    return build(micro_config(n_codes=8, hidden_size=32, num_hidden_layers=1), seed=seed, image_size=16)


def config(**kw) -> TrainConfig:
    base = TrainConfig(
        name="micro", max_steps=6, micro_batch=2, global_batch=4, ckpt_every=2, keep_checkpoints=2,
        optim=OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.01, grad_clip=1.0),
        layout=NoiseLayoutConfig(span_max=8, segments_max=3), noise=NOISE,
    )
    return replace(base, **kw)


def module_for(adapter, objective: ObjectiveConfig | None = None, noise: NoiseConfig = NOISE) -> NoisyLM:
    return NoisyLM(adapter, noise, EmbeddingNorm.from_adapter(adapter), objective or ObjectiveConfig())


def fixed_batch(adapter, n: int = 4, clean_share: float = 0.0):
    recs = records(adapter, n)
    return make_batch(recs, [(0, i) for i in range(n)], adapter.layout, unconditional_ids(adapter), 0,
                      NoiseLayoutConfig(clean_share=clean_share, span_max=8), NOISE.levels, 0)


def loss_on(module: NoisyLM, b) -> float:
    with torch.no_grad():
        return float(module(b.input_ids, b.attention_mask, b.labels, b.levels, b.noise_seeds)["loss"])


# ---------------------------------------------------------------------------------------------------
# Objective


def test_inputs_are_clean_embeddings_plus_models_noisy_noise_at_noised_positions():
    adapter = micro()
    module = module_for(adapter)
    b = fixed_batch(adapter)
    with torch.no_grad():
        got = module.inputs_embeds(b.input_ids, b.levels, b.noise_seeds)  # [B, T, D]
        clean = adapter.embed(b.input_ids)
        noisy = b.levels > 0
        eps = row_noise(b.levels, b.noise_seeds, clean.shape[-1], clean.device)
        want = noisy_embedding(clean[noisy], b.levels[noisy], eps, EmbeddingNorm.from_adapter(adapter), NOISE,
                               make_signal(NOISE, adapter))
    assert noisy.any()
    torch.testing.assert_close(got[~noisy], clean[~noisy], rtol=0, atol=0)
    torch.testing.assert_close(got[noisy], want)
    assert (got[noisy] - clean[noisy]).abs().amax(-1).min() > 1e-3, "a noised position kept its clean input"


def test_loss_is_cross_entropy_on_the_next_clean_token_plus_z_loss():
    adapter = micro()
    b = fixed_batch(adapter)
    module = module_for(adapter, ObjectiveConfig(z_loss=0.1))
    with torch.no_grad():
        out = module(b.input_ids, b.attention_mask, b.labels, b.levels, b.noise_seeds)
        embeds = module.inputs_embeds(b.input_ids, b.levels, b.noise_seeds)
        logits = adapter.lm_head(adapter.backbone(inputs_embeds=embeds, attention_mask=b.attention_mask).last_hidden_state)
        keep = b.labels != -100
        ce = torch.nn.functional.cross_entropy(logits[keep].float(), b.labels[keep])
        z = torch.logsumexp(logits[keep].float(), -1).pow(2).mean()
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["loss"], ce + 0.1 * z)
    assert int(out["n_tokens"]) == 4 * 16


def test_chunked_head_loss_equals_the_unchunked_one_with_gradients():
    b = fixed_batch(micro())
    grads = []
    for chunk in (0, 7):
        adapter = micro()
        module = module_for(adapter, ObjectiveConfig(loss_chunk_tokens=chunk))
        out = module(b.input_ids, b.attention_mask, b.labels, b.levels, b.noise_seeds)
        out["loss"].backward()
        grads.append((float(out["loss"].detach()), adapter.lm_head.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)


def test_timestep_mlp_option_starts_as_a_no_op_and_is_trained():
    adapter = micro()
    b = fixed_batch(adapter)
    mlp_noise = replace(NOISE, timestep_signal="mlp")
    with_mlp = module_for(adapter, noise=mlp_noise)
    none = module_for(adapter, noise=replace(NOISE, timestep_signal="none"))
    assert loss_on(with_mlp, b) == pytest.approx(loss_on(none, b), rel=1e-6)  # zero-initialised output layer
    with_mlp(b.input_ids, b.attention_mask, b.labels, b.levels, b.noise_seeds)["loss"].backward()
    assert with_mlp.timestep_mlp.net[-1].weight.grad.abs().sum() > 0
    assert any(k.startswith("timestep_mlp.") for k in with_mlp.state_dict())


# ---------------------------------------------------------------------------------------------------
# Loop


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tmp_path):
    adapter = micro()
    b = fixed_batch(adapter)
    before = loss_on(module_for(adapter), b)
    recs = records(adapter, 4)  # one global batch: every step sees these sequences
    res = fit(adapter, recs, config(max_steps=12, ckpt_every=0), tmp_path / "run", progress=False)
    after = loss_on(module_for(adapter), b)
    assert after < before - 0.3, (before, after)
    assert res.losses[-1] < res.losses[0]


def test_resume_after_a_kill_reproduces_the_uninterrupted_run_exactly(tmp_path):
    recs = records(micro(), 12)
    full = fit(micro(), recs, config(), tmp_path / "full", progress=False)
    killed = fit(micro(), recs, config(stop_after_steps=3), tmp_path / "resumed", progress=False)
    assert killed.steps_done == 3 and killed.export_dir is None
    resumed = fit(micro(), recs, config(), tmp_path / "resumed", progress=False)  # a fresh process would do this
    assert killed.losses + resumed.losses == full.losses  # bit-for-bit
    curve = lambda d: [(r["step"], r["loss"], r["lr"]) for r in LossLog.read(d / "loss.csv")]
    assert curve(tmp_path / "resumed") == curve(tmp_path / "full")
    from safetensors.torch import load_file

    a, b = (load_file(str(r.export_dir / "model.safetensors")) for r in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_setting_and_a_used_run_dir_without_resume(tmp_path):
    recs = records(micro(), 12)
    fit(micro(), recs, config(stop_after_steps=2), tmp_path / "r", progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        fit(micro(), recs, config(), tmp_path / "r", resume=False, progress=False)
    with pytest.raises(ValueError, match="global_batch"):
        fit(micro(), recs, config(global_batch=8), tmp_path / "r", progress=False)


def test_export_loads_as_a_tiny_model_and_carries_the_noise_recipe(tmp_path):
    from models.tiny import load, random_vq

    adapter = micro()
    adapter.vq = random_vq(adapter.config, 0)
    res = fit(adapter, records(adapter, 4), config(max_steps=2), tmp_path / "run", progress=False)
    loaded = load(res.export_dir, image_size=16)
    for k, v in adapter.model.state_dict().items():  # tiny stores float16 on disk (models.tiny.save)
        torch.testing.assert_close(loaded.model.state_dict()[k], v.to(torch.float16).float(), rtol=0, atol=0)
    recipe = loaded.config.extra["sjd2"]
    assert NoiseConfig(**recipe["noise"]) == NOISE
    assert json.loads((res.export_dir / "sjd2.json").read_text())["noise"] == recipe["noise"]
    mean, _ = EmbeddingNorm.from_adapter(micro()).mean, None
    assert recipe["norm"]["mean"] == pytest.approx(mean.tolist())  # the starting weights' stats


def test_bf16_autocast_and_gradient_checkpointing_train(tmp_path):
    recs = records(micro(), 4)
    plain = fit(micro(), recs, config(max_steps=2, ckpt_every=0), tmp_path / "a", progress=False)
    adapter = micro()
    ckpt = fit(adapter, recs, config(max_steps=2, ckpt_every=0, grad_checkpointing=True), tmp_path / "b",
               progress=False)
    assert getattr(adapter.model, "is_activation_checkpointing", None) or adapter.model.is_gradient_checkpointing
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)  # recomputation changes nothing
    bf16 = fit(micro(), recs, config(max_steps=2, ckpt_every=0, bf16=True), tmp_path / "c", progress=False)
    assert bf16.losses == pytest.approx(plain.losses, rel=0.05) and bf16.losses != plain.losses


def test_logger_gets_every_row_and_the_run_dir_holds_the_curve(tmp_path):
    rows = []
    fit(micro(), records(micro(), 4), config(max_steps=3), tmp_path / "run", progress=False,
        logger=lambda row, step: rows.append((step, row["loss"])))
    assert [s for s, _ in rows] == [1, 2, 3] and all(math.isfinite(v) for _, v in rows)
    for f in ("loss.csv", "loss.png", "env.json"):
        assert (tmp_path / "run" / f).is_file(), f


# ---------------------------------------------------------------------------------------------------
# Plan, schedule, config


def test_batch_plan_splits_each_global_batch_over_ranks_and_visits_each_record_once_per_epoch():
    one = BatchPlan(n_records=20, global_batch=8, micro_batch=2, world=1, seed=3)
    two = BatchPlan(n_records=20, global_batch=8, micro_batch=2, world=2, seed=3)
    assert (one.accumulation, two.accumulation, one.steps_per_epoch) == (4, 2, 2)
    for step in range(4):
        glob = [k for mb in one.micro_keys(step, 0) for k in mb]
        split = [k for r in range(2) for mb in two.micro_keys(step, r) for k in mb]
        assert sorted(glob) == sorted(split) and len(set(glob)) == 8
    epoch0 = [k for s in range(2) for mb in one.micro_keys(s, 0) for k in mb]
    assert len(set(epoch0)) == 16 and {e for e, _ in epoch0} == {0}


def test_impossible_batch_configs_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="not divisible"):
        BatchPlan(n_records=100, global_batch=64, micro_batch=8, world=3, seed=0)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        BatchPlan(n_records=10, global_batch=16, micro_batch=8, world=1, seed=0)


def test_lr_warms_up_then_follows_cosine_or_stays_constant():
    cos = OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, 20, cos) for s in range(20)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(f[3:])) and f[-1] == pytest.approx(0.1, abs=0.01)
    const = OptimConfig(warmup_steps=2, schedule="constant")
    assert [lr_factor(s, 20, const) for s in (0, 1, 5, 19)] == [0.5, 1.0, 1.0, 1.0]


def test_train_configs_mirror_the_dataclasses_and_compose():
    from omegaconf import OmegaConf

    from train.run import CONF_DIR, compose

    for path in sorted((CONF_DIR / "train").glob("*.yaml")):
        cfg = compose([f"train={path.stem}"])
        raw = OmegaConf.to_container(cfg.train, resolve=True)
        tc = train_config_from_dict(raw)
        assert tc.name == path.stem
        assert set(raw) == set(TrainConfig.__dataclass_fields__), path  # every option is named in the YAML
        for group in ("optim", "layout", "noise", "objective", "data"):
            if raw[group] is None:  # only the noise may be absent (tiny_pretrain: plain next-token training)
                assert group == "noise" and tc.noise is None, (path, group)
                continue
            assert set(raw[group]) == set(type(getattr(tc, group)).__dataclass_fields__), (path, group)
    with pytest.raises(ValueError, match="unknown train config keys"):
        train_config_from_dict({"lr": 1.0})


def test_deepspeed_json_takes_batch_and_precision_from_the_train_config_and_refuses_conflicts(tmp_path):
    cfg = config(micro_batch=2, global_batch=8)
    plan = BatchPlan(16, 8, 2, 2, 0)
    ds = deepspeed_config(cfg, plan, "cpu")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 2, 8)
    assert ds["bf16"]["enabled"] is False and ds["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match="bf16"):
        deepspeed_config(replace(cfg, bf16=True), plan, "cpu")  # zero3_cpu.json is fp32
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        deepspeed_config(replace(cfg, deepspeed_config=str(bad)), plan, "cpu")
    with pytest.raises(FileNotFoundError, match="DeepSpeed config"):
        deepspeed_config(replace(cfg, deepspeed_config=str(tmp_path / "none.json")), plan, "cpu")


def test_missing_data_is_a_clear_error(tmp_path):
    from train.run import load_records

    with pytest.raises(FileNotFoundError, match="python -m train.data"):
        load_records(micro(), DataConfig(source="shards", path=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="train.data.path"):
        load_records(micro(), DataConfig(source="shards", path=None))
    with pytest.raises(ValueError, match="source"):
        DataConfig(source="web")


def test_the_stage_runs_from_hydra_overrides_and_reads_shards(tmp_path):
    """`python -m train ...` in-process: shards from train/data.py, one process, weights exported."""
    import datasets

    from models import load_adapter
    from models.tiny import load
    from train.run import compose, random_records, run

    shard_root = tmp_path / "shards"
    overrides = [
        "model=tiny_random", "model.image_size=16", f"run_dir={tmp_path / 'run'}", "progress=false",
        "train.data.source=shards", f"train.data.path={shard_root}", "train.max_steps=2", "train.micro_batch=2",
        "train.global_batch=4", f"train.export_dir={tmp_path / 'export'}", "train.noise.levels=5",
    ]
    recs = random_records(load_adapter(compose(overrides).model), 8, 0)
    datasets.Dataset.from_dict({"input_ids": [r[0] for r in recs], "prompt_len": [r[1] for r in recs]}) \
        .save_to_disk(str(shard_root / "shard_00000"))
    res = run(compose(overrides))
    assert res.steps_done == 2 and len(LossLog.read(tmp_path / "run" / "loss.csv")) == 2
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert load(tmp_path / "export", image_size=16).config.extra["sjd2"]["noise"]["levels"] == 5
    assert Path(res.export_dir) == tmp_path / "export"


def test_hf_models_export_with_save_pretrained_and_load_back_with_their_recipe(tmp_path):
    """The real-model path on a tiny random Lumina-mGPT (Chameleon classes): train, export, reload."""
    from safetensors.torch import load_file

    from models import load_adapter
    from train.run import compose, run

    res = run(compose([
        "model=lumina_mgpt_tiny_random", "model.image_size=64", "train=sjd2_lumina_mgpt", "train.bf16=false",
        "train.data.source=random", "train.data.n_examples=2", "train.max_steps=1", "train.micro_batch=2",
        "train.global_batch=2", "train.optim.lr=1e-3", "train.optim.warmup_steps=0",
        "train.objective.loss_chunk_tokens=16", f"run_dir={tmp_path / 'run'}", f"train.export_dir={tmp_path / 'x'}",
        "progress=false",
    ]))
    assert res.export_dir == tmp_path / "x" and (tmp_path / "x" / "sjd2.json").is_file()
    loaded = load_adapter({"family": "lumina_mgpt", "name": "lumina_sjd2", "path": str(tmp_path / "x"),
                           "image_size": 64, "device": "cpu", "dtype": "float32", "local_files_only": True,
                           "random_init": False, "vq_path": None})
    saved = load_file(str(tmp_path / "x" / "model.safetensors"))
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    base = load_adapter(compose(["model=lumina_mgpt_tiny_random", "model.image_size=64"]).model).model.state_dict()
    assert any(not torch.equal(base[k], v) for k, v in saved.items())  # the weights were trained


def test_wandb_offline_logs_the_run_into_the_run_dir(tmp_path):
    from train.run import compose, run

    run(compose([
        "model=tiny_random", "model.image_size=16", "train.data.source=random", "train.data.n_examples=4",
        "train.max_steps=1", "train.micro_batch=2", "train.global_batch=4", f"run_dir={tmp_path}",
        f"train.export_dir={tmp_path / 'export'}", "progress=false", "wandb.mode=offline",
    ]))
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))


def test_the_mlp_timestep_signal_is_exported_beside_the_model(tmp_path):
    from safetensors.torch import load_file

    from models.noisy import TimestepMLP

    noise = replace(NOISE, timestep_signal="mlp")
    res = fit(micro(), records(micro(), 4), config(max_steps=2, noise=noise), tmp_path / "run", progress=False)
    state = load_file(str(res.export_dir / "timestep_mlp.safetensors"))
    mlp = TimestepMLP(32, width=ObjectiveConfig().timestep_mlp_width)
    mlp.load_state_dict(state)  # strict: the decoder can rebuild it from the recipe
    assert state["net.2.weight"].abs().sum() > 0  # trained away from its zero init
