"""Downstream tasks, one module each: EgoMCQ, EK-100 MIR and Charades-Ego, zero-shot (sharing one clip
embedding, ``embed``) and fine-tuned (one loop, ``finetune``). docs/zero-shot.md, docs/downstream.md."""
