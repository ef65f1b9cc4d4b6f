"""borgstorefs: a key/value store library in the borgstore layout, and a FUSE file system on top of it."""

__version__ = "0.1.0"
