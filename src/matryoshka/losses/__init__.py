"""Losses: the Matryoshka classification loss and the fused Matryoshka contrastive losses."""
