"""Stage embed: every prepared text file with the trained and the base encoder."""
