"""WenLan-style image-text pretraining library (no argparse, no process launching)."""
