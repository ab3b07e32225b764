"""Trainers, the leaves: one readable trainer per kind of training (pure jitted step + loop)."""
