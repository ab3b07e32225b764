"""Trainers (one readable trainer per stage) and the shared pieces they stand on."""
