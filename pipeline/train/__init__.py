"""Stage train: LoRA or full fine-tuning with the masked contrastive loss, and the libraries of its loop."""
