"""Training: one `macft train` (session.py) sets up and runs the loop (loop.py): its state
(state.py), steps that diverge (divergence.py), the step and its speed stack (step.py,
speed.py), loss (loss.py), lean ops for the backward pass (lean_ops.py, fast_math.py), validation (evaluate.py), schedule, checkpointed
layers (recompute.py), MoE expert load, the memory plan (memory.py, plan.py), progress on
screen, and several Macs (parallel/).
Imports everything before it: config, models, lora, data, runs, cpu."""
