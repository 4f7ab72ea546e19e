"""peftbench: compare parameter-efficient fine-tuning methods for CLIP on one frozen backbone."""

__version__ = "0.1.0"
