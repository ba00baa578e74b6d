"""``python -m decode model=tiny decoder=sjd prompts=shapes prompts.limit=8 seed=0 [out_dir=DIR]`` (Hydra).

A thin wrapper over :func:`decode.run.decode_run`; ``-m`` sweeps give every setting its own out_dir.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from decode.run import CONF_DIR, decode_run


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="decode")
def main(cfg: DictConfig) -> None:
    summary = decode_run(cfg)
    print(f"{summary.out_dir}: {summary.n_decoded} decoded, {summary.n_skipped} already there, "
          f"{summary.n_images} in shard {summary.shard[0]}/{summary.shard[1]}")


if __name__ == "__main__":
    main()
