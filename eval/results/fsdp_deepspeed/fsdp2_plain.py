"""FSDP2 (fully_shard) + peft LoRA on a tiny Llama, CPU/gloo, 2 ranks.
Run: /work/main/.venv/bin/python -m torch.distributed.run --nproc_per_node 2 fsdp2_plain.py
"""
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)

cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)
model = LlamaForCausalLM(cfg)
model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
# make lora_B nonzero so grads of lora_A are nonzero from step 1
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.02)

import copy
ref_model = copy.deepcopy(model)  # unsharded replica to check FSDP's gradient
from torch.distributed.device_mesh import init_device_mesh
mesh = init_device_mesh("cpu", (world,))
for layer in model.base_model.model.model.layers:
    fully_shard(layer, mesh=mesh, reshard_after_forward=True)
fully_shard(model, mesh=mesh, reshard_after_forward=True)

opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
g = torch.Generator().manual_seed(123 + rank)
name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
pA = dict(model.named_parameters())[name]


def p0(*a):
    if rank == 0:
        print(*a, flush=True)


for step in range(3):
    ids = torch.randint(0, 256, (2, 32), generator=g)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    if step == 0:
        p0("param type:", type(pA).__name__, "global shape", tuple(pA.shape), "placements", getattr(pA, "placements", None))
        print(f"[rank{rank}] local param shard shape {tuple(pA.to_local().shape)}; grad type {type(pA.grad).__name__} "
              f"grad global shape {tuple(pA.grad.shape)} local grad shape {tuple(pA.grad.to_local().shape)}", flush=True)
        t = time.perf_counter()
        fullA = pA.full_tensor()
        fullG = pA.grad.full_tensor()
        dt = time.perf_counter() - t
        print(f"[rank{rank}] full_tensor: param {tuple(fullA.shape)} {type(fullA).__name__}, grad {tuple(fullG.shape)}, "
              f"time {dt*1e3:.2f} ms, grad norm {fullG.norm():.6f}", flush=True)
        # sanity: local shard equals the corresponding rows of the full grad
        loc = pA.grad.to_local()
        rows = fullG.shape[0] // world
        p0("local grad == rows of full grad:", torch.allclose(loc, fullG[rank * rows:(rank + 1) * rows]))
        # all LoRA params, full factors + grads per module
        t = time.perf_counter()
        n_lora = 0
        nbytes = 0
        for n, p in model.named_parameters():
            if "lora_" in n:
                f, fg = p.full_tensor(), p.grad.full_tensor()
                n_lora += 1
                nbytes += f.numel() * f.element_size() * 2
        dt = time.perf_counter() - t
        p0(f"full_tensor of all {n_lora} LoRA params + grads: {dt*1e3:.2f} ms, {nbytes} bytes gathered")
        # consistency: is the full grad identical across ranks? (FSDP reduce-scatter averages over ranks)
        # reference: unsharded replica, same per-rank batch, grads all-reduced (mean) like DDP
        ref_model(input_ids=ids, labels=ids).loss.backward()
        rg = dict(ref_model.named_parameters())[name].grad.clone()
        dist.all_reduce(rg); rg /= world
        p0("FSDP full grad == mean over ranks of unsharded grads:", torch.allclose(rg, fullG, atol=1e-7, rtol=1e-4),
           f"max abs diff {(rg-fullG).abs().max():.3e}")
        ref = fullG.clone()
        dist.broadcast(ref, 0)
        p0("full grad identical on all ranks:", torch.equal(ref, fullG))
    opt.step()
    opt.zero_grad()
    p0(f"step {step} loss {out.loss.item():.5f}")

# timing an all-gather of every trainable param (repeated, to estimate cost)
dist.barrier()
t = time.perf_counter()
for _ in range(10):
    for p in model.parameters():
        if p.requires_grad:
            p.full_tensor()
p0(f"10x full_tensor of all trainable params: {(time.perf_counter()-t)*1e3:.1f} ms")
dist.destroy_process_group()
