"""mgf-sb: MGF multi-granularity self-supervised speech representations for SpeechBrain."""

__version__ = "0.1.0"
