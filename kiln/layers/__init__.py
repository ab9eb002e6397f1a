"""Building blocks of the reference models; every one knows its tensor-parallel shard."""
