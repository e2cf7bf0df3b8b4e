"""Compatibility losses and old-model statistics against slow, obvious per-sample references.

Each fast (batched) loss is compared on seeded inputs with a reference written as Python loops
over samples in float64: the value of every returned part and the gradients with respect to the
embeddings and to every trainable tensor the loss touches.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bctool.errors import ConfigError
from bctool.models import ModelConfig, create_model
from bctool.train.compat import OldStats, compute_old_stats, grad_reverse, grl_alpha
from bctool.train.compat import stats as stats_module
from bctool.train.methods import METHODS, MethodContext, create_method, resolve_params

C, D = 6, 8
EPS = 1e-6  # the acos clamp of the implementation
# Old samples per class: 0 is a new class (not old), 1 has an outlier the IQR filter removes,
# 2 has no old sample, 3 a single one, 4 exactly four, 5 three (no filtering below four).
OLD_COUNTS = [5, 7, 0, 1, 4, 3]
OLD_CLASSES = torch.tensor([False, True, True, True, True, True])
BATCH_LABELS = torch.tensor([1, 1, 1, 0, 0, 3, 4, 4, 5, 5, 2, 1])


# ---------------------------------------------------------------------------------------------
# fixtures: seeded old embeddings, statistics, a batch


def _old_training_set() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(C, D, generator=g)
    rows, labels = [], []
    for k, n in enumerate(OLD_COUNTS):
        for _ in range(n):
            rows.append(directions[k] + 0.4 * torch.randn(D, generator=g))
            labels.append(k)
    rows[5 + 6] = -3 * directions[1]  # the 7th sample of class 1: an outlier far from its class
    emb = torch.stack(rows) * (1 + torch.rand(len(rows), 1, generator=g) * 3)  # raw: any norm
    return emb, torch.tensor(labels)


@pytest.fixture(scope="module")
def old_set() -> tuple[torch.Tensor, torch.Tensor]:
    return _old_training_set()


@pytest.fixture(scope="module")
def stats(old_set) -> OldStats:
    emb, labels = old_set
    return compute_old_stats(emb, labels, C, OLD_CLASSES)


def _batch(stats: OldStats, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(new raw embeddings with grad, labels, old raw embeddings): half the new ones near the old."""
    g = torch.Generator().manual_seed(seed)
    labels = BATCH_LABELS.clone()
    old = (stats.centers[labels] + 0.3 * torch.randn(len(labels), D, generator=g)) * 2.0
    new = torch.randn(len(labels), D, generator=g) * 1.5
    new[::2] = old[::2] * 0.7 + 0.2 * torch.randn(len(labels[::2]), D, generator=g)
    return new.requires_grad_(True), labels, old


def _ctx(stats: OldStats, head: str = "linear", **kwargs) -> MethodContext:
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="small", embedding_dim=D, num_classes=C, head=head))
    return MethodContext(stats=stats, model=model, **kwargs)


def create_compat_loss(name: str, ctx: MethodContext, **params):  # noqa: ANN201 - a Method
    """The method ``name`` with ``params`` over its defaults."""
    return create_method(name, ctx, params)


def _grad(value: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, inputs, allow_unused=True, materialize_grads=True))


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


# ---------------------------------------------------------------------------------------------
# old statistics


def _ref_filtered_max(values: list[float]) -> float:
    r, n = sorted(values), len(values)
    if n <= 1:
        return 0.0
    if n < 4:
        return max(r)
    q1, q3 = r[n // 4], r[(3 * n) // 4]
    iqr = q3 - q1
    return max(x for x in r if q1 - 1.5 * iqr <= x <= q3 + 1.5 * iqr)


def _ref_stats(emb: torch.Tensor, labels: torch.Tensor, num_classes: int, old_classes=None) -> dict:
    emb = emb.double()
    out = {"centers": [], "counts": [], "radius": [], "theta": [], "is_old": []}
    for k in range(num_classes):
        members = [emb[i] / emb[i].norm() for i in range(len(labels)) if int(labels[i]) == k]
        n = len(members)
        center = sum(members) / n if n else torch.zeros(emb.shape[1], dtype=torch.float64)
        radii = [float((m - center).norm()) for m in members]
        thetas = [math.acos(max(-1.0, min(1.0, float(m @ center / center.norm())))) for m in members]
        out["centers"].append(center)
        out["counts"].append(n)
        out["radius"].append(_ref_filtered_max(radii))
        out["theta"].append(_ref_filtered_max(thetas))
        old = n >= 1 and (old_classes is None or bool(old_classes[k]))
        out["is_old"].append(old)
    return out


def _check_stats(got: OldStats, ref: dict) -> None:
    assert got.centers.dtype == torch.float32 and got.counts.dtype == torch.int64
    assert got.radius_max.dtype == torch.float32 and got.theta_max.dtype == torch.float32
    _close(got.centers, torch.stack(ref["centers"]), rtol=1e-5, atol=1e-6)
    assert got.counts.tolist() == ref["counts"]
    _close(got.radius_max, torch.tensor(ref["radius"]), rtol=1e-5, atol=1e-5)
    _close(got.theta_max, torch.tensor(ref["theta"]), rtol=1e-5, atol=2e-4)
    assert got.is_old.tolist() == ref["is_old"]


def test_old_stats_against_per_class_reference(old_set, stats) -> None:
    emb, labels = old_set
    _check_stats(stats, _ref_stats(emb, labels, C, OLD_CLASSES))
    assert stats.is_old.tolist() == [False, True, False, True, True, True]
    assert stats.has_boundary.tolist() == [False, True, False, False, True, True]
    assert stats.radius_max[[2, 3]].tolist() == [0.0, 0.0] and stats.theta_max[[2, 3]].tolist() == [0.0, 0.0]
    assert stats.centers[2].abs().sum() == 0
    norms = stats.centers.norm(dim=1)
    assert (norms[stats.counts > 1] < 1).all()  # centers are means, not re-normalised
    assert norms[3] == pytest.approx(1.0)  # a single sample is its own center


def test_iqr_filter_drops_the_outlier(old_set, stats) -> None:
    emb, labels = old_set
    members = F.normalize(emb[labels == 1], dim=1)
    radii = (members - stats.centers[1]).norm(dim=1)
    assert radii.argmax() == 6  # the planted outlier is the farthest
    assert stats.radius_max[1] < radii.max() - 0.1  # ... and the filter removed it
    assert torch.isclose(stats.radius_max[1], radii.sort().values[-2])


def test_old_stats_many_classes_in_chunks(monkeypatch) -> None:
    g = torch.Generator().manual_seed(3)
    num_classes, n = 60, 700
    labels = torch.randint(0, num_classes - 5, (n,), generator=g)  # the last 5 classes stay empty
    labels[:12] = 7  # one large class, so its quartiles span chunks
    emb = torch.randn(n, 5, generator=g) + torch.randn(num_classes, 5, generator=g)[labels]
    old_classes = torch.rand(num_classes, generator=g) > 0.3
    monkeypatch.setattr(stats_module, "_CHUNK_ROWS", 37)
    got = compute_old_stats(emb, labels, num_classes, old_classes)
    _check_stats(got, _ref_stats(emb, labels, num_classes, old_classes))
    got_all = compute_old_stats(emb, labels, num_classes)
    assert got_all.is_old.tolist() == (got_all.counts > 0).tolist()


def test_old_stats_reject_bad_labels() -> None:
    from bctool.errors import EmbeddingsError

    with pytest.raises(EmbeddingsError, match=r"labels must lie in \[0, 3\)"):
        compute_old_stats(torch.randn(4, 2), torch.tensor([0, 1, 2, 3]), 3)
    with pytest.raises(ConfigError, match=r"old-class mask must have shape \(3,\)"):
        compute_old_stats(torch.randn(4, 2), torch.tensor([0, 1, 2, 2]), 3, torch.ones(4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# gradient reversal


def test_grad_reverse_is_identity_forward_and_scaled_negative_backward() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    (y * upstream).sum().backward()
    _close(x.grad, -0.3 * upstream, rtol=1e-6, atol=1e-7)


def test_grl_alpha_schedule() -> None:
    assert grl_alpha(0.0) == 0.0
    assert grl_alpha(1.0) == pytest.approx(0.9999, abs=1e-4)
    assert grl_alpha(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert grl_alpha(-3.0) == 0.0 and grl_alpha(7.0) == grl_alpha(1.0)


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_names_every_method() -> None:
    assert set(METHODS) == {
        "independent", "l2", "bct", "lce", "unibct", "hotrefresh", "advbct",
        "advbct-noadv", "advbct-nobound", "advbct-fixed", "advbct-joint",  # ablations of AdvBCT
        "bct-all", "center",  # variants
    }
    for name, cls in METHODS.items():
        assert cls.name == name


def test_unknown_method_names_the_choices(stats) -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'nope'; choose one of \['advbct', 'advbct-fixed'"):
        create_compat_loss("nope", _ctx(stats))


def test_independent_has_no_parts(stats) -> None:
    new, labels, old = _batch(stats)
    assert create_compat_loss("independent", _ctx(stats))(new, labels, old, labels) == {}


# ---------------------------------------------------------------------------------------------
# l2


def test_l2_against_reference(stats) -> None:
    new, labels, old = _batch(stats)
    parts = create_compat_loss("l2", _ctx(stats))(new, labels, old, labels)
    assert set(parts) == {"l2"}
    new64 = new.detach().double().requires_grad_(True)
    total = 0.0
    for i in range(len(labels)):
        diff = _unit(new64[i]) - _unit(old[i].double())
        total = total + sum(d * d for d in diff)
    ref = total / (len(labels) * D)
    _close(parts["l2"], ref)
    _close(_grad(parts["l2"], [new])[0], _grad(ref, [new64])[0])


# ---------------------------------------------------------------------------------------------
# bct


def _ref_bct(new64, labels, logits_of, target_of) -> torch.Tensor:
    terms = []
    for i in range(len(labels)):
        t = target_of(int(labels[i]))
        if t < 0:
            continue
        logits = logits_of(new64[i])
        terms.append(torch.logsumexp(logits, 0) - logits[t])
    return sum(terms) / len(terms) if terms else new64.sum() * 0


def test_bct_with_old_head_against_reference(stats) -> None:
    torch.manual_seed(5)
    old_head = nn.Linear(D, 4).requires_grad_(False)
    index = torch.tensor([-1, 2, -1, 0, 3, 1])  # new label -> old class
    loss = create_compat_loss("bct", _ctx(stats, old_head=old_head, old_label_index=index))
    new, labels, old = _batch(stats)
    parts = loss(new, labels, old, labels)
    assert set(parts) == {"bct"}
    w, b = old_head.weight.double(), old_head.bias.double()
    new64 = new.detach().double().requires_grad_(True)
    ref = _ref_bct(new64, labels, lambda f: w @ f + b, lambda y: int(index[y]))
    _close(parts["bct"], ref)
    _close(_grad(parts["bct"], [new])[0], _grad(ref, [new64])[0])


def _check_prototype_bct(parts, new, labels, stats, classes: list[int]) -> None:  # noqa: ANN001
    """parts["bct"] equals a slow cosine-prototype cross-entropy over ``classes``' centers (s = 30)."""
    protos = [_unit(stats.centers[k].double()) for k in classes]
    new64 = new.detach().double().requires_grad_(True)

    def logits_of(f):
        return 30.0 * torch.stack([_unit(f) @ p for p in protos])

    ref = _ref_bct(new64, labels, logits_of, lambda y: classes.index(y) if y in classes else -1)
    _close(parts["bct"], ref)
    _close(_grad(parts["bct"], [new])[0], _grad(ref, [new64])[0])


def test_bct_prototype_fallback_against_reference(stats) -> None:
    loss = create_compat_loss("bct", _ctx(stats), scale=30.0)
    new, labels, old = _batch(stats)
    parts = loss(new, labels, old, labels)
    _check_prototype_bct(parts, new, labels, stats, [k for k in range(C) if bool(stats.is_old[k])])


def test_bct_all_uses_every_class_center_and_ignores_the_old_head(stats) -> None:
    torch.manual_seed(5)
    old_head = nn.Linear(D, 4).requires_grad_(False)
    index = torch.tensor([-1, 2, -1, 0, 3, 1])
    loss = create_compat_loss("bct-all", _ctx(stats, old_head=old_head, old_label_index=index), scale=30.0)
    new, labels, old = _batch(stats)
    parts = loss(new, labels, old, labels)
    present = [k for k in range(C) if int(stats.counts[k]) > 0]
    assert len(present) > int(stats.is_old.sum())  # new classes have prototypes too
    _check_prototype_bct(parts, new, labels, stats, present)


def test_center_pull_against_reference(stats) -> None:
    new, labels, old = _batch(stats)
    parts = create_compat_loss("center", _ctx(stats))(new, labels, old, labels)
    assert set(parts) == {"center"}
    new64 = new.detach().double().requires_grad_(True)
    terms = [sum((_unit(new64[i]) - stats.centers[int(labels[i])].double()) ** 2)
             for i in range(len(labels)) if int(stats.counts[int(labels[i])]) > 0]
    ref = sum(terms) / len(terms)
    _close(parts["center"], ref)
    _close(_grad(parts["center"], [new])[0], _grad(ref, [new64])[0])


def test_bct_batch_without_old_classes_is_zero_with_graph(stats) -> None:
    new, _, old = _batch(stats)
    labels = torch.tensor([0, 2] * 6)
    part = create_compat_loss("bct", _ctx(stats))(new, labels, old, labels)["bct"]
    assert part.item() == 0.0 and part.requires_grad
    part.backward()
    assert new.grad.abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# lce


@pytest.mark.parametrize("head", ["linear", "arcface"])
def test_lce_against_reference(stats, head: str) -> None:
    ctx = _ctx(stats, head=head)
    weight = ctx.model.head.fc.weight if head == "linear" else ctx.model.head.weight
    loss = create_compat_loss("lce", ctx)
    new, labels, old = _batch(stats)
    parts = loss(new, labels, old, labels)
    assert set(parts) == {"lce_boundary", "lce_align"}

    new64 = new.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    boundary, align, n = 0.0, 0.0, 0
    for i in range(len(labels)):
        y = int(labels[i])
        if not (bool(stats.is_old[y]) and int(stats.counts[y]) > 1):
            continue
        c = _unit(stats.centers[y].double())
        theta = torch.acos((c @ _unit(new64[i])).clamp(-1 + EPS, 1 - EPS))
        boundary = boundary + torch.clamp(theta - float(stats.theta_max[y]), min=0)
        align = align + (1 - c @ _unit(w64[y]))
        n += 1
    assert 0 < n < len(labels)
    ref_boundary, ref_align = boundary / n, align / n
    assert ref_boundary > 0
    _close(parts["lce_boundary"], ref_boundary)
    _close(parts["lce_align"], ref_align)
    got = _grad(parts["lce_boundary"] + parts["lce_align"], [new, weight])
    want = _grad(ref_boundary + ref_align, [new64, w64])
    _close(got[0], want[0])
    _close(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# unibct


def test_unibct_against_reference(stats) -> None:
    s, m = 30.0, 0.3
    loss = create_compat_loss("unibct", _ctx(stats), scale=s, margin=m)
    new, labels, old = _batch(stats)
    with torch.no_grad():
        new[1] = -3 * stats.centers[1]  # target angle ~ pi: ArcFace's fallback branch
        new[6] = 2 * stats.centers[4]  # target cosine ~ 1: the acos clamp
    parts = loss(new, labels, old, labels)
    assert set(parts) == {"unibct"}
    old_classes = [k for k in range(C) if bool(stats.is_old[k])]
    protos = [_unit(stats.centers[k].double()) for k in old_classes]
    new64 = new.detach().double().requires_grad_(True)
    terms, fallbacks = [], 0
    for i in range(len(labels)):
        y = int(labels[i])
        if y not in old_classes:
            continue
        t = old_classes.index(y)
        cos = [_unit(new64[i]) @ p for p in protos]
        theta = torch.acos(cos[t].clamp(-1 + EPS, 1 - EPS))
        if float(theta.detach()) + m < math.pi:
            cos[t] = torch.cos(theta + m)
        else:
            cos[t] = cos[t] - math.sin(math.pi - m) * m
            fallbacks += 1
        logits = s * torch.stack(cos)
        terms.append(torch.logsumexp(logits, 0) - logits[t])
    ref = sum(terms) / len(terms)
    assert fallbacks == 1
    assert torch.isfinite(parts["unibct"])
    _close(parts["unibct"], ref)
    _close(_grad(parts["unibct"], [new])[0], _grad(ref, [new64])[0])


# ---------------------------------------------------------------------------------------------
# hotrefresh


def _ref_hotrefresh(new64, old64, labels, negatives: int, temperature: float) -> torch.Tensor:
    total = 0.0
    for i in range(len(labels)):
        f = _unit(new64[i])
        to_old = [f @ _unit(old64[j]) for j in range(len(labels)) if labels[j] != labels[i]]
        to_new = [f @ _unit(new64[j]) for j in range(len(labels)) if labels[j] != labels[i]]
        top_old = sorted(to_old, key=lambda v: float(v.detach()), reverse=True)[:negatives]
        top_new = sorted(to_new, key=lambda v: float(v.detach()), reverse=True)[:negatives]
        logits = torch.stack([f @ _unit(old64[i]), *top_old, *top_new]) / temperature
        total = total + torch.logsumexp(logits, 0) - logits[0]
    return total / len(labels)


@pytest.mark.parametrize(
    ("negatives", "temperature", "labels"),
    [
        (3, 0.1, BATCH_LABELS),  # top-k truly selects
        (10, 0.01, BATCH_LABELS),  # fewer other-class samples than negatives for every row
        (10, 0.05, torch.tensor([4] * 10 + [5, 1])),  # most rows have only two negatives
        (10, 0.05, torch.tensor([4] * 12)),  # no negatives at all: only the positive, loss 0
    ],
)
def test_hotrefresh_against_reference(stats, negatives: int, temperature: float, labels) -> None:
    loss = create_compat_loss("hotrefresh", _ctx(stats), negatives=negatives, temperature=temperature)
    new, _, old = _batch(stats)
    parts = loss(new, labels, old, labels)
    assert set(parts) == {"hotrefresh"}
    new64 = new.detach().double().requires_grad_(True)
    ref = _ref_hotrefresh(new64, old.double(), labels, negatives, temperature)
    assert torch.isfinite(parts["hotrefresh"])
    _close(parts["hotrefresh"], ref)
    got = _grad(parts["hotrefresh"], [new])[0]
    assert torch.isfinite(got).all()
    _close(got, _grad(ref, [new64])[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# advbct


def _ref_discriminator(disc: nn.Sequential, x64: torch.Tensor, params: list[torch.Tensor]) -> list:
    """Per-sample log-probabilities; BatchNorm's batch statistics are the only batch-wide step."""
    w1, b1, gamma, beta, w2, b2 = params
    hidden = [w1 @ x64[i] + b1 for i in range(len(x64))]
    mean = sum(hidden) / len(hidden)
    var = sum((h - mean) ** 2 for h in hidden) / len(hidden)  # biased, as BatchNorm in training
    out = []
    for h in hidden:
        z = torch.relu((h - mean) / torch.sqrt(var + disc[1].eps) * gamma + beta)
        logits = w2 @ z + b2
        out.append(logits - torch.logsumexp(logits, 0))
    return out


def test_advbct_against_reference(stats) -> None:
    radii = [float(stats.radius_max[k]) for k in range(C) if bool(stats.has_boundary[k])]
    threshold = (min(radii) + max(radii)) / 2  # some classes below T, some above
    ctx = _ctx(stats)
    torch.manual_seed(7)
    loss = create_compat_loss("advbct", ctx, threshold=threshold).train()
    loss.set_progress(epoch=2, epochs=10, step=130, total_steps=1000)
    alpha, lam = grl_alpha(0.13), (10 - 2 + 1) / 10
    new, labels, old = _batch(stats)
    parts = loss(new, labels, old, labels)
    assert set(parts) == {"adv", "bound"}
    disc = loss.discriminator
    disc_params = [disc[0].weight, disc[0].bias, disc[1].weight, disc[1].bias, disc[3].weight, disc[3].bias]
    trainable = [new, *disc_params, loss.boundary_weight]
    got = _grad(parts["adv"] + parts["bound"], trainable)

    new64 = new.detach().double().requires_grad_(True)
    params64 = [p.detach().double().requires_grad_(True) for p in disc_params]
    w64 = loss.boundary_weight.detach().double().requires_grad_(True)
    scores_new = _ref_discriminator(disc, new64, params64)
    scores_old = _ref_discriminator(disc, old.double(), params64)
    adv = lam * (-sum(s[0] for s in scores_new) / len(labels) - sum(s[1] for s in scores_old) / len(labels))
    violations, branches = [], set()
    for i in range(len(labels)):
        y = int(labels[i])
        if not (bool(stats.is_old[y]) and int(stats.counts[y]) > 1):
            continue
        r = float(stats.radius_max[y])
        elastic = abs(r - threshold) * torch.sigmoid(w64[y])
        radius = r + elastic if r < threshold else r - elastic
        branches.add(r < threshold)
        d = (_unit(new64[i]) - stats.centers[y].double()).norm() - radius
        if d > 0:
            violations.append(d)
    assert branches == {True, False}
    assert 0 < len(violations) < int(stats.has_boundary[labels].sum())
    bound = sum(violations) / len(violations)
    _close(parts["adv"], adv)
    _close(parts["bound"], bound)

    # The GRL flips and scales the adversarial gradient reaching the new embeddings only.
    g_adv_new, *g_adv_params = _grad(adv, [new64, *params64])
    g_bound_new, g_bound_w = _grad(bound, [new64, w64])
    _close(got[0], -alpha * g_adv_new + g_bound_new)
    for g, want in zip(got[1:7], g_adv_params):
        _close(g, want)
    _close(got[7], g_bound_w)


def test_advbct_without_violations_gives_zero_bound_with_graph(stats) -> None:
    loss = create_compat_loss("advbct", _ctx(stats), threshold=1.0)
    labels = BATCH_LABELS
    new = (stats.centers[labels] * 5).requires_grad_(True)  # every new embedding on its old center
    old = new.detach().clone()
    bound = loss(new, labels, old, labels)["bound"]
    assert bound.item() == 0.0 and bound.requires_grad


def test_advbct_schedules(stats) -> None:
    loss = create_compat_loss("advbct", _ctx(stats))
    assert loss.boundary_weight.shape == (C,)
    assert (loss.boundary_weight.abs() <= 1).all()
    expected = {0: 1.1, 1: 1.0, 5: 0.6, 9: 0.2}
    for epoch, value in expected.items():
        loss.set_progress(epoch=epoch, epochs=10, step=0, total_steps=100)
        assert loss.adv_weight == pytest.approx(value)
        assert loss.alpha == 0.0
    loss.set_progress(epoch=9, epochs=10, step=100, total_steps=100)
    assert loss.alpha == pytest.approx(grl_alpha(1.0))
    names = {name for name, _ in loss.named_parameters()}
    assert "boundary_weight" in names and any(n.startswith("discriminator.") for n in names)
    assert not any(n.startswith("ctx") for n in names)  # the model is the task's, not the loss's


# ---------------------------------------------------------------------------------------------
# host-device syncs (only where an accelerator is present)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect host-device syncs")
def test_no_host_device_sync_in_forward_and_backward(old_set) -> None:
    emb, labels = old_set
    cuda_stats = compute_old_stats(emb.cuda(), labels.cuda(), C, OLD_CLASSES.cuda())
    old_head = nn.Linear(D, 4).cuda().requires_grad_(False)
    index = torch.tensor([-1, 2, -1, 0, 3, 1]).cuda()
    for name in sorted(METHODS):
        ctx = _ctx(cuda_stats)
        ctx.model.cuda()
        if name == "bct":
            ctx.old_head, ctx.old_label_index = old_head, index
        loss = create_compat_loss(name, ctx).cuda()
        new, batch_labels, old = _batch(cuda_stats.to("cpu"))
        new, batch_labels, old = new.detach().cuda().requires_grad_(True), batch_labels.cuda(), old.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            parts = loss(new, batch_labels, old, batch_labels)
            if parts:
                sum(parts.values()).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_advbct_ablations_keep_exactly_their_parts(stats) -> None:
    new, labels, old = _batch(stats)
    results = {}
    for name in ("advbct", "advbct-noadv", "advbct-nobound", "advbct-fixed"):
        torch.manual_seed(0)  # same discriminator and boundary weights for every variant
        loss = create_compat_loss(name, _ctx(stats))
        loss.set_progress(epoch=1, epochs=4, step=5, total_steps=20)
        results[name] = (loss, loss(new, labels, old, labels))
    full = results["advbct"][1]
    assert set(results["advbct-noadv"][1]) == {"bound"}
    assert set(results["advbct-nobound"][1]) == {"adv"}
    _close(results["advbct-noadv"][1]["bound"], full["bound"])
    _close(results["advbct-nobound"][1]["adv"], full["adv"])
    fixed_loss, fixed = results["advbct-fixed"]
    _close(fixed_loss.boundary_radii(), stats.radius_max)
    _close(fixed["adv"], full["adv"])
    # Elastic radii move r_max towards T, so they never equal the fixed ones where r_max != T.
    elastic = results["advbct"][0].boundary_radii()
    moved = (stats.radius_max - 1.0).abs() > 1e-6
    assert bool((elastic[moved] != stats.radius_max[moved]).all())


def test_advbct_joint_pass_equals_separate_passes_without_batch_statistics(stats) -> None:
    """With BatchNorm on running statistics (eval), one joint pass is the two passes summed."""
    new, labels, old = _batch(stats)
    torch.manual_seed(0)
    separate = create_compat_loss("advbct", _ctx(stats))
    torch.manual_seed(0)
    joint = create_compat_loss("advbct-joint", _ctx(stats))
    for loss in (separate, joint):
        loss.set_progress(epoch=0, epochs=2, step=3, total_steps=10)
        loss.discriminator.eval()
    _close(joint(new, labels, old, labels)["adv"], separate(new, labels, old, labels)["adv"])
    joint.discriminator.train()  # in training mode the shared batch statistics make them differ
    separate.discriminator.train()
    assert not torch.allclose(joint(new, labels, old, labels)["adv"], separate(new, labels, old, labels)["adv"])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unused_parameters_are_declared(stats, name: str) -> None:
    """DistributedDataParallel must know when a loss leaves parameters without a gradient
    (``has_unused_parameters``), or multi-process training fails at its second step."""
    loss = create_compat_loss(name, _ctx(stats))
    new, labels, old = _batch(stats)
    parts = loss(new, labels, old, labels)
    params = dict(loss.named_parameters())
    if not params:
        assert not loss.has_unused_parameters
        return
    total = sum(parts.values())
    grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    unused = sorted(n for n, g in zip(params, grads) if g is None)
    assert bool(unused) == loss.has_unused_parameters, (name, unused)


def test_parameters_resolve_over_the_defaults_with_their_types() -> None:
    assert vars(resolve_params("hotrefresh", {"negatives": "3"})) == {"temperature": 0.01, "negatives": 3}
    assert vars(resolve_params("advbct", {"threshold": "0.5"})) == {"threshold": 0.5}
    assert vars(resolve_params("l2")) == {}
    with pytest.raises(ConfigError, match=r"method 'l2' has no parameter 'scale'; its parameters: none"):
        resolve_params("l2", {"scale": 1})
    with pytest.raises(ConfigError, match=r"hotrefresh parameter negatives=2.5 is not a valid int"):
        resolve_params("hotrefresh", {"negatives": 2.5})
    with pytest.raises(ConfigError, match=r"unibct parameter scale=-1.0 must be positive"):
        resolve_params("unibct", {"scale": "-1"})
