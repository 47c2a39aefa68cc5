"`peftlab bench --family objectives`: plain SFT and every objective that trains on SFT batches, one LoRA, one JSON."
import json
from peftlab.core.cli import main
from peftlab.objectives.family import sft_objectives


def test_bench_family_objectives_writes_every_usable_objective(tmp_path, capsys):
    out = tmp_path / "objectives.json"
    res = main(["bench", "--family", "objectives", "--model", "tiny-llama", "--task", "record_format", "--steps", "2",
                "--n-train", "8", "--n-test", "4", "--out", str(out)])
    usable, skipped = sft_objectives()
    assert list(res.table.index) == ["sft", *usable]
    assert res.table.trainable.nunique() == 1                    # one LoRA for all: the objective is the only difference
    assert "accuracy" not in res.table                            # tiny-llama never answers exactly: no generation
    printed = capsys.readouterr().out
    assert all(f"skipped {name}:" in printed for name in skipped) and "grpo" in skipped
    rows = json.loads(out.read_text())["table"]
    assert [r["index"] for r in rows] == ["sft", *usable] and all(r["eval_loss"] > 0 for r in rows)
