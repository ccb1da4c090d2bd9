"""The reconciler: desired placements vs what engines report, made equal by idempotent calls."""
