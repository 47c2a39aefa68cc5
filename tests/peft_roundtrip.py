"What the PEFT round-trip tests share: random adapter values and one left-padded batch."
import torch

def perturb(model, seed=0, std=0.1):
    "Give every trainable tensor random, non-trivial values."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad: p.add_(torch.randn(p.shape, generator=g) * std)
    return model

def inputs():
    "Two rows of token ids, the first left-padded by two."
    x = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x); mask[0, :2] = 0   # left padding on one row
    return dict(input_ids=x, attention_mask=mask)
