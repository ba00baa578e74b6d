"""``python -m eval run_dir=DIR`` or ``run_dirs='[runs/tiny/shapes/*]'`` (Hydra; ``eval=coco`` picks a suite).

A thin wrapper over :func:`eval.run.main` (which calls :func:`eval.run.evaluate`): writes ``scores.json``
in every run dir, prints the side-by-side Markdown table and writes it as Markdown, CSV and LaTeX (plus a
sweep plot).
"""
from __future__ import annotations

from eval.run import main

if __name__ == "__main__":
    main()
