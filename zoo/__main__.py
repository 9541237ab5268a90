"""``python -m zoo base|build ...``: the zoo's command line (as ``mergeflow zoo``), with the
build's progress logged at INFO."""

import logging

from zoo.cli import app

logging.basicConfig(level=logging.INFO, format="%(message)s")
app(prog_name="python -m zoo")
