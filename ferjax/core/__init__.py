"""Shared infrastructure below everything that trains: checkpoints (the one module that talks to
orbax), the device mesh and shardings, and run monitoring (metrics.jsonl, TensorBoard, progress)."""
