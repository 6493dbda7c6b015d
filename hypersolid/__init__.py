"""hypersolid: immutable Debian systems (kernel + initramfs + squashfs) built by doit."""
__version__ = "0.1.0"
