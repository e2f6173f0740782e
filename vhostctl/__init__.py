"""vhostctl: drive the Linux vhost-net datapath from Python."""

__version__ = "0.1.0"
