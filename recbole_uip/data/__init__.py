"""Data side: RecBole atomic files and per-user behaviour text from the training split."""
