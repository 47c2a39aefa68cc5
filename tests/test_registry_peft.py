"The registry's PEFT column against the installed PEFT: every tuner we share names it, and every name it gives exists."
import peft
import peft.utils.merge_utils as merge_utils
from peftlab.core.registry import METHODS, discover

discover()
PEFT_TYPES = {t.value for t in peft.PeftType}

def ours(peft_type:str)->str: return peft_type.lower().replace("_", "-")   # PEFT's LN_TUNING is our ln-tuning

def test_every_tuner_we_share_with_peft_names_it():
    shared = {ours(t): t for t in PEFT_TYPES if ours(t) in METHODS}
    assert {"lora", "vera", "boft", "xlora", "trainable-tokens"} <= set(shared)
    unnamed = {n: METHODS[n].peft for n, t in shared.items() if (METHODS[n].peft or "").split(" ")[0] != t}
    assert not unnamed, f"registered without their PEFT equivalent (peft=...): {unnamed}"

def test_every_peft_equivalent_exists_in_the_installed_peft():
    def exists(name:str)->bool:
        head = name.split(" ")[0]
        return hasattr(merge_utils, head.split(".", 1)[1]) if head.startswith("merge_utils.") else head in PEFT_TYPES
    wrong = {n: m.peft for n, m in METHODS.items() if m.peft and not exists(m.peft)}
    assert not wrong, f"PEFT {peft.__version__} has no such tuner or merge function: {wrong}"
