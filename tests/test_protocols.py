"""The protocol registry: one file per protocol, picked by its ground-truth option; tables."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bctool.embeddings import Embeddings
from bctool.errors import ConfigError
from bctool.evaluate.metrics import QueryAP
from bctool.evaluate.protocols import (
    PROTOCOLS,
    Protocol,
    ProtocolOptions,
    Table,
    build_protocol,
    make_protocol,
    protocol_spec,
    register_protocol,
    select_protocol,
)
from bctool.evaluate.retrieval import evaluate_retrieval
from bctool.evaluate.search import SearchOptions

LABELLED = Embeddings(np.eye(4, dtype=np.float32), np.array([0, 0, 1, 1]), ["a", "b", "c", "d"], ["x", "y"])


def _gnd(path: Path) -> Path:
    gnd = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": [], "bbx": [0, 0, 1, 1]}]}
    path.write_bytes(pickle.dumps(gnd))
    return path


def _solution(path: Path) -> Path:
    path.write_text("id,images,Usage\nq,000a,Public\n")
    return path


def test_the_built_in_protocols_are_registered() -> None:
    assert {"labels", "revisited", "gldv2"} <= set(PROTOCOLS)
    expected = {"labels": (None, "map", True), "revisited": ("gnd", "map", False),
                "gldv2": ("solution", "map@100", False)}
    for name, (option, headline, approximate) in expected.items():
        spec = protocol_spec(name)
        assert (spec.option, spec.headline, spec.approximate_index) == (option, headline, approximate)
        assert spec.title and spec.columns
    with pytest.raises(ConfigError, match=r"unknown protocol 'nope'; choose one of \[.*'gldv2'.*'labels'"):
        protocol_spec("nope")


def test_make_protocol_picks_by_ground_truth(tmp_path: Path) -> None:
    assert make_protocol().name == "labels" and make_protocol(gnd=None, solution=None).name == "labels"
    revisited = make_protocol(gnd=_gnd(tmp_path / "gnd.pkl"))
    gldv2 = make_protocol(solution=_solution(tmp_path / "s.csv"))
    assert (revisited.name, revisited.headline) == ("revisited", "map")
    assert (gldv2.name, gldv2.headline) == ("gldv2", "map@100")
    options = ProtocolOptions({"gnd": None, "solution": tmp_path / "s.csv"})
    assert select_protocol(options) is protocol_spec("gldv2") and build_protocol(options).name == "gldv2"


def test_labels_protocol_passes_the_search_options() -> None:
    protocol = make_protocol(top_k=1, index="hnsw", ef_search=16)
    search = SearchOptions(top_k=1, index="hnsw", ef_search=16)
    assert protocol.evaluate(LABELLED, LABELLED) == evaluate_retrieval(LABELLED, LABELLED, search=search)
    metrics, scores = protocol.per_query(LABELLED, LABELLED)
    assert metrics == protocol.evaluate(LABELLED, LABELLED) and isinstance(scores, QueryAP)
    with pytest.raises(ConfigError, match=r"unknown index kind .lsh.; choose one of \[.flat., .hnsw., .ivf.\]"):
        make_protocol(index="lsh").evaluate(LABELLED, LABELLED)


def test_option_errors_name_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pass --gnd \(Revisited Oxford/Paris\) or --solution \(GLDv2\), not both"):
        make_protocol(gnd=tmp_path / "g.pkl", solution=tmp_path / "s.csv")
    with pytest.raises(ConfigError, match=r"--index ivf is for labelled galleries; --gnd, --qrels and --solution search exactly"):
        make_protocol(solution=tmp_path / "s.csv", index="ivf")
    with pytest.raises(ConfigError, match=r"unknown ground-truth option\(s\) \['truth'\]; the protocols take \['gnd', 'qrels', 'solution'\]"):
        make_protocol(truth=tmp_path / "t.csv")
    with pytest.raises(TypeError):
        make_protocol(tmp_path / "g.pkl")  # ground truths are passed by name


def test_tables_follow_the_protocol(tmp_path: Path) -> None:
    labels = make_protocol()
    metrics = labels.evaluate(LABELLED, LABELLED)
    table = labels.table("q -> g", metrics)
    assert table == Table("q -> g", {"": metrics}, ("map", "map@100", "recall@1", "recall@5", "recall@10",
                                                   "queries", "queries_without_positives", "gallery"))
    revisited = make_protocol(gnd=_gnd(tmp_path / "gnd.pkl"))
    metrics = {f"{m}_{p}": 0.5 for m in ("map", "mp@1", "mp@5", "mp@10") for p in ("easy", "medium", "hard")}
    metrics.update({f"queries_{p}": 1 for p in ("easy", "medium", "hard")})
    table = revisited.table("t", metrics)
    assert list(table.rows) == ["easy", "medium", "hard"] and table.columns == ("map", "mp@1", "mp@5", "mp@10", "queries")
    assert table.rows["hard"] == {"map": 0.5, "mp@1": 0.5, "mp@5": 0.5, "mp@10": 0.5, "queries": 1}
    gldv2 = make_protocol(solution=_solution(tmp_path / "s.csv"))
    metrics = {"map@100": 0.5, "queries": 3, "map@100_public": 0.25, "queries_public": 1,
               "map@100_private": 0.625, "queries_private": 2, "gallery": 9}
    table = gldv2.table("t", metrics)
    assert table.rows == {"all": {"map@100": 0.5, "queries": 3}, "public": {"map@100": 0.25, "queries": 1},
                          "private": {"map@100": 0.625, "queries": 2}}
    assert table.columns == ("map@100", "queries")
    # A protocol built by hand, with neither rows nor columns: one row of every metric.
    plain = Protocol("plain", lambda q, g: {}, "map", lambda q, g: ({}, QueryAP((), np.zeros(0))))
    assert plain.table("t", {"map": 0.5, "n": 2}) == Table("t", {"": {"map": 0.5, "n": 2}}, ("map", "n"))


@pytest.fixture
def registry():  # noqa: ANN201 - restores the registry after a test adds to it
    saved = PROTOCOLS.snapshot()
    yield PROTOCOLS
    PROTOCOLS.restore(saved)


def test_a_new_protocol_is_one_registration(registry: dict, tmp_path: Path) -> None:
    seen = []

    @register_protocol("toy", title="a toy benchmark", headline="hits", columns=("hits",), option="toy_truth")
    def build(options: ProtocolOptions) -> tuple:
        seen.append(options.given()["toy_truth"])
        return (lambda q, g: {"hits": 1.0, "extra": 2}), (lambda q, g: ({"hits": 1.0}, QueryAP(("q",), np.ones(1))))

    protocol = make_protocol(toy_truth=tmp_path / "toy.txt")
    assert (protocol.name, protocol.headline) == ("toy", "hits") and seen == [tmp_path / "toy.txt"]
    assert protocol.evaluate(LABELLED, LABELLED) == {"hits": 1.0, "extra": 2}
    assert protocol.table("t", {"hits": 1.0, "extra": 2}).columns == ("hits",)
    with pytest.raises(ConfigError, match=r"pass --gnd \(Revisited Oxford/Paris\) or --toy_truth \(a toy benchmark\)"):
        make_protocol(gnd=tmp_path / "g.pkl", toy_truth=tmp_path / "toy.txt")
    with pytest.raises(ConfigError, match="--gnd, --qrels, --solution and --toy_truth search exactly"):
        make_protocol(toy_truth=tmp_path / "toy.txt", index="hnsw")
    with pytest.raises(ConfigError, match="'toy' is registered twice"):
        register_protocol("toy", title="t", headline="hits", option="other")(lambda options: build(options))
    with pytest.raises(ConfigError, match="protocols 'revisited' and 'toy2' both claim option 'gnd'"):
        register_protocol("toy2", title="t", headline="hits", option="gnd")(build)
    with pytest.raises(ConfigError, match="protocols 'labels' and 'toy3' both claim the default"):
        register_protocol("toy3", title="t", headline="hits")(build)


def test_benchmark_protocols_load_neither_torch_nor_pil() -> None:
    """`bctool evaluate` pays for faiss and numpy only: the benchmarks' readers, the backfill package
    and the plots are light."""
    code = ("import sys; import bctool.evaluate.protocols, bctool.evaluate.reports, bctool.backfill, "
            "bctool.utils.plotting, bctool.evaluate.protocols.gldv2.files, bctool.evaluate.protocols.revisited.files; "
            "print(sorted({'torch', 'PIL', 'torchvision'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_new_protocol_is_reached_from_the_cli_with_truth(registry: dict, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from bctool.cli import app
    from bctool.embeddings import save_embeddings

    @register_protocol("toy", title="a toy benchmark", headline="hits", columns=("hits",), option="toy_truth")
    def build(options: ProtocolOptions) -> tuple:
        lines = Path(options.given()["toy_truth"]).read_text().split()
        return (lambda q, g: {"hits": float(len(lines))}), (lambda q, g: ({"hits": 1.0}, QueryAP(("q",), np.ones(1))))

    (tmp_path / "truth.txt").write_text("a b c")
    save_embeddings(LABELLED, tmp_path / "e.safetensors")
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--query", str(tmp_path / "e.safetensors"), "--gallery",
                                 str(tmp_path / "e.safetensors"), "--truth", f"toy_truth={tmp_path / 'truth.txt'}", "-q"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["hits"] == 3.0
    bad = runner.invoke(app, ["evaluate", "--query", "x", "--gallery", "y", "--truth", "toy_truth"])
    assert bad.exit_code == 2 and "expected OPTION=PATH" in bad.stderr
