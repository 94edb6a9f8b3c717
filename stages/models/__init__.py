"""Models and what shapes their input and output: the timm factory and model folders (``factory``), checkpoints,
pretrained starts, transforms, device placement, distillation losses, and export."""
