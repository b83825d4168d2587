"""Retrieval: vector indexes over prefixes, the Matryoshka funnel (an index itself), the tuner and the vector databases."""
