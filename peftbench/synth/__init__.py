"""The embedded offline world (procedural images and a tiny pretrained CLIP)."""
