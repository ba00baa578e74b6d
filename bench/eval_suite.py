"""``make eval-coco`` / ``make eval-geneval``: decode one prompt set with AR, SJD and SJD2 and score it
(the papers' Tables 1 and 2), through the real stages, resumable.

Each row is a run dir under ``--out`` decoded by ``python -m decode`` (under torchrun with ``--nproc`` > 1:
one shard per process; re-running the command resumes every shard where it stopped), then all rows are
scored side by side by the eval stage (tables in Markdown / CSV / LaTeX and plots in ``--out``).

Models: ``tiny`` (the default: AR + SJD on ``tiny``, AR + SJD2 on ``tiny_sjd2``, on the embedded
COCO-format shapes set, with ground-truth renders as FID's floor), ``lumina_mgpt`` / ``emu3`` /
``janus_pro_1b`` / ``janus_pro_7b`` (AR + SJD
on the released model, SJD2 on your fine-tuned export given by ``--sjd2-path``; without it the SJD2 row
is left out with a note). Sets: ``shapes_coco``, ``coco2017_5k``, ``coco2014_30k`` (``--coco /data/coco``:
``annotations/captions_valYYYY.json`` and ``valYYYY/``), ``geneval`` and ``shapes_geneval``.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from core.errors import UserError, one_line_errors
from core.rundir import CONF_DIR

# model -> rows of (model config, decoder config, extra overrides); "SJD2" marks the fine-tuned model's rows
ROWS: dict[str, list[tuple[str, str, str]]] = {
    "tiny": [("tiny", "ar", ""), ("tiny", "sjd", ""), ("tiny_sjd2", "ar", ""), ("tiny_sjd2", "sjd2_tiny", "")],
    "lumina_mgpt": [("lumina_mgpt_768", "ar", ""), ("lumina_mgpt_768", "sjd_lumina_mgpt", ""),
                    ("lumina_mgpt_768", "sjd2_lumina_mgpt", "SJD2")],
    "emu3": [("emu3_720", "ar", ""), ("emu3_720", "sjd_emu3", ""), ("emu3_720", "sjd2_emu3", "SJD2")],
    **{m: [(m, "ar", ""), (m, "sjd_janus_pro", ""), (m, "sjd2_janus_pro", "SJD2")]
       for m in ("janus_pro_1b", "janus_pro_7b", "janus_tiny_random")},
}
# issue 19's decoder family (``--decoders`` / ``DECODERS=``): conf/decoder/<name>.yaml on tiny, <name>_<model>.yaml
# (the papers' settings) on the real models; rows laid out after SJD's. sjd2 names the fine-tuned model's rows.
DEFAULT_DECODERS = ("ar", "sjd", "sjd2")
FAMILY = ("scd", "sjd_pac", "gsd")


def pick_rows(model: str, decoders: Sequence[str]) -> list[tuple[str, str, str]]:
    """The rows of :data:`ROWS` ``[model]`` named by ``decoders`` plus the family's, in table order."""
    unknown = sorted(set(decoders) - {*DEFAULT_DECODERS, *FAMILY})
    if unknown:
        raise UserError(f"unknown decoder(s) {unknown} in DECODERS (pick from "
                         f"{','.join((*DEFAULT_DECODERS, *FAMILY))})")
    out = []
    for model_conf, decoder, mark in ROWS[model]:
        kind = "sjd2" if mark or model_conf.endswith("_sjd2") else decoder.split("_")[0]
        if kind in decoders:
            out.append((model_conf, decoder, mark))
        if kind == "sjd":
            for d in (d for d in FAMILY if d in decoders):
                preset = f"{d}_{model}" if model != "tiny" else d
                if not (CONF_DIR / "decoder" / f"{preset}.yaml").is_file():
                    raise UserError(f"no {d} preset for MODEL={model} (conf/decoder/{preset}.yaml); "
                                    f"leave {d} out of DECODERS")
                out.append((model_conf, preset, ""))
    return out


# set -> (decode overrides, eval suite); {coco} is --coco
SETS: dict[str, tuple[list[str], str]] = {
    "shapes_coco": (["prompts=shapes_coco"], "shapes_coco"),
    "coco2017_5k": (["prompts=coco2017_5k", "prompts.path={coco}/annotations/captions_val2017.json",
                     "prompts.image_dir={coco}/val2017"], "coco"),
    "coco2014_30k": (["prompts=coco2014_30k", "prompts.path={coco}/annotations/captions_val2014.json",
                      "prompts.image_dir={coco}/val2014"], "coco"),
    "geneval": (["prompts=geneval"], "geneval"),
    "shapes_geneval": (["prompts=shapes", "prompts.geneval_folder=true"], "shapes_geneval"),
}
EVAL_OVERRIDES = {"coco": ["eval.options.fid.reference_dir={coco}/{val}"]}


def plan(model: str, set_name: str, out: Path, coco: str | None, sjd2_path: str | None,
         limit: int | None, seed: int, decoders: Sequence[str] = DEFAULT_DECODERS) -> list[tuple[Path, list[str]]]:
    """(run dir, decode overrides) of every row."""
    if model not in ROWS:
        raise UserError(f"unknown MODEL {model!r}; pick one of {sorted(ROWS)}")
    if set_name not in SETS:
        raise UserError(f"unknown SET {set_name!r}; pick one of {sorted(SETS)}")
    if set_name.startswith("coco") and not coco:
        raise UserError(f"SET={set_name} needs COCO=/path/to/coco (with annotations/ and val20XX/)")
    prompt_args = [a.format(coco=coco) for a in SETS[set_name][0]]
    if limit:
        prompt_args.append(f"prompts.limit={limit}")
    rows = []
    for model_conf, decoder, mark in pick_rows(model, decoders):
        extra = []
        if sjd2_path and model_conf.endswith("_sjd2"):  # tiny: your export replaces the committed tiny_sjd2
            extra = [f"model.path={sjd2_path}"]
        if mark == "SJD2":
            if not sjd2_path:
                print(f"note: no --sjd2-path (SJD2_PATH=...): the {decoder} row is left out; fine-tune with "
                      "`make finetune` and pass its export dir")
                continue
            extra = [f"model.path={sjd2_path}", f"model.name={model_conf}_sjd2", "model.random_init=false"]
        name = f"{model_conf if mark != 'SJD2' else model_conf + '_sjd2'}_{decoder}"
        rows.append((out / name, [f"model={model_conf}", f"decoder={decoder}", *prompt_args, *extra,
                                  f"seed={seed}", f"out_dir={out / name}"]))
    return rows


def decode(overrides: Sequence[str], nproc: int) -> None:
    """One row through ``python -m decode`` (sharded under torchrun when ``nproc`` > 1)."""
    head = [sys.executable, "-m", "decode"] if nproc <= 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "decode"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if nproc > 1 else "")}
    if not env["OMP_NUM_THREADS"]:
        env.pop("OMP_NUM_THREADS")
    proc = subprocess.Popen([*head, *overrides], env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the row's decode too: it ends and prints the one line
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            proc.wait()
        raise SystemExit(130) from None
    if code:  # the decode printed its own one line (error, or the interrupt): add none, keep its status
        print(f"[eval-suite] decoding stopped (exit {code}): python -m decode {' '.join(overrides)}; fix the cause "
              "and re-run the same command (finished images are kept)")
        raise SystemExit(code if code in (2, 130) else 1)


def compose_eval(args: argparse.Namespace, out: Path, run_dirs: Sequence[str]) -> dict:
    """The eval stage's config for the rows (``eval=<suite>`` + ``ARGS`` overrides), as a plain mapping."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from core.config import compose_config

    suite = SETS[args.set_name][1]
    val = {"coco2017_5k": "val2017", "coco2014_30k": "val2014"}.get(args.set_name, "")
    eval_args = [a.format(coco=args.coco, val=val) for a in EVAL_OVERRIDES.get(suite, [])]
    try:
        cfg = compose_config([f"eval={suite}", f"run_dirs=[{','.join(run_dirs)}]", f"table_dir={out}",
                              f"name={args.set_name}", *eval_args, *args.eval_overrides], config_name="eval")
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"the eval overrides {list(args.eval_overrides)} do not compose: {e}") from None


@one_line_errors
def main(argv: Sequence[str] | None = None) -> None:
    from bench.suite_checks import OneLineParser, check_args, check_eval_config

    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help=f"one of {sorted(ROWS)}")
    ap.add_argument("--set", default="shapes_coco", dest="set_name", help=f"one of {sorted(SETS)}")
    ap.add_argument("--coco", default=None, help="COCO root: annotations/ and val2014/ or val2017/")
    ap.add_argument("--sjd2-path", default=None, help="the fine-tuned model's export dir (real models)")
    ap.add_argument("--nproc", type=int, default=1, help="decode processes (one per GPU)")
    ap.add_argument("--limit", type=int, default=None, help="first N prompts only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decoders", default=",".join(DEFAULT_DECODERS),
                    help=f"rows, comma-separated, from {','.join((*DEFAULT_DECODERS, *FAMILY))}")
    ap.add_argument("--out", default=None, help="default: runs/eval_<set>/<model>")
    ap.add_argument("eval_overrides", nargs="*", help="overrides of the eval stage, e.g. wandb.mode=offline")
    args = ap.parse_args(argv)
    check_args(args)  # counts and paths: checked before anything decodes (bench/suite_checks.py)
    out = Path(args.out or f"runs/eval_{args.set_name}/{args.model}")
    rows = plan(args.model, args.set_name, out, args.coco, args.sjd2_path, args.limit, args.seed,
                args.decoders.split(","))
    eval_cfg = compose_eval(args, out, [str(d) for d, _ in rows])  # the eval overrides, checked now too
    check_eval_config(eval_cfg)
    t0 = time.perf_counter()
    for run_dir, overrides in rows:
        t = time.perf_counter()
        decode(overrides, args.nproc)
        print(f"[eval-suite] {run_dir.name}: decoded in {time.perf_counter() - t:.1f} s")
    run_dirs = [str(d) for d, _ in rows]
    if args.set_name == "shapes_coco":  # the floor: the same captions rendered again (another scene draw)
        from data.shapes_coco import write_render_run
        from models import resolve_path

        gt = out / "renders_ground_truth"
        write_render_run(gt, resolve_path("runs/cache/shapes_coco"), scene_seed=1, limit=args.limit)
        run_dirs.append(str(gt))
    from eval.run import evaluate

    evaluate(compose_eval(args, out, run_dirs))
    print(f"[eval-suite] {len(rows)} rows decoded and scored in {time.perf_counter() - t0:.1f} s -> {out}")


if __name__ == "__main__":
    main()
