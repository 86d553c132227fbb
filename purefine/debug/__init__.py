"""Find out why a run misbehaves: per-layer statistics, a memory breakdown, a step profiler.

- ``layer_stats(cfg, params, batch)``: one forward and backward of the next-token loss with, per
  layer, the RMS, max and NaN/inf count of its output activations (B, T, D) and of their gradients,
  and the norm and NaN/inf count of its parameters' gradients. Where a NaN starts, and whether
  gradients vanish or explode with depth. ``format_layer_stats`` prints it as a table.
- ``memory_breakdown(step, state, batch)``: run one train step and split its peak memory into
  weights, adapters, optimizer state (the trees' storages), and the activations saved for
  backward, gradients and temporaries live at the peak (storages created during the step, counted
  as ops create and free them). The peak is measured independently: CUDA's allocator on a GPU,
  glibc's heap (``mallinfo2``) on a CPU. ``format_memory`` prints it.
- ``StepProfiler(out_dir)``: ``torch.profiler`` over a few steps (one warm-up step, then three),
  written as a Chrome trace (``profile/trace.json``, open in chrome://tracing or Perfetto) with a
  table of the top operators printed and saved (``profile/top_ops.txt``).
- ``TrainHooks``: what the train recipe calls for ``--profile``, ``--debug-stats N`` and
  ``--memory-report``.

The memory accounting follows storages through a ``TorchDispatchMode`` and tells backward kernels
apart with ``torch._C._current_graph_task_id``: private corners of torch, kept to this module.

    stats = pf.debug.layer_stats(cfg, params, batch, trainable=pf.lora.trainable)
    print(pf.debug.format_layer_stats(stats))
    state, metrics, report = pf.debug.memory_breakdown(step, state, batch)
    print(pf.debug.format_memory(report))
"""

from purefine.debug.hooks import StepProfiler, TrainHooks
from purefine.debug.memory import MemoryReport, format_memory, memory_breakdown
from purefine.debug.stats import format_layer_stats, layer_stats

__all__ = ["MemoryReport", "StepProfiler", "TrainHooks", "format_layer_stats", "format_memory", "layer_stats",
           "memory_breakdown"]
