"""The research apparatus beside the teaching core, each run as python -m experiments.NAME."""
