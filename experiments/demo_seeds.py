"""`bctool demo` over five seeds: how often one run's verdict holds, and what the seeds show.

    # one demo a seed, each in its own work folder (a few minutes each on two CPU cores)
    for s in 0 1 2 3 4; do OMP_NUM_THREADS=1 bctool demo --workdir runs/demo-seeds/seed$s --seed $s -q; done
    python experiments/demo_seeds.py --collect runs/demo-seeds/seed*      # copies each summary.json, runs the backfills
    python experiments/demo_seeds.py                                       # the tables again, from the stored files

``--collect`` copies each work folder's ``summary.json`` (the demo's figures with the command,
revision and torch thread count that made them) to ``docs/demo/seeds5/seedS.json`` and, on the
same folder's files, measures the partial backfill of the demo's gallery with the new
(recipe) model's queries, in the order of ``bctool backfill plan`` (``norm``, the default) and in
a random order (``--seed S``), at every tenth of the gallery, by running the commands themselves:
``docs/demo/seeds5/backfill-seedS.json`` keeps both curves with the commands and the revision
(and seed 0's norm curve is drawn to ``backfill-norm-seed0.png``).

From the stored files it writes ``docs/demo/seeds5/table.md``:

- per seed: M(o,o), M(n,n), M(n,o), M(*,*), AdvBCT's (paper regime, from scratch) M(n,n) and
  M(n,o), the delta M(n,o) - M(o,o) with its bootstrap interval over queries, and whether that
  single run's gate (the interval above 0, ``compatible_significant``) passed;
- the paired t test over the seed deltas (:func:`bctool.evaluate.seeds.paired_seed_test`) with its
  minimum detectable effect, and how many of the single runs pass the gate;

and ``docs/demo/seeds5/backfill.md``: per seed the norm plan's curve at every tenth and its area
(the mean mAP over the share re-embedded), the random order's area, the norm curve's lowest point
against its 0% point, and the paired t test of norm - random over the seeds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bctool.evaluate.seeds import paired_seed_test
from bctool.workflow import revision

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "demo" / "seeds5"
FRACTIONS = ",".join(f"{i / 10:g}" for i in range(11))


def _bctool(args: list[str], cwd: Path) -> dict:
    """Run ``bctool ARGS -q`` in ``cwd`` (the code this process imports) and return its JSON."""
    proc = subprocess.run([sys.executable, "-m", "bctool", *args, "-q"], cwd=cwd, capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise SystemExit(f"bctool {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout)


def backfill(workdir: Path, seed: int, out: Path) -> dict:
    """The norm plan's and a random order's curves on one demo's files, with the commands."""
    files = ["--query", "new_query.safetensors", "--old-query", "old_query.safetensors",
             "--old-gallery", "old_gallery.safetensors", "--new-gallery", "new_gallery.safetensors"]
    plan = ["backfill", "plan", "old_gallery.safetensors", "--out", "plan-norm.txt"]
    norm = ["evaluate", "--backfill", FRACTIONS, *files, "--order", "plan-norm.txt"]
    if seed == 0:
        norm += ["--plot", str((out / "backfill-norm-seed0.png").resolve())]
    random = ["evaluate", "--backfill", FRACTIONS, *files, "--seed", str(seed)]
    _bctool(plan, workdir)
    runs = {"norm": _bctool(norm, workdir), "random": _bctool(random, workdir)}
    for report in runs.values():
        report.pop("plot", None)  # a path on the machine that ran it
    commands = [" ".join(["bctool", *args, "-q"]) for args in (plan, norm, random)]
    return {"seed": seed, "revision": revision(), "commands": commands, **runs}


def _seed(summary: dict) -> int:
    """The ``--seed`` of the command that wrote a demo summary (0, the default, when not given)."""
    words = shlex.split(summary["command"])
    for i, word in enumerate(words):
        if word == "--seed":
            return int(words[i + 1])
        if word.startswith("--seed="):
            return int(word.split("=", 1)[1])
    return 0


def collect(workdirs: list[Path], out: Path) -> None:
    """Each work folder's summary and backfill curves into ``out``, under the summary's seed."""
    out.mkdir(parents=True, exist_ok=True)
    for workdir in workdirs:
        summary = json.loads((workdir / "summary.json").read_text())
        seed = _seed(summary)
        shutil.copyfile(workdir / "summary.json", out / f"seed{seed}.json")
        (out / f"backfill-seed{seed}.json").write_text(json.dumps(backfill(workdir, seed, out), indent=1) + "\n")
        print(f"seed {seed}: {workdir} collected", file=sys.stderr)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _test_row(deltas: list[float]) -> str:
    t = paired_seed_test(deltas)
    verdict = "above 0" if t.low > 0 else "below 0" if t.high < 0 else "not shown"
    return (f"| {t.seeds} | {t.mean:+.2f} | [{t.low:+.2f}, {t.high:+.2f}] | {t.p:.3f} | {t.mde:.2f} | {verdict} |")


TEST_HEADER = ["| seeds | mean delta | paired 95% interval | p | MDE (80%) | verdict |", "| --- | --- | --- | --- | --- | --- |"]


def table(out: Path) -> str:
    """The Markdown tables of the demo's summaries stored in ``out``."""
    runs = {int(p.stem.removeprefix("seed")): json.loads(p.read_text()) for p in sorted(out.glob("seed*.json"))}
    seeds = sorted(runs)
    revisions = sorted({runs[s].get("revision") or "unknown" for s in seeds})
    threads = sorted({runs[s].get("torch_threads") for s in seeds})
    lines = [(f"**`bctool demo`, seeds {seeds}** (default options but `--seed`; revision {', '.join(revisions)}; "
              f"torch threads {', '.join(map(str, threads))}); mAP %, delta in mAP points"), "",
             ("| seed | M(o,o) | M(n,n) | M(n,o) | M(\\*,\\*) | AdvBCT paper regime: M(n,n) / M(n,o) | delta M(n,o) - M(o,o) "
              "| 95% bootstrap interval (queries) | single run's gate: interval above 0 | seconds |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    deltas = []
    for s in seeds:
        r = runs[s]
        ref = r.get("published") or {}
        advbct = f"{_pct(ref['M(n,n)'])} / {_pct(ref['M(n,o)'])}" if ref else "-"
        deltas.append(100 * r["delta"])
        lines.append(f"| {s} | {_pct(r['M(o,o)'])} | {_pct(r['M(n,n)'])} | {_pct(r['M(n,o)'])} | {_pct(r['M(*,*)'])} | {advbct} "
                     f"| {100 * r['delta']:+.2f} | [{100 * r['delta_low']:+.2f}, {100 * r['delta_high']:+.2f}] "
                     f"| {'passes' if r['compatible_significant'] else 'fails'} | {r['seconds']:.0f} |")
    mean = {k: statistics.fmean(100 * runs[s][k] for s in seeds) for k in ("M(o,o)", "M(n,n)", "M(n,o)", "M(*,*)")}
    sd = {k: statistics.stdev(100 * runs[s][k] for s in seeds) for k in mean} if len(seeds) > 1 else {k: 0.0 for k in mean}
    cells = " | ".join(f"{mean[k]:.1f} ± {sd[k]:.1f}" for k in mean)
    lines.append(f"| mean ± std | {cells} | | {statistics.fmean(deltas):+.2f} | | | |")
    passed = sum(bool(runs[s]["compatible_significant"]) for s in seeds)
    compatible = sum(bool(runs[s]["compatible"]) for s in seeds)
    lines += ["", (f"Single runs: M(n,o) > M(o,o) in {compatible} of {len(seeds)} seeds; the gate (bootstrap interval "
                   f"above 0) passes in {passed} of {len(seeds)}.")]
    if len(seeds) > 1:
        lines += ["", "**The paired t test over the seed deltas** M_s(n,o) - M_s(o,o), mAP points:", "", *TEST_HEADER,
                  _test_row(deltas)]
    return "\n".join(lines) + "\n"


def backfill_table(out: Path) -> str | None:
    """The Markdown tables of the backfill curves stored in ``out`` (None when there are none)."""
    lines: list[str] = []
    fills = {int(p.stem.removeprefix("backfill-seed")): json.loads(p.read_text()) for p in sorted(out.glob("backfill-seed*.json"))}
    if fills:
        revisions = sorted({fills[s].get("revision") or "unknown" for s in fills})
        tenths = [f"{10 * i}%" for i in range(11)]
        lines += [(f"**Partial backfill of the demo's gallery** (seeds {sorted(fills)}; revision {', '.join(revisions)}): "
                   "the new model's queries against the old gallery with each share re-embedded by the new model, in "
                   "the order of `bctool backfill plan` (norm) and in a random order; mAP %; area: the mean mAP over "
                   "the share re-embedded"), "",
                  "| seed | order | " + " | ".join(tenths) + " | area | lowest - 0% point |",
                  "| --- | --- | " + " | ".join("---" for _ in tenths) + " | --- | --- |"]
        areas = []
        for s in sorted(fills):
            for order in ("norm", "random"):
                report = fills[s][order]
                key = report["metric"]
                points = [p[key] for p in sorted(report["curve"], key=lambda p: float(p["fraction"]))]
                lines.append(f"| {s} | {order} | " + " | ".join(_pct(x) for x in points)
                             + f" | {100 * report['area']:.2f} | {100 * (min(points) - points[0]):+.2f} |")
            areas.append(100 * (fills[s]["norm"]["area"] - fills[s]["random"]["area"]))
        lines += ["", "**The norm plan's area minus the random order's**, per seed: "
                  + ", ".join(f"{a:+.2f}" for a in areas) + " mAP points"
                  + ("; the paired t test over the seeds:" if len(areas) > 1 else ".")]
        if len(areas) > 1:
            lines += ["", *TEST_HEADER, _test_row(areas)]
    return "\n".join(lines) + "\n" if lines else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collect", type=Path, nargs="+", default=None,
                        help="demo work folders: copy each summary.json and measure its backfill first")
    parser.add_argument("--out", type=Path, default=OUT, help="the folder of the stored files and the table")
    args = parser.parse_args()
    if args.collect:
        collect(args.collect, args.out)
    text = table(args.out)
    (args.out / "table.md").write_text(text)
    print(text)
    fills = backfill_table(args.out)
    if fills:
        (args.out / "backfill.md").write_text(fills)
        print(fills)


if __name__ == "__main__":
    main()
