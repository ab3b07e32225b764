"""Models as pure functions of explicit parameter pytrees (Flax Linen init/apply)."""
