"""Google Landmarks v2 (GLDv2) retrieval, the ``gldv2`` protocol (``--solution``), in one package:

* ``files.py``: its CSV files, its image layout and the list files of ``bctool dataset gldv2``;
* ``metric.py``: mAP@100, Public and Private apart, as the official scorer computes it;
* ``protocol.py``: its registry entry (imported here, so importing the package registers it).

None of them needs torch or PIL.
"""

from bctool.evaluate.protocols.gldv2 import protocol as protocol
from bctool.evaluate.protocols.gldv2.files import (
    GLDv2Solution,
    read_retrieval_solution,
    write_gldv2_list,
)
from bctool.evaluate.protocols.gldv2.metric import (
    evaluate_gldv2,
    evaluate_gldv2_per_query,
)

__all__ = [
    "GLDv2Solution",
    "evaluate_gldv2",
    "evaluate_gldv2_per_query",
    "read_retrieval_solution",
    "write_gldv2_list",
]
