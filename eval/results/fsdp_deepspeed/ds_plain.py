"""DeepSpeed ZeRO-{2,3} + peft LoRA on a tiny Llama, CPU accelerator / gloo, 2 ranks.
Run: PYTHONPATH=/work/scratch-fsdp/site /work/main/.venv/bin/python -m torch.distributed.run --nproc_per_node 2 \
         ds_plain.py --stage 2 [--ds-optimizer]
"""
import argparse
import copy
import time

import torch
import deepspeed
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad, safe_get_full_fp32_param, safe_get_local_grad, safe_get_local_fp32_param
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

ap = argparse.ArgumentParser()
ap.add_argument("--stage", type=int, default=2)
ap.add_argument("--post-step-probe", action="store_true", help="stage 2: call safe_get_full_grad after engine.step() (breaks the run)")
ap.add_argument("--ds-optimizer", action="store_true", help="let DeepSpeed build its own AdamW (needs op builds)")
args = ap.parse_args()

torch.set_num_threads(1)
deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)

cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)
model = LlamaForCausalLM(cfg)
model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.02)
ref_model = copy.deepcopy(model)
name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"

ds_config = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": args.stage},
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 1.0,
    "steps_per_print": 1000,
}
params = [p for p in model.parameters() if p.requires_grad]
if args.ds_optimizer:
    ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
else:
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-3), config=ds_config)


def p0(*a):
    if rank == 0:
        print(*a, flush=True)


p0(f"engine {type(engine).__name__}, optimizer {type(opt).__name__} (inner {type(getattr(opt, 'optimizer', None)).__module__}.{type(getattr(opt, 'optimizer', None)).__name__}), zero stage {engine.zero_optimization_stage()}")
pA = dict(engine.module.named_parameters())[name]
g = torch.Generator().manual_seed(123 + rank)
for step in range(3):
    ids = torch.randint(0, 256, (2, 32), generator=g)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    if step == 0:
        print(f"[rank{rank}] param {type(pA).__name__} shape {tuple(pA.shape)} ds_shape {getattr(pA, 'ds_shape', None)} "
              f"ds_tensor {None if not hasattr(pA, 'ds_tensor') else tuple(pA.ds_tensor.shape)} .grad {pA.grad}", flush=True)
        t = time.perf_counter()
        fg = safe_get_full_grad(pA)
        fp = safe_get_full_fp32_param(pA)
        dt = time.perf_counter() - t
        lg = safe_get_local_grad(pA) if args.stage == 3 else None
        print(f"[rank{rank}] after backward, before step: safe_get_full_grad -> "
              f"{None if fg is None else (tuple(fg.shape), f'{fg.norm():.6e}')}; safe_get_full_fp32_param -> "
              f"{None if fp is None else tuple(fp.shape)}; {dt*1e3:.2f} ms; "
              f"safe_get_local_grad(stage3) -> {None if lg is None else tuple(lg.shape)}", flush=True)
        # reference: unsharded replica, mean over ranks (what DDP would give)
        ref_model(input_ids=ids, labels=ids).loss.backward()
        rg = dict(ref_model.named_parameters())[name].grad.clone()
        dist.all_reduce(rg)
        rg /= world
        if fg is not None:
            p0(f"safe_get_full_grad == mean over ranks of unsharded grads: {torch.allclose(rg, fg.float(), atol=1e-7, rtol=1e-4)} "
               f"max abs diff {(rg - fg.float()).abs().max():.3e}")
        ok_all, nlora = True, 0
        for n, p in engine.module.named_parameters():
            if p.requires_grad:
                nlora += 1
                ok_all &= safe_get_full_grad(p) is not None and safe_get_full_fp32_param(p) is not None
        p0(f"all {nlora} trainable params have full grad + full fp32 param: {ok_all}")
    engine.step()
    if step == 0 and (args.stage == 3 or "--post-step-probe" in __import__("sys").argv):
        try:
            fg2 = safe_get_full_grad(pA)
            r = None if fg2 is None else (tuple(fg2.shape), f'{fg2.norm():.6e}')
        except Exception as e:
            r = f"{type(e).__name__}: {e}"
        print(f"[rank{rank}] after engine.step(): safe_get_full_grad -> {r}", flush=True)
    p0(f"step {step} loss {loss.item():.5f}")
dist.barrier()
dist.destroy_process_group()
