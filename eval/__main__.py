"""``python -m eval run_dir=DIR`` or ``run_dirs='[runs/tiny/shapes/*]'`` (Hydra; ``eval=coco`` picks a suite).

A thin wrapper over :func:`eval.run.evaluate`: writes ``scores.json`` in every run dir, prints the
side-by-side Markdown table and writes it as Markdown, CSV and LaTeX (plus a sweep plot).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from decode.run import CONF_DIR
from eval.run import evaluate


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    main()
