"""firmware_app: real-time int8 inference on point-of-care imaging devices."""

__version__ = "0.1.0"
