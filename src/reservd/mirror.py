"""The Redis mirror (placeholder seam; implemented by the mirror change)."""


class MirrorUnavailable(Exception):
    """The mirror cannot hold a grant now: Redis is unreachable or lagging."""
