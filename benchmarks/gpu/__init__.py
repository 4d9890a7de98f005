"""The GPU build benchmark (run.sh, one device call; README.md)."""
