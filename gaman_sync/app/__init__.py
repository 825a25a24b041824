"""The GamanJS contract: blocks, what a user defines."""

from .block import Block, define_block

__all__ = ["Block", "define_block"]
