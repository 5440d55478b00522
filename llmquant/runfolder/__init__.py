"""Run folders: manifest and persisted plans, block result files, the tensors they describe."""

from llmquant.runfolder.blocks import block_file, load_block, save_block
from llmquant.runfolder.folder import MANIFEST, RunFolder, RunTensors

__all__ = ["MANIFEST", "RunFolder", "RunTensors", "block_file", "load_block", "save_block"]
