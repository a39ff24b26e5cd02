"""Stage serve: HTTP /embed and /search over an export; one base serving many adapters."""
