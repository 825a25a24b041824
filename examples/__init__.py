"""Runnable examples: ``python -m gaman_sync examples.chat:block``."""
