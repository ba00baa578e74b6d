"""``python -m decode model=tiny decoder=sjd prompts=shapes prompts.limit=8 seed=0 [out_dir=DIR]`` (Hydra).

A thin wrapper over :func:`decode.run.main` (which calls :func:`decode.run.decode_run`); ``-m`` sweeps
give every setting its own out_dir.
"""
from __future__ import annotations

from decode.run import main

if __name__ == "__main__":
    main()
