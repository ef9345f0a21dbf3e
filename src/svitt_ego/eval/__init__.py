"""Downstream tasks: fine-tuning on EK-100 MIR and Charades-Ego (docs/downstream.md)."""
