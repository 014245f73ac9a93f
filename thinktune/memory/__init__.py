"""GPU memory: one model of it, used by `thinktune estimate`, the pre-flight check, the out-of-memory
message and the runtime planner.

- `shapes`: a model's widths (`ModelShape`), the R1 presets, the cards, and the shared constants
  (CUDA context, allocator slack, workspaces, the fused loss's chunk budget, the planner's margin).
- `activations`: per-path formulas (fast / PEFT) for what a layer keeps, its transients, the loss head.
- `planner`: `plan_memory`, how many layers the fast path recomputes (and lean mode) for a budget.
- `estimate`: `estimate_peak`, the term-by-term peak of a training step or of inference.
- `advice`: config lookup, `preflight`, `oom_hint`, the seed's table and `thinktune estimate`.

Arithmetic only (advice also reads config.json files): nothing here imports torch at module level,
loads weights or trains.
"""
