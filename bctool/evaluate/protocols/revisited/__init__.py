"""Revisited Oxford/Paris (Radenović et al., CVPR 2018), the ``revisited`` protocol (``--gnd``), in
one package:

* ``files.py``: its ground-truth pickles (``gnd_roxford5k.pkl``, ``gnd_rparis6k.pkl``), read by
  an unpickler that builds nothing but plain containers and numpy arrays;
* ``metric.py``: mAP and mP@k for each difficulty (:data:`DIFFICULTIES`: easy, medium, hard);
* ``protocol.py``: its registry entry (imported here, so importing the package registers it).

None of them needs torch or PIL.
"""

from bctool.evaluate.protocols.revisited import protocol as protocol
from bctool.evaluate.protocols.revisited.files import RevisitedGroundTruth, load_gnd
from bctool.evaluate.protocols.revisited.metric import (
    DIFFICULTIES,
    evaluate_revisited,
    evaluate_revisited_per_query,
)

__all__ = [
    "DIFFICULTIES",
    "RevisitedGroundTruth",
    "evaluate_revisited",
    "evaluate_revisited_per_query",
    "load_gnd",
]
