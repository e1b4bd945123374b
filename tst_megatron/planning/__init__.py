"""The planning model: parameters, memory per GPU and step time of a `pretrain_tst.py` layout.

One concern per module:

- `layout`: the trainer's flag values for a requested layout (``tools/plan.py`` resolves them
  with `run_config.resolve`, the trainer's own validation, for the planned GPU);
- `params`: exact parameter counts from the meta-device model, and what each pipeline stage
  holds;
- `memory`: bytes per GPU of every pipeline stage in each TST phase (weights, gradients,
  optimizer, activations, logits, phase-1 bag inputs);
- `step_time`: step time from the model FLOPs, an assumed MFU and the pipeline bubble;
- `report`: the whole plan as one JSON-ready dict, and its human-readable rendering.

``tools/plan.py`` is the command line over `report.plan_report`; the trainer logs `memory` for
its own layout at start-up (`footprint`).
"""
