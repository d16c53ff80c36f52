"""Committed results say where they come from, and come from committed code.

Every provenance record under ``data/`` (a CSV's JSON sidecar, a JSON result's ``"provenance"``, every section of a
calibration under ``data/calibration/``) must name a git commit, and not one with ``+dirty``: a result made from
uncommitted code cannot be reproduced from the repository. ``data/external/`` holds other people's measurements, with
their own source records instead."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def _provenances(obj, where="$"):
    """Every dict in ``obj`` that is a provenance record (it has "git" or "date" and "command")."""
    if isinstance(obj, dict):
        if "git" in obj or ("date" in obj and "command" in obj and ("versions" in obj or "torch" in obj)):
            yield where, obj
        for k, v in obj.items():
            if k != "earlier_runs":
                yield from _provenances(v, f"{where}.{k}")


RECORDS = sorted(p for p in DATA.rglob("*.json") if "external" not in p.relative_to(DATA).parts)


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_results_come_from_a_clean_commit(path):
    found = list(_provenances(json.loads(path.read_text())))
    assert found, f"{path.relative_to(ROOT)} carries no provenance record"
    for where, prov in found:
        git = prov.get("git")
        assert git, f"{path.relative_to(ROOT)} {where}: no git commit recorded"
        assert not str(git).endswith("+dirty"), (
            f"{path.relative_to(ROOT)} {where}: made from uncommitted code ({git}); commit, then regenerate it")


def test_external_data_keeps_its_source_and_license():
    for folder in (DATA / "external").iterdir():
        files = {p.name for p in folder.iterdir()}
        assert any(n.upper().startswith(("LICENSE", "README")) or n.endswith(".json") for n in files), folder


def test_what_counts_as_uncommitted_code():
    from llmcomm.record import _only_results_changed

    assert _only_results_changed("data/cpu-local/collectives.csv")
    assert _only_results_changed("data/calibration/cpu-local.json")                 # written by llmcomm calibrate
    assert not _only_results_changed("src/llmcomm/presets/hardware/cpu-local.json")  # the package: code
    assert not _only_results_changed("src/llmcomm/presets/hardware/h100-sxm.json")
    assert not _only_results_changed("src/llmcomm/spec.py")
    assert not _only_results_changed("book/no-such-chapter.ipynb")                  # not committed: not comparable


TABLES = sorted(DATA.rglob("*.csv"))


@pytest.mark.parametrize("path", TABLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_has_the_one_sidecar_schema(path):
    """A CSV under ``data/`` has a sidecar of :func:`llmcomm.record.write_frame`'s schema — ``provenance`` (a dict),
    ``rows`` and ``columns`` that match the table — read by :func:`llmcomm.record.read_sidecar`; only raw files that
    other people published (their folder's README says what each column means) stand without one."""
    import pandas as pd

    from llmcomm.record import read_sidecar

    sidecar = path.with_suffix(".json")
    if not sidecar.exists():
        assert "external" in path.relative_to(DATA).parts and (path.parent / "README.md").exists(), path
        return
    meta, df = read_sidecar(path), pd.read_csv(path)
    assert isinstance(meta["provenance"], dict) and meta["provenance"], path
    assert meta["rows"] == len(df) and meta["columns"] == list(df.columns), path


def test_readme_says_whether_gpu_results_exist():
    """README's GPU section says 'Not yet run on a GPU by this project' exactly while no committed result's
    provenance lists a GPU (or CUDA): the sentence must go when the first GPU result lands, and may not be missing
    before."""
    gpu_records = [(path.relative_to(ROOT), where) for path in RECORDS
                   for where, prov in _provenances(json.loads(path.read_text()))
                   if prov.get("gpus") or prov.get("cuda")]
    says_not_run = "Not yet run on a GPU by this project" in (ROOT / "README.md").read_text()
    assert says_not_run == (not gpu_records), (
        f"README says {'not ' if says_not_run else ''}yet run on a GPU, but GPU results are {gpu_records or 'absent'}")
