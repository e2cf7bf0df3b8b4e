"""Backfill: re-embedding an old gallery with the new model, planned and measured.

* ``policies.py``: the orders to re-embed in (a registry kind, ``bctool list backfill-policies``);
* ``plan.py``: a policy's order as a plan file (``bctool backfill plan``);
* ``curve.py``: the partly re-embedded gallery and the retrieval curve over the share
  re-embedded (``bctool evaluate --backfill``).

None of them needs torch.
"""

from bctool.backfill.curve import (
    SCORINGS,
    MixedRows,
    backfill_curve,
    calibrated_query,
    fit_calibration,
    order_rows,
    partial_backfill,
)
from bctool.backfill.plan import plan_order, read_plan, write_plan
from bctool.backfill.policies import (
    BLOCK,
    DEFAULT_POLICY,
    POLICIES,
    RIDGE,
    Policy,
    crowded_order,
    disagreement_order,
    norm_order,
    random_order,
    sample_pairs,
)

__all__ = [
    "BLOCK",
    "DEFAULT_POLICY",
    "POLICIES",
    "RIDGE",
    "SCORINGS",
    "MixedRows",
    "Policy",
    "backfill_curve",
    "calibrated_query",
    "crowded_order",
    "disagreement_order",
    "fit_calibration",
    "norm_order",
    "order_rows",
    "partial_backfill",
    "plan_order",
    "random_order",
    "read_plan",
    "sample_pairs",
    "write_plan",
]
