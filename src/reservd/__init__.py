"""reservd: an inventory reservation daemon that never oversells."""
__version__ = "0.1.0"
