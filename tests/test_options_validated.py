"""Every count or size a user can pass is checked where the stage reads its config, before anything is
written (issue 20 item 3): one family per test, in process over the composed config, then one real
command line per family (exit 2, one `error:` line, every earlier file unchanged, nothing created)."""
from __future__ import annotations

import argparse
import shutil
import subprocess

import pytest
from omegaconf import OmegaConf

from core.config import compose_config
from tests.cli_helpers import REPO, TINY, assert_kept, assert_one_line_error, snapshot, stage


def resolved(overrides: list[str], config_name: str) -> dict:
    return OmegaConf.to_container(compose_config(overrides, config_name=config_name), resolve=True)


@pytest.mark.parametrize("override, needle", [
    ("max_images=-1", "max_images=-1 must be an integer >= 0"),
    ("batch_size=0", "batch_size=0 must be an integer >= 1"),
    ("prompts.images_per_prompt=0", "prompts.images_per_prompt=0 must be an integer >= 1"),
    ("prompts.images_per_prompt=-1", "prompts.images_per_prompt=-1"),
    ("prompts.limit=0", "prompts.limit=0 must be an integer >= 1 (or null)"),
    ("prompts.limit=abc", "prompts.limit='abc' must be an integer"),
    ("shard.count=0", "shard.count=0 must be an integer >= 1"),
    ("shard.index=-1", "shard.index=-1 must be an integer >= 0"),
    ("model.image_size=0", "model.image_size=0"),
    ("model.dtype=float13", "model.dtype='float13' is not a torch dtype"),
])
def test_decode_stage_counts(override, needle):
    from core.errors import UserError
    from decode.schema import check_counts

    with pytest.raises(UserError) as e:
        check_counts(resolved([override], "decode"))
    assert needle in str(e.value)
    for fine in (["max_images=0"], ["batch_size=4", "prompts.images_per_prompt=2", "prompts.limit=3"], []):
        check_counts(resolved(fine, "decode"))


def test_decode_device_must_exist():
    import torch

    from core.config import check_device_dtype
    from core.errors import UserError

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            check_device_dtype({"device": "cuda", "dtype": "bfloat16"})
    with pytest.raises(UserError, match="not a device name"):
        check_device_dtype({"device": "gpu0"})
    check_device_dtype({"device": "cpu", "dtype": "float32"})


@pytest.mark.parametrize("overrides, needle", [
    (["decoder=sjd2", "decoder.rho=-1"], "rho"),
    (["decoder=sjd2", "decoder.t_min=2"], "t_min"),
    (["decoder=sjd2", "decoder.signal_levels=0"], "signal_levels"),
    (["decoder=sjd2", "decoder.window=-1"], "decoder.window"),
    (["decoder=sjd", "decoder.window=0"], "decoder.window"),
])
def test_decoder_options(overrides, needle):
    from decode.schema import check_decoder

    with pytest.raises(ValueError, match=needle):
        check_decoder(resolved(overrides, "decode")["decoder"])


@pytest.mark.parametrize("override, needle", [
    ("sampling.cfg_scale=nan", "cfg_scale"), ("sampling.temperature=-1", "temperature"),
    ("sampling.top_k=-1", "top_k"), ("sampling.top_p=1.5", "top_p"),
])
def test_sampling_options(override, needle):
    from decode.sampling import SamplingConfig

    with pytest.raises(ValueError, match=needle):
        SamplingConfig(**resolved([override], "decode")["sampling"])


@pytest.mark.parametrize("override, needle", [
    ("train.max_steps=-1", "train.max_steps=-1 must be an integer >= 0"),
    ("train.epochs=-1", "train.epochs=-1"),
    ("train.log_every=0", "train.log_every=0 must be an integer >= 1"),
    ("train.ckpt_every=-1", "train.ckpt_every=-1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0"),
    ("train.stop_after_steps=-1", "train.stop_after_steps=-1"),
    ("train.micro_batch=0", "micro_batch"),
    ("train.global_batch=-1", "global_batch"),
    ("train.optim.eps=0", "eps > 0"),
    ("train.optim.weight_decay=-0.1", "weight_decay >= 0"),
    ("train.optim.grad_clip=-1", "grad_clip >= 0"),
    ("train.optim.betas=[2,0.9]", "train.optim.betas"),
    ("train.optim.warmup_steps=-1", "warmup_steps"),
    ("train.layout.segments_max=0", "segments_max"),
    ("train.noise.levels=0", "levels"),
    ("train.objective.z_loss=-1", "train.objective.z_loss"),
    ("train.objective.loss_chunk_tokens=-1", "train.objective.loss_chunk_tokens=-1"),
    ("train.objective.timestep_mlp_width=0", "train.objective.timestep_mlp_width=0"),
    ("train.data.n_examples=0", "train.data.n_examples=0"),
    ("train.data.limit=0", "train.data.limit=0"),
    ("train.data.limit=-1", "train.data.limit=-1"),
])
def test_train_counts(override, needle):
    from core.errors import UserError
    from train.config import train_config_from_dict

    with pytest.raises((ValueError, UserError)) as e:
        train_config_from_dict(resolved([override], "train")["train"])
    assert needle in str(e.value)
    train_config_from_dict(resolved(["train.max_steps=0", "train.ckpt_every=0"], "train")["train"])


@pytest.mark.parametrize("overrides, needle", [
    (["compare.n_boot=0"], "compare.n_boot=0 must be an integer >= 1"),
    (["compare.level=1.5"], "compare.level=1.5"),
    (["compare.level=0"], "compare.level=0"),
    (["wandb.grid_images=0"], "wandb.grid_images=0"),
    (["eval=coco", "eval.options.fid.batch_size=0"], "eval.options.fid.batch_size=0"),
    (["eval=coco", "eval.options.clip_score.batch_size=-4"], "eval.options.clip_score.batch_size=-4"),
    (["eval=geneval", "eval.options.geneval.threshold=1.5"], "eval.options.geneval.threshold=1.5"),
    (["eval=geneval", "eval.options.geneval.max_objects=0"], "eval.options.geneval.max_objects=0"),
])
def test_eval_numbers(overrides, needle):
    from core.errors import UserError
    from eval.checks import check_numbers

    with pytest.raises((ValueError, UserError)) as e:
        check_numbers(resolved(overrides, "eval"))
    assert needle in str(e.value)
    check_numbers(resolved(["eval=geneval"], "eval"))


@pytest.mark.parametrize("change, needle", [
    ({"limit": 0}, "LIMIT=0"), ({"limit": -1}, "LIMIT=-1"), ({"nproc": 0}, "NPROC=0"),
    ({"sjd2_path": "/nonexistent/export"}, "SJD2_PATH=/nonexistent/export does not exist"),
    ({"sjd2_path": str(REPO / "models" / "weights" / "tiny")}, "holds no sjd2.json"),
    ({"set_name": "coco2017_5k", "coco": "/nonexistent"}, "COCO=/nonexistent lacks"),
])
def test_eval_suite_counts_and_paths(change, needle):
    from bench.suite_checks import check_args
    from core.errors import UserError

    args = {"limit": None, "nproc": 1, "set_name": "shapes_coco", "coco": None, "sjd2_path": None, "out": None}
    with pytest.raises(UserError) as e:
        check_args(argparse.Namespace(**{**args, **change}))
    assert needle in str(e.value)
    check_args(argparse.Namespace(**{**args, "limit": 2, "sjd2_path": str(REPO / "models" / "weights" / "tiny_sjd2")}))


# ---------------------------------------------------------------------------------------------------
# One real command line per family


@pytest.mark.parametrize("args, needle", [
    (["decode", *TINY, "max_images=-1"], "max_images=-1"),
    (["decode", *TINY, "prompts.images_per_prompt=0"], "prompts.images_per_prompt=0"),
    (["train", "train.max_steps=-1"], "train.max_steps=-1"),
    (["eval", "compare.n_boot=0"], "compare.n_boot=0"),
    (["bench.eval_suite", "--limit", "0"], "LIMIT=0"),
    (["bench.eval_suite", "--limit", "abc"], "invalid int value: 'abc'"),
    (["bench.eval_suite", "--limit", "1", "--sjd2-path", "/nonexistent"], "SJD2_PATH=/nonexistent"),
])
def test_the_command_line_refuses_in_one_line_and_writes_nothing(tmp_path, args, needle):
    (tmp_path / "mine.txt").write_text("a file of the user's\n")
    before = snapshot(tmp_path)
    where = {"decode": "out_dir", "train": "run_dir", "bench.eval_suite": "--out"}.get(args[0])
    extra = [] if where is None else ["--out", str(tmp_path / "out")] if where == "--out" else [f"{where}={tmp_path}/out"]
    assert_one_line_error(stage(*args, *extra, cwd=tmp_path if args[0] != "bench.eval_suite" else REPO), needle)
    assert_kept(before, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_eval_coco_passes_sjd2_path_and_limit_to_the_suite():
    out = subprocess.run(["make", "-n", "eval-coco", "SJD2_PATH=/nonexistent", "LIMIT=3", "NPROC=1"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if "bench.eval_suite" in x)
    assert "--sjd2-path /nonexistent" in line and "--limit 3" in line and "--nproc 1" in line
