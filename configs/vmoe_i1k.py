# V-MoE on ImageNet-1k: "B/16, E=8, k=2, every 2nd block", top-2 routing with BPR,
# capacity factor 1.05 for training (the paper's pretraining value), eval capacity
# via eval_cf; otherwise the ViT recipe of configs/vit_i1k.py.
#
#   python -m big_vision_lite.train --config configs/vmoe_i1k.py:data_dir=/path/to/tfds \
#       --workdir gs://bucket/vmoe_b16_i1k
#   (fine-tuning-style capacity: ...:cf=1.5,eval_cf=1.5; upcycle a dense ViT:
#    --config.model_init=<dense workdir or .npz> --config.model_load.upcycle=True)
#
#   python -m big_vision_lite.plan --config configs/vmoe_i1k.py --topology v5e:16x16
#   -> mesh data=32 expert=8: each chip holds 1/8 of the experts; arguments (params + Adam
#   state) 0.98 GiB per chip, 1.80 GiB in all of 16 GiB (ep=1 replicates: 3.19 GiB arguments).
#
# Expected: not measured (no ImageNet on this machine). Paper (V-MoE, Riquelme et al. 2021)
# numbers are for JFT-300M pretraining + fine-tuning, not this from-scratch recipe.
"""V-MoE (MoE-ViT) on ImageNet-1k (tfds imagenet2012, prepared by the user under data_dir)."""

from big_vision_lite.config import ConfigDict, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, variant="B/16", res=224, data_dir="", epochs=90.0, batch=1024, workers=32,
                   experts=8, k=2, every=2, last=0, cf=1.05, eval_cf=1.05, bpr=True,
                   router="topk", group_size=0, cap_multiple=4, ep=0)
  c = ConfigDict()
  c.seed = 0
  c.total_epochs = args.epochs

  pp_common = ("|value_range(-1, 1)|onehot(1000, key='label', key_result='labels')"
               "|keep('image', 'labels')")
  c.input = ConfigDict()
  c.input.data = dict(name="imagenet2012", split="train[:99%]", data_dir=args.data_dir or None)
  c.input.batch_size = args.batch
  c.input.num_workers = args.workers
  c.input.pp = f"decode|inception_crop({args.res})|flip_lr|randaug(2, 10)" + pp_common

  c.model_name = "vmoe"
  c.model = dict(variant=args.variant, num_classes=1000, rep_size=True, pool_type="gap",
                 posemb="sincos2d",
                 moe_every=args.every, moe_last=args.last, num_experts=args.experts,
                 num_selected_experts=args.k, router=args.router, capacity_factor=args.cf,
                 eval_capacity_factor=args.eval_cf, bpr=args.bpr,
                 capacity_multiple_of=args.cap_multiple or None,  # vmoe's default 4; 0: exact C
                 importance_weight=0.005,
                 load_weight=0.005, group_size=args.group_size or None)
  c.task = dict(name="classification", loss="softmax_xent", mixup=0.2)

  c.optax_name = "scale_by_adam"
  c.lr = 0.001
  c.wd = 0.0001
  c.schedule = dict(warmup_steps=10_000, decay_type="cosine")
  c.grad_clip_norm = 1.0
  # Expert parallel as vmoe: each expert lives on 1/ep of the chips (`expert` axis, tokens
  # move by all-to-all), the dense rest is replicated over `data`; the batch is split over
  # data x expert. ep=0: one expert per expert-axis slot (ep = experts, needs a device count
  # divisible by it); ep=1 replicates everything (a single device, or fewer chips than experts).
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=args.ep or args.experts)

  pp_eval = f"decode|resize_small({args.res * 8 // 7})|central_crop({args.res})" + pp_common
  c.evals = dict(
      minival=dict(type="classification", pp=pp_eval, log_steps=2500,
                   data=dict(name="imagenet2012", split="train[99%:]", data_dir=args.data_dir or None)),
      val=dict(type="classification", pp=pp_eval, log_steps=2500,
               data=dict(name="imagenet2012", split="validation", data_dir=args.data_dir or None)),
  )
  c.log_training_steps = 50
  c.ckpt_steps = 1000
  c.keep_ckpts = 3
  # A jax.profiler trace of 3 steps after compile and warm-up, in <workdir>/profile.
  c.profile = dict(start_step=10, num_steps=3)
  return c
