"""What the command lines share about flags: mlx_lm lora's own flags, read under their own names."""
