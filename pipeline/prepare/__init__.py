"""Stage prepare: raw corpus -> leak-free train/val/test splits and training pairs."""
