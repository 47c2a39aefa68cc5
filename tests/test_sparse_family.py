"`peftlab bench --family sparse`: LoRA and every sparse method at LoRA's trainable count, through `compare`."
import pytest
from peftlab.core.models import tiny_llama
from peftlab.sparse.family import lora_budget, matched_options, sparse_family


def test_tiny_llama_budgets_match_lora():
    m = tiny_llama()
    budget = lora_budget(m, 4)
    assert budget == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 2 * (64 + 128) + (128 + 64))   # q o, k v (two kv heads), gate up, down; two layers
    runs, skipped = sparse_family(m, r=4)
    assert set(skipped) == {"fpf", "prior-ft"}   # they train what a task sequence or a probe points to
    assert runs["shira"]["options"]["r"] == 4 and runs["lt-sft"]["options"]["data"] == "calibration"
    assert runs["neuroada"]["options"]["k"] == round(budget / (2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)))


def test_cli_routes_bench_family_sparse_to_compare():
    from peftlab.core.cli import main
    with pytest.raises(KeyError, match="unknown task 'dates'"):   # reached compare with the command's arguments
        main(["bench", "--family", "sparse", "--model", "tiny-llama", "--task", "dates", "--steps", "2", "--n-train", "8", "--n-test", "4"])
