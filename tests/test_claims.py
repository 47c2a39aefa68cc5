"The claims ledger: the notebooks' record_claim calls and nbs/claims.json agree, every entry is valid, bad input is refused."
import json, multiprocessing as mp
from pathlib import Path
import pytest
from peftlab.core.claims import (VERDICTS, Claim, record_claim, ledger, ledger_markdown, claim_calls, check_ledger,
                                 validate_claim, nbs_root, ledger_path)

def test_notebooks_and_ledger_agree():
    "Every record_claim call in nbs/ has its entry in nbs/claims.json, with the same verdict, and vice versa."
    assert check_ledger() == []

def test_every_entry_is_valid():
    t = ledger()
    assert len(t) == len(claim_calls()) > 0
    for c in t.itertuples(index=False):
        assert validate_claim(Claim(**c._asdict()), nbs_root()).numbers == c.numbers   # already rounded, so unchanged
    assert set(t.verdict) <= set(VERDICTS)

def test_ledger_file_is_canonical():
    "The file is sorted by notebook and id and written as record_claim writes it, so a re-run changes nothing."
    text = ledger_path().read_text()
    entries = json.loads(text)
    assert [(e["notebook"], e["id"]) for e in entries] == sorted((e["notebook"], e["id"]) for e in entries)
    assert text == json.dumps(entries, indent=1, ensure_ascii=False) + "\n"

def test_markdown_has_a_row_per_claim():
    md = ledger_markdown().splitlines()
    assert md[0].startswith("| paper | claim |") and len(md) == 2 + len(ledger())

def tree(tmp_path:Path, calls:list[str])->Path:
    "A checkout with settings.ini and nbs/a/00_x.ipynb whose code cells are `calls`."
    (tmp_path / "settings.ini").write_text("[DEFAULT]\nnbs_path = nbs\n"); (tmp_path / "nbs" / "a").mkdir(parents=True)
    cells = [dict(cell_type="code", source=s, metadata={}, outputs=[], execution_count=None) for s in calls]
    (tmp_path / "nbs" / "a" / "00_x.ipynb").write_text(json.dumps(dict(cells=cells, metadata={}, nbformat=4, nbformat_minor=5)))
    return tmp_path / "nbs"

OK = dict(id="c", paper="P", claim="C.", setting="S", numbers={"x": 1.0}, verdict="held", notebook="a/00_x.ipynb")

@pytest.mark.parametrize("bad, error, match", [
    (dict(verdict="mostly"), ValueError, "is not one of"),
    (dict(verdict="Held"), ValueError, "is not one of"),
    (dict(numbers={}), ValueError, "has no numbers"),
    (dict(numbers=None), ValueError, "has no numbers"),
    (dict(numbers={"x": "0.5"}), TypeError, "numbers must be ints or floats"),
    (dict(numbers={"x": float("inf")}), ValueError, "must be finite"),
    (dict(notebook="a/01_missing.ipynb"), FileNotFoundError, "which is not in"),
    (dict(notebook="a"), FileNotFoundError, "relative to nbs/"),
    (dict(id="Has Spaces"), ValueError, "lower-case letters"),
    (dict(paper=""), ValueError, "has no paper"),
    (dict(setting=None), ValueError, "has no setting"),
])
def test_bad_claims_are_refused_and_change_nothing(tmp_path, bad, error, match):
    nbs = tree(tmp_path, [])
    record_claim(**OK, path=nbs / "claims.json")
    before = (nbs / "claims.json").read_text()
    with pytest.raises(error, match=match): record_claim(**{**OK, "id": "d", **bad}, path=nbs / "claims.json")
    assert (nbs / "claims.json").read_text() == before

def test_rerun_writes_the_same_file(tmp_path):
    nbs = tree(tmp_path, [])
    for id_ in ("b", "a"): record_claim(**{**OK, "id": id_, "numbers": {"x": 2 / 3}}, path=nbs / "claims.json")
    first = (nbs / "claims.json").read_text()
    for id_ in ("a", "b"): record_claim(**{**OK, "id": id_, "numbers": {"x": 2 / 3 + 1e-9}}, path=nbs / "claims.json")
    assert (nbs / "claims.json").read_text() == first and json.loads(first)[0]["numbers"] == {"x": 0.6667}

def _writer(args):
    path, k = args
    for i in range(5): record_claim(**{**OK, "id": f"w{k}-{i}"}, path=path)

def test_parallel_notebooks_do_not_lose_entries(tmp_path):
    "nbdev_test runs notebooks in parallel processes; the lock keeps every process's entries."
    nbs = tree(tmp_path, [])
    with mp.get_context("fork").Pool(4) as pool: pool.map(_writer, [(nbs / "claims.json", k) for k in range(4)])
    assert sorted(ledger(nbs / "claims.json").id) == sorted(f"w{k}-{i}" for k in range(4) for i in range(5))

CALL = 'record_claim(id="{id}", paper="P", claim="C.", setting="S", numbers=dict(x=res), verdict="{v}", notebook="{nb}")'

@pytest.mark.parametrize("calls, recorded, problem", [
    ([CALL.format(id="c", v="held", nb="a/00_x.ipynb")], [], "has no entry in the ledger"),
    ([], [("c", "held")], "has no record_claim call"),
    ([CALL.format(id="c", v="partly", nb="a/00_x.ipynb")], [("c", "held")], "verdict 'partly' in the notebook, 'held' in the ledger"),
    ([CALL.format(id="c", v="held", nb="b/00_y.ipynb")], [("c", "held")], "it should name its own"),
    ([CALL.format(id="c", v="held", nb="a/00_x.ipynb")] * 2, [("c", "held")], "recorded twice"),
    (['v = "held"\nrecord_claim(id="c", paper="P", claim="C.", setting="S", numbers={}, verdict=v, notebook="a/00_x.ipynb")'], [("c", "held")], "literal keyword"),
])
def test_check_ledger_finds_disagreements(tmp_path, calls, recorded, problem):
    nbs = tree(tmp_path, calls)
    for id_, v in recorded: record_claim(**{**OK, "id": id_, "verdict": v}, path=nbs / "claims.json")
    assert any(problem in p for p in check_ledger(nbs)), check_ledger(nbs)

def test_agreeing_tree_has_no_problems_and_scratch_calls_are_ignored(tmp_path):
    nbs = tree(tmp_path, [CALL.format(id="c", v="held", nb="a/00_x.ipynb"),
                          '%time x = 1\nrecord_claim(**OK, path=tmp)   # a scratch ledger: not counted'])
    record_claim(**OK, path=nbs / "claims.json")
    assert check_ledger(nbs) == [] and [c["id"] for c in claim_calls(nbs)] == ["c"]
