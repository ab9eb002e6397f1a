__version__ = "0.1.0"
# Bumped whenever the layout of a checkpoint or engine dir changes; loads refuse other versions.
FORMAT_VERSION = 1
