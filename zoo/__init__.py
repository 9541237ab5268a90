"""The demo zoo: a real base model and K task specialists fine-tuned from it, plus the lm-eval
tasks that measure them. Deterministic from the seed.

Modules, one job each: ``content`` (the word pools, data in ``words.json``), ``data`` (task
rows and the lm-eval include folder, with the JSONL loader in ``evals/loader.py``), ``train``
(fine-tuning and log-likelihood scoring), ``base`` (fetching the base model) and ``build``
(tasks + specialists + ``zoo.json``); its command line is ``mergeflow zoo`` (``flows/cli.py``).
Its settings are the ``zoo`` section of params.yaml (``merging.pipeline_params.ZooSection``).
The zoo uses the ``merging`` library only; the pipeline (``tasks``, ``flows``) never runs inside it.
"""

from zoo.base import fetch_base
from zoo.build import build
from zoo.data import TASKS, make_rows, write_evals
from zoo.train import score, train_specialist

__all__ = ["TASKS", "build", "fetch_base", "make_rows", "score", "train_specialist", "write_evals"]
