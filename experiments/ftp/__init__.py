"""FTP router research: the trial and measurement scripts docs/experiments/ftp-router.md quotes (run from the
repository root: `python -m experiments.ftp.NAME`). Outside the product; tests/test_experiments.py imports each."""
