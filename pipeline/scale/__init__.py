"""Stage embed-corpus: any corpus in shards, locally or on Ray Data, and its IVF index."""
