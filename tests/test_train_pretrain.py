"""Tiny's pretraining through the common loop (conf/train/tiny_pretrain.yaml, ``train.noise: null``): the
loss is the plain next-token loss the old recipe used, and the export carries no SJD2 recipe."""

import pytest
import torch
from omegaconf import OmegaConf

from core.config import compose_config
from models import load_adapter
from train.config import ObjectiveConfig, train_config_from_dict
from train.noising import IGNORE, make_batch, unconditional_ids
from train.objective import NoisyLM


def _pretrain_cfg(*overrides):
    conf = compose_config(["train=tiny_pretrain", *overrides], config_name="train")
    return train_config_from_dict(OmegaConf.to_container(conf.train, resolve=True))


def _records(adapter, n):
    from data import shapes

    out = []
    for i in range(n):
        caption, _, scene = shapes.example(3, i)
        prompt = adapter.prompt_ids(caption)
        out.append((prompt + adapter.encode_image(shapes.render(scene, adapter.image_size)).tolist(), len(prompt)))
    return out


def test_without_noise_the_loss_is_the_models_own_next_token_loss_on_the_image_sequence():
    adapter = load_adapter(OmegaConf.to_container(compose_config(["model=tiny_random", "model.image_size=16"]).model))
    cfg = _pretrain_cfg("train.layout.prompt_dropout=0.5")
    assert cfg.noise is None and cfg.layout.loss_on == "image"
    recs = _records(adapter, 6)
    batch = make_batch(recs, [(0, i) for i in range(6)], adapter.layout, unconditional_ids(adapter), 0,
                       cfg.layout, 0, cfg.seed)
    assert batch.levels.eq(0).all()
    ours = NoisyLM(adapter, None, None, ObjectiveConfig(z_loss=0.0))(
        batch.input_ids, batch.attention_mask, batch.labels, batch.levels, batch.noise_seeds)
    # HF's loss shifts labels itself: the label of position i is token i (IGNORE before the image)
    hf_labels = batch.input_ids.clone()
    hf_labels[:, : batch.image_start] = IGNORE
    want = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=hf_labels).loss
    torch.testing.assert_close(ours["loss"], want, atol=1e-5, rtol=1e-5)
    assert int(ours["n_tokens"]) == 6 * adapter.layout.n_tokens


def test_pretraining_runs_through_the_train_stage_and_exports_a_plain_tiny(tmp_path):
    from train.run import compose, run

    res = run(compose([
        "model=tiny_random", "model.image_size=16", "train=tiny_pretrain", "train.max_steps=3",
        "train.micro_batch=4", "train.global_batch=4", "train.bf16=false", "train.optim.warmup_steps=1",
        "train.data.n_examples=8", "train.data.source=random", f"run_dir={tmp_path / 'run'}", "progress=false",
    ]))
    assert res.steps_done == 3 and len(res.losses) == 3
    assert not (res.export_dir / "sjd2.json").exists()
    loaded = load_adapter({**OmegaConf.to_container(compose_config(["model=tiny"]).model),
                           "path": str(res.export_dir), "image_size": 16})
    assert loaded.trained_recipe() is None and "sjd2" not in loaded.config.extra


@pytest.mark.parametrize("drop, missing", [("seed", "seed"), ("architecture", "architecture")])
def test_a_random_tiny_without_its_sizes_names_the_missing_keys(drop, missing):
    cfg = OmegaConf.to_container(compose_config(["model=tiny_random"]).model)
    cfg[drop] = None
    with pytest.raises(ValueError, match=missing):
        load_adapter(cfg)
