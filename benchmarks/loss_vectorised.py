"""AdvBCT's losses and old statistics, vectorised (the package) vs per-sample Python loops.

    python benchmarks/loss_vectorised.py           # batch 256, 2,000 classes, D=256, 50,000 old embeddings
    python benchmarks/loss_vectorised.py --quick   # batch 256, 500 classes, 10,000 old embeddings

The references follow the original AdvBCT code's shape: the boundary loss loops over the samples
of the batch (distance to the class center, elastic radius of the class, violation), and the old
statistics loop over classes (select the class's rows, center, radii and angles, 1.5·IQR filter,
max). Both use the package's quantile rule (q1 = sorted[n // 4], q3 = sorted[3n // 4]) so the
values can be compared exactly; the adversarial term is batched in both, as in the original.

Checks first that both give the same values (loss parts, gradients of the embeddings and of the
boundary weights, every statistic), then times each: the loss as forward + backward, the
statistics as one call. Timings are the median of several repetitions; torch's thread count is
left at its default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import save_result  # this folder is on sys.path when run

from bctool.models import ModelConfig, create_model
from bctool.train.compat import compute_old_stats
from bctool.train.compat.stats import OldStats
from bctool.train.methods import MethodContext, create_method


def make_old_embeddings(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clustered old embeddings with a few outliers, their labels, and a 70% old-class mask.

    The first classes get 0, 1, 2 and 3 rows so the n <= 1, n in {2, 3} and n >= 4 rules all run.
    """
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    fixed = torch.tensor([1, 2, 2, 3, 3, 3], dtype=torch.int64)  # class 0 empty
    rest = torch.randint(4, classes, (n - fixed.numel(),), generator=g)
    labels = torch.cat([fixed, rest])
    emb = centers[labels] + 0.7 * torch.randn(n, dim, generator=g)
    outliers = torch.rand(n, generator=g) < 0.01
    emb[outliers] = 3 * torch.randn(int(outliers.sum()), dim, generator=g)
    old_classes = torch.rand(classes, generator=g) < 0.7
    return emb, labels, old_classes


# --- references: the original implementation's loops -------------------------------------------


def _filtered_max_ref(values: torch.Tensor) -> float:
    n = values.numel()
    if n <= 1:
        return 0.0
    if n >= 4:
        s = torch.sort(values).values
        q1, q3 = s[n // 4], s[(3 * n) // 4]
        iqr = q3 - q1
        values = values[(values >= q1 - 1.5 * iqr) & (values <= q3 + 1.5 * iqr)]
    return float(values.max())


def old_stats_reference(old: torch.Tensor, labels: torch.Tensor, classes: int, old_classes: torch.Tensor) -> OldStats:
    """One class at a time, selecting its rows with a mask over all N (as the original did)."""
    dim = old.shape[1]
    centers = torch.zeros(classes, dim)
    counts = torch.zeros(classes, dtype=torch.int64)
    radius_max = torch.zeros(classes)
    theta_max = torch.zeros(classes)
    for k in range(classes):
        rows = old[labels == k]
        counts[k] = rows.shape[0]
        if rows.shape[0] == 0:
            continue
        normed = F.normalize(rows.float(), dim=1)
        center = normed.double().mean(0).float()
        centers[k] = center
        radii = (normed - center).norm(dim=1)
        angles = torch.arccos((normed @ F.normalize(center, dim=0)).clamp(-1.0, 1.0))
        radius_max[k] = _filtered_max_ref(radii)
        theta_max[k] = _filtered_max_ref(angles)
    return OldStats(centers, counts, radius_max, theta_max, (counts >= 1) & old_classes)


def boundary_reference(loss, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """L_bound one sample at a time: distance, elastic radius, violation."""
    stats, threshold = loss.ctx.stats, loss.params.threshold
    total, violators = embeddings.new_zeros(()), 0
    for i in range(embeddings.shape[0]):
        k = int(labels[i])
        if not (bool(stats.is_old[k]) and int(stats.counts[k]) > 1):
            continue
        distance = (F.normalize(embeddings[i], dim=0) - stats.centers[k]).norm()
        r = stats.radius_max[k]
        elastic = (r - threshold).abs() * torch.sigmoid(loss.boundary_weight[k])
        radius = r + elastic if float(r) < threshold else r - elastic
        excess = distance - radius
        if float(excess.detach()) > 0:
            total = total + excess
            violators += 1
    return total / max(violators, 1)


def loss_reference(loss, embeddings, labels, ref_embeddings) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {
        "adv": loss.adv_weight * loss.adversarial(embeddings, ref_embeddings),
        "bound": boundary_reference(loss, embeddings, labels),
    }


# --- timing -------------------------------------------------------------------------------------


def _median_time(fn, repeats: int) -> float:  # noqa: ANN001
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _loss_and_grads(fn, loss, emb: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:  # noqa: ANN001
    emb.grad, loss.boundary_weight.grad = None, None
    parts = fn()
    sum(parts.values()).backward()
    return {k: v.detach() for k, v in parts.items()}, emb.grad.clone(), loss.boundary_weight.grad.clone()


def run(args: argparse.Namespace) -> dict:
    """Check equality, time both versions of the loss and of the statistics."""
    old, labels, old_classes = make_old_embeddings(args.old_n, args.dim, args.classes, args.seed)
    fast_stats = compute_old_stats(old, labels, args.classes, old_classes)
    ref_stats = old_stats_reference(old, labels, args.classes, old_classes)
    for name in ("centers", "radius_max", "theta_max"):
        torch.testing.assert_close(getattr(fast_stats, name), getattr(ref_stats, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(fast_stats.counts, ref_stats.counts) and torch.equal(fast_stats.is_old, ref_stats.is_old)
    stats_fast_s = _median_time(lambda: compute_old_stats(old, labels, args.classes, old_classes), args.repeats)
    stats_ref_s = _median_time(lambda: old_stats_reference(old, labels, args.classes, old_classes),
                               max(1, args.repeats // 3))

    torch.manual_seed(args.seed)
    model = create_model(ModelConfig(arch="small", embedding_dim=args.dim, num_classes=args.classes))
    loss = create_method("advbct", MethodContext(stats=fast_stats, model=model))
    loss.set_progress(1, 3, 10, 30)  # mid-training: alpha and the adversarial weight are not trivial
    g = torch.Generator().manual_seed(args.seed + 1)
    batch_labels = labels[torch.randint(0, labels.numel(), (args.batch,), generator=g)]
    ref_emb = fast_stats.centers[batch_labels] + 0.05 * torch.randn(args.batch, args.dim, generator=g)
    emb = (fast_stats.centers[batch_labels] + 0.08 * torch.randn(args.batch, args.dim, generator=g)).requires_grad_()

    fast = lambda: loss(emb, batch_labels, ref_emb, batch_labels)  # noqa: E731
    ref = lambda: loss_reference(loss, emb, batch_labels, ref_emb)  # noqa: E731
    fast_parts, fast_grad, fast_wgrad = _loss_and_grads(fast, loss, emb)
    ref_parts, ref_grad, ref_wgrad = _loss_and_grads(ref, loss, emb)
    for k in fast_parts:
        torch.testing.assert_close(fast_parts[k], ref_parts[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast_wgrad, ref_wgrad, rtol=1e-5, atol=1e-7)
    loss_fast_s = _median_time(lambda: _loss_and_grads(fast, loss, emb), args.repeats)
    loss_ref_s = _median_time(lambda: _loss_and_grads(ref, loss, emb), args.repeats)

    with torch.no_grad():
        has_boundary = fast_stats.has_boundary[batch_labels]
        distance = (F.normalize(emb, dim=1) - fast_stats.centers[batch_labels]).norm(dim=1)
        violating = int((has_boundary & (distance > loss.boundary_radii()[batch_labels])).sum())
    return {
        "batch": args.batch,
        "classes": args.classes,
        "dim": args.dim,
        "old_embeddings": args.old_n,
        "torch_threads": torch.get_num_threads(),
        "values_match": True,
        "loss_parts": {k: round(float(v), 6) for k, v in fast_parts.items()},
        "batch_rows_with_boundary": int(has_boundary.sum()),
        "batch_rows_violating": violating,
        "loss_fwd_bwd_ms": {"vectorised": round(1000 * loss_fast_s, 3), "loop": round(1000 * loss_ref_s, 3)},
        "loss_speedup": round(loss_ref_s / loss_fast_s, 1),
        "old_stats_ms": {"vectorised": round(1000 * stats_fast_s, 1), "loop": round(1000 * stats_ref_s, 1)},
        "old_stats_speedup": round(stats_ref_s / stats_fast_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="loss batch size")
    parser.add_argument("--classes", type=int, default=2_000, help="number of classes")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension")
    parser.add_argument("--old-n", type=int, default=50_000, help="old embeddings for the statistics")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions (a third for the slow stats)")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--quick", action="store_true", help="small run: 500 classes, 10,000 old embeddings")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file, with the command, revision and machine")
    args = parser.parse_args()
    if args.quick:
        args.classes, args.old_n, args.repeats = 500, 10_000, 5
    result = run(args)
    print(json.dumps(result, indent=2))
    save_result(args.out, "loss_vectorised", result)
    lo, st = result["loss_fwd_bwd_ms"], result["old_stats_ms"]
    print(
        f"values match; advbct loss fwd+bwd {lo['vectorised']} ms vs loop {lo['loop']} ms "
        f"({result['loss_speedup']}x); old stats {st['vectorised']} ms vs loop {st['loop']} ms "
        f"({result['old_stats_speedup']}x)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
