"""Library: vector and lexical search, ranking and classification metrics, the bootstrap."""
