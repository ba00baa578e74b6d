"""``python -m train [model=...] [train=...] [overrides]``: the SJD2 fine-tuning stage (see train/run.py)."""
from train.run import main

main()
