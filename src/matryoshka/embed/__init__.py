"""Embedding large corpora: the shard file format and the merge of shards."""
