"""vitdiag.train in a training loop: DiversePatch losses, a fixed simplex-ETF head, a Tracker.

Run from the repository root: `python docs/train_loop.py` (CPU, seconds). It fine-tunes the tiny
fixture ViT for two steps on the fixture photos and prints the Tracker's history as JSON.
"""

import itertools
import json

import timm.data
import torch
import torch.nn.functional as F
import torchvision

import vitdiag
import vitdiag.train as vt

torch.manual_seed(0)
model = vitdiag.load("fixtures/models/vit_nomix").model.train()  # tiny ViT: 32 px, 4 px patches
vt.install_fixed_etf_head(model)  # frozen simplex ETF, zero bias: logits = s·W h
g = torch.nn.Linear(model.embed_dim, model.num_classes)  # the mixing loss's shared patch head
opt = torch.optim.AdamW([*model.parameters(), *g.parameters()], lr=1e-4)
tracker = vitdiag.Tracker(model, "fixtures/data/train", probes="similarity,classifier", limit=16)
tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
data = torchvision.datasets.ImageFolder("fixtures/data/train", transform=tf)
loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
losses = []
for step, (x, y) in enumerate(itertools.islice(loader, 2)):
    mix = vt.patch_cutmix(x, x.flip(0), model.patch_embed.patch_size)  # x.flip(0)'s patches in
    out = vt.forward_tokens(model, mix.images)  # logits, embed and last-block grid tokens
    ce = F.cross_entropy(out.logits, y, reduction="none")  # the class token's CutMix target:
    ce_b = F.cross_entropy(out.logits, y.flip(0), reduction="none")  # lam·CE_a + (1−lam)·CE_b
    loss = (mix.lam * ce + (1 - mix.lam) * ce_b).mean() + vt.patch_cosine_loss(out.last)
    loss = loss + vt.patch_contrastive_loss(out.first, out.last)  # α₁ = α₂ = α₃ = 1
    loss = loss + vt.patch_mixing_loss(g(out.last), y, y.flip(0), mix.mask)
    opt.zero_grad()
    loss.backward()
    opt.step()
    tracker.step(step)  # P(h) per layer and the head's ETF distance, on 16 fixed images
    losses.append(loss.item())
print(json.dumps({"losses": losses, "history": tracker.history}))
