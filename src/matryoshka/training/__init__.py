"""Training: the image loop (train.py recipes) and text fine-tuning."""
