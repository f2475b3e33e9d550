"""nearvoice edge: the caching node and the core library shared by every role."""

__version__ = "0.1.0"
