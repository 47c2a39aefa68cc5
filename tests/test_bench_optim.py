"`peftlab bench --family optim`: every run of the memory comparison trains on tiny-llama and lands in the table and the JSON."
import json
from peftlab.core.cli import main
from peftlab.optim.family import optim_family

def test_bench_optim_family(tmp_path, capsys):
    out = tmp_path/"optim.json"
    res = main(["bench", "--family", "optim", "--steps", "2", "--n-train", "8", "--n-test", "4", "--out", str(out)])
    assert set(res.table.index) == set(optim_family(2)) and len(res.table) >= 12
    t = res.table
    assert (t.loc["MeZO", ["gradients_mib", "activations_mib"]] == 0).all()          # no backward at all
    assert t.loc["LoRA r=8", "optimizer_state_mib"] < t.loc["full AdamW", "optimizer_state_mib"] / 50
    assert t.loc["GaLore", "optimizer_state_mib"] < t.loc["full AdamW", "optimizer_state_mib"]
    saved = json.loads(out.read_text())
    assert {r["index"] for r in saved["table"]} == set(t.index) and "results written to" in capsys.readouterr().out

def test_unknown_family_names_the_flag():
    import pytest
    with pytest.raises(ValueError, match="--family: unknown family 'nope'"): main(["bench", "--family", "nope"])
