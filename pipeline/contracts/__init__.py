"""What stages write and read: prepared data, artefact identities, pair kinds, export folders, embedding shards."""
