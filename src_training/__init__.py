"""SLPD region-level self-distillation training (see ../shared/SPEC.md section 2)."""
