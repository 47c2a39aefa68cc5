"DeepSpeed ZeRO-3 on CPU, 2 ranks (gloo): LoRA on tiny-llama trains 3 steps; the frozen base is partitioned; rank 0 saves the gathered adapter."
import os, sys, json, torch
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed
import peftlab as pl
torch.manual_seed(0)
model = pl.apply(pl.tiny_llama(), "lora", r=4, alpha=8)
params = [p for p in model.parameters() if p.requires_grad]
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
opt = torch.optim.AdamW(params, lr=1e-2)
engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=params, config=config)
rank = int(os.environ["RANK"])
g = torch.Generator().manual_seed(rank)
losses = []
for step in range(3):
    ids = torch.randint(0, 1000, (2, 16), generator=g)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss); engine.step(); losses.append(loss.item())
w = model.model.layers[0].self_attn.q_proj.base_layer.weight
partitioned = w.ds_tensor.numel() < w.ds_numel   # this rank holds only its partition of the frozen base weight
with deepspeed.zero.GatheredParameters(params):   # the adapters, whole, for saving
    if rank == 0: pl.save_adapter(model, sys.argv[1])
    whole = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
torch.save(whole, f"{sys.argv[1]}/whole-{rank}.pt") if rank == 0 else None
print("RESULT", json.dumps(dict(rank=rank, losses=losses, partitioned=bool(partitioned), local=w.ds_tensor.numel(), whole=w.ds_numel)), flush=True)
