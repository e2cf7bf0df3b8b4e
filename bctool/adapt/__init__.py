"""Upgrades without retraining: maps between embedding spaces (``bctool adapt``), applied to
embeddings files (``bctool transform``), to extraction and to exported models.

embeddings (two models, same images) -> adapt -> adapter file -> transform / extract / export
"""

from bctool.adapt.adapter import Adapter, fit_adapter, load_adapter, pair_by_id, save_adapter
from bctool.adapt.maps import ADAPTERS
from bctool.adapt.transform import slerp, transform_file

__all__ = ["ADAPTERS", "Adapter", "fit_adapter", "load_adapter", "pair_by_id", "save_adapter", "slerp",
           "transform_file"]
