"The data-selection family: the table's shape, random's noise share near the pool's, the same numbers twice, the JSON, bad input."
import json
from types import SimpleNamespace
import pandas as pd
import pytest
from peftlab.core.compare import Comparison
from peftlab.data.core import NOISE
from peftlab.data.family import data_family, bench_data, family_selectors

TINY = dict(task="iso_date", n_pool=100, n_test=8, n_target=4, steps=6, progress=False)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    "Two selectors beside random at the three default budgets, run twice; the second writes its JSON."
    out = tmp_path_factory.mktemp("family") / "data_family.json"
    first = data_family(selectors=["perplexity", "diversify-conquer"], **TINY)
    second = data_family(selectors=["diversify-conquer", "perplexity"], out=out, **TINY)
    return first, second, out


def test_table_shape(family):
    table = family[0].table
    assert table.shape == (3 * 3 + 1, 8)
    assert list(table.index[:3]) == ["random 10%", "diversify-conquer 10%", "perplexity 10%"] and table.index[-1] == "whole pool"
    assert table.groupby("selector").size().to_dict() == {"random": 3, "diversify-conquer": 3, "perplexity": 3, "whole pool": 1}
    assert table.examples.tolist() == [10] * 3 + [20] * 3 + [30] * 3 + [100]
    assert table.loc["whole pool", "noise_share"] == pytest.approx(sum(NOISE.values()))


def test_random_keeps_about_the_pools_noise(family):
    table, rate = family[0].table, sum(NOISE.values())
    shares = table[table.selector == "random"].noise_share
    assert all(abs(s - rate) <= 0.2 for s in shares)            # 10 to 30 draws: within about two standard deviations
    assert abs(shares.iloc[-1] - rate) <= 0.1                    # the 30% draw


def test_same_numbers_twice(family):
    pd.testing.assert_frame_equal(family[0].table, family[1].table)


def test_json_reads_back(family):
    _, second, out = family
    back = Comparison.read_json(out)
    pd.testing.assert_frame_equal(back.table, second.table, check_dtype=False)
    assert json.loads(out.read_text())["settings"]["steps"] == TINY["steps"]
    assert not list(out.parent.glob(".*.tmp"))                    # written atomically: no temporary file left


@pytest.mark.parametrize("kwargs,message", [
    (dict(selectors=["vote-kk"]), "unknown method"),
    (dict(selectors=["lora"]), "not a data selector"),
    (dict(selectors=[]), "give a list"),
    (dict(budgets=0.2), "give a list"),
    (dict(budgets=(0.2, 1.5)), "must be in (0, 1]"),
    (dict(budgets=(0.2, 500)), "larger than the pool"),
    (dict(options=dict(nope=dict(k=1))), "which the family does not run"),
    (dict(n_test=0), "must each be at least 1"),
    (dict(task="dates"), "unknown task 'dates'"),
])
def test_bad_input(kwargs, message):
    with pytest.raises((ValueError, KeyError, TypeError)) as e: data_family(**{"selectors": ["perplexity"], **kwargs, "progress": False})
    assert message in str(e.value)


def test_bench_entry_point_passes_the_bench_arguments():
    with pytest.raises(KeyError, match="unknown task 'dates'"):
        bench_data(SimpleNamespace(model="tiny-llama", task="dates", steps=2, n_train=20, n_test=4, lr=None))
    assert family_selectors()[0] == "random"

def test_cli_routes_bench_family_data_to_it():
    from peftlab.core.cli import main
    with pytest.raises(KeyError, match="unknown task 'dates'"):   # reached data_family with the command's arguments
        main(["bench", "--family", "data", "--model", "tiny-llama", "--task", "dates", "--steps", "2", "--n-train", "20", "--n-test", "4"])
