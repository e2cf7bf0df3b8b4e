"""Why AdvBCT trails here: its elastic radius, its discriminator and its gradients, measured.

    python experiments/paper_table.py --diagnostics --results docs/paper/diagnostics/runs \
        --settings extended-class extended-data-fashion --methods advbct --seeds 0 1 2
    python experiments/advbct_diagnostics.py docs/paper/diagnostics/runs

Reads the runs that ``paper_table.py --diagnostics`` wrote (each run's JSON then holds every
epoch's loss parts and side measurements, and AdvBCT's final boundary radii) and writes, beside
the runs folder, ``diagnostics.md`` (one row per setting, mean over seeds) and
``diagnostics.png``:

* the old classes' IQR-filtered r_max against the elastic radius r̃ after training, with T;
* the discriminator's accuracy on each batch (0.5: it cannot tell new from old features);
* the share of each loss part in the gradient that reaches the embedding,
  |dL_part/df| / sum over parts (``grad_PART``; AdvBCT's ``adv`` after the gradient reversal);
* the share of old-class samples outside their boundary (``violating``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bctool.train.methods import METHODS

PARTS = ("cls", *METHODS.entry("advbct").declares["parts"])  # the classification loss and AdvBCT's own


def load_runs(folder: Path) -> dict[str, list[dict]]:
    """Setting -> the diagnosed runs (those with a ``history`` of side measurements)."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*/seed*/*.json")):
        row = json.loads(path.read_text())
        if row.get("history") and "disc_acc" in row["history"][0]:
            runs.setdefault(f"{row['setting']} {row['method']}", []).append(row)
    return runs


def grad_shares(epoch: dict[str, float]) -> dict[str, float]:
    """Each part's share of the summed gradient norms at the embedding, for one epoch's means."""
    norms = {p: epoch.get(f"grad_{p}", 0.0) for p in PARTS}
    total = sum(norms.values()) or 1.0
    return {p: v / total for p, v in norms.items()}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary_row(name: str, rows: list[dict]) -> dict[str, float | str]:
    """Mean over seeds of the first and last epoch's measurements and the radii's medians."""
    def mean(get) -> float:  # noqa: ANN001
        return statistics.fmean(get(r) for r in rows)

    first, last = (lambda r: r["history"][0]), (lambda r: r["history"][-1])
    out: dict[str, float | str] = {"run": name, "seeds": len(rows)}
    if all("compat" in r for r in rows):
        out["T"] = rows[0]["compat"]["threshold"]
        out["r_max median"] = mean(lambda r: _median(r["compat"]["radius_max"]))
        out["r̃ median (end)"] = mean(lambda r: _median(r["compat"]["radius"]))
    for label, pick in (("first", first), ("last", last)):
        out[f"disc_acc {label}"] = mean(lambda r, pick=pick: pick(r)["disc_acc"])
        out[f"violating {label}"] = mean(lambda r, pick=pick: pick(r)["violating"])
        for part in PARTS:
            out[f"grad share {part} {label}"] = mean(lambda r, pick=pick, part=part: grad_shares(pick(r))[part])
    out["self / cross mAP"] = f"{100 * mean(lambda r: r['self']['map']):.1f} / {100 * mean(lambda r: r['cross']['map']):.1f}"
    return out


def markdown(rows: list[dict]) -> str:
    """One table, a column per measurement."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    for r in rows:
        cells = [f"{r[k]:.2f}" if isinstance(r.get(k), float) else str(r.get(k, "-")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    """Radii histograms, discriminator accuracy and gradient shares per epoch, a row per run."""
    from bctool.utils.plotting import pyplot, save_figure

    plt = pyplot("the AdvBCT diagnostics plot")
    fig, axes = plt.subplots(len(runs), 3, figsize=(13, 3.3 * len(runs)), squeeze=False)
    for (name, rows), (hist, disc, grads) in zip(runs.items(), axes):
        if all("compat" in r for r in rows):
            radius_max = [v for r in rows for v in r["compat"]["radius_max"]]
            radius = [v for r in rows for v in r["compat"]["radius"]]
            hist.hist([radius_max, radius], bins=30, label=["r_max (old data)", "r̃ after training"])
            hist.axvline(rows[0]["compat"]["threshold"], color="grey", linestyle="--", label="T")
            hist.legend(fontsize="x-small")
        hist.set_title(f"{name}: boundary radii (all seeds)", fontsize="small")
        epochs = range(1, len(rows[0]["history"]) + 1)
        for key, style in (("disc_acc", "-"), ("violating", ":")):
            disc.plot(epochs, [statistics.fmean(r["history"][e - 1][key] for r in rows) for e in epochs],
                      linestyle=style, label=key)
        disc.axhline(0.5, color="grey", linewidth=0.8)
        disc.set_ylim(0, 1)
        disc.set_title("discriminator accuracy, share outside the boundary", fontsize="small")
        disc.legend(fontsize="x-small")
        for part in PARTS:
            grads.plot(epochs, [statistics.fmean(grad_shares(r["history"][e - 1])[part] for r in rows) for e in epochs],
                       label=part)
        grads.set_ylim(0, 1)
        grads.set_title("share of the gradient at the embedding", fontsize="small")
        grads.legend(fontsize="x-small")
        for ax in (disc, grads):
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
    save_figure(fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the --results folder of paper_table.py --diagnostics")
    args = parser.parse_args()
    runs = load_runs(args.runs)
    if not runs:
        parser.error(f"no diagnosed runs in {args.runs}; run paper_table.py --diagnostics first")
    table = markdown([summary_row(name, rows) for name, rows in runs.items()])
    (args.runs.parent / "diagnostics.md").write_text(table + "\n")
    plot(runs, args.runs.parent / "diagnostics.png")
    print(table)


if __name__ == "__main__":
    main()
