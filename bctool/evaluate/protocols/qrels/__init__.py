"""Relevance judgments (TREC qrels) as ground truth: the files (``files.py``), trec_eval's
measures (``metric.py``) and the registry entry (``protocol.py``)."""

from bctool.evaluate.protocols.qrels import protocol  # noqa: F401 - registers ``qrels``
