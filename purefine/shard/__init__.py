"""Scale out on torchrun + DTensor meshes: FSDP-style sharding, data, tensor and pipeline parallel.

The same pure step runs on one process, on N CPU processes with gloo, and on N GPUs across nodes
with NCCL, launched by ``torchrun``. Sharding is data: a plan maps weight-path regexes to
tensor-parallel styles, and the mesh ``(dp_replicate, dp_shard, tp)`` (plus ``pp`` stages) says
how every tensor is placed.

    layout = pf.shard.layout(cfg.parallel, device)           # torchrun env -> process group + mesh
    params = layout.shard_params(model_cfg, params)          # DTensors (this stage's, under pp)
    step = layout.make_step(model_cfg, opt, trainable=pf.lora.trainable)
    state = pf.train.init(params, opt, trainable=pf.lora.trainable)   # optimizer state sharded alike
    for batch in pf.data.batches(ds, ..., rank=layout.dp_rank, world_size=layout.dp_size):
        state, metrics = step(state, batch)
    full = layout.full_params_for_save(state.params)         # on rank 0; every rank calls it

Modules: ``plan`` (plans, placements, shard / unshard), ``nf4_tp`` (NF4 weights split over
tensor-parallel ranks), ``gather`` (the FSDP gather hook and the tensor-parallel leaf kinds),
``stages`` (which layers and weights each pipeline stage holds), ``pipeline`` (stages and schedules
of ``torch.distributed.pipelining``), ``checkpoint_io`` (sharded loading, gathering for saving),
``layout`` (torchrun, the mesh, the recipe's interface), ``bench`` (``bench_parallel``: tokens/s of
N processes against one; ``python -m purefine.shard.bench``). Resumable state goes through
``torch.distributed.checkpoint`` in ``purefine.checkpoint.state`` (resharded on load).
"""

from purefine.shard.layout import Layout, layout, resolve_sizes
from purefine.shard.stages import StagePlan, owner_stage, plan_stages, stage_ranges

__all__ = [
    "ColumnParallel", "GENERIC_PLAN", "Layout", "RowParallel", "StagePlan", "eval_loss_fn",
    "gather_full", "gather_tensor", "layout", "leaf_placements", "local_nbytes", "make_gather",
    "make_pipeline_step", "make_reader", "owner_stage", "plan_for", "plan_stages", "resolve_sizes", "settle_grads",
    "shard", "stage_ranges", "tensor_placements", "unshard",
]


# Modules over DTensor load on first use: torch.distributed.tensor (with sympy) and
# torch.distributed.pipelining (with torch._dynamo) add ~50-80 MB of resident memory to a process
# that runs on one device, and a run on one process never touches them.
_LAZY = {
    "checkpoint_io": ("gather_full", "make_reader"),
    "gather": ("ColumnParallel", "RowParallel", "gather_tensor", "make_gather", "settle_grads"),
    "plan": ("GENERIC_PLAN", "leaf_placements", "local_nbytes", "plan_for", "shard", "tensor_placements", "unshard"),
    "pipeline": ("eval_loss_fn", "make_pipeline_step"),
}
_OWNER = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    module = _OWNER.get(name)
    if module == "checkpoint_io":
        from purefine.shard import checkpoint_io as loaded
    elif module == "gather":
        from purefine.shard import gather as loaded
    elif module == "plan":
        from purefine.shard import plan as loaded
    elif module == "pipeline":
        from purefine.shard import pipeline as loaded
    else:
        raise AttributeError(f"module 'purefine.shard' has no attribute {name!r}")
    return getattr(loaded, name)
