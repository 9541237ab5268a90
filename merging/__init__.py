"""mergeflow's pure merge library: methods, kernels, tensor plan and checkpoint I/O.

Public entry points: ``merge_tensors`` (one tensor group) and ``merge_checkpoints``
(whole models, streamed). Imports torch, safetensors, pydantic and huggingface_hub only;
never prefect or dvc.
"""

from merging.api import merge_tensors
from merging.config import MergeConfig, load_merge_config, parse_merge_config
from merging.pipeline import merge_checkpoints
from merging.registry import get_method, method_names

__all__ = [
    "MergeConfig",
    "get_method",
    "load_merge_config",
    "merge_checkpoints",
    "merge_tensors",
    "method_names",
    "parse_merge_config",
]
