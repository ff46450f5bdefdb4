"""The image recipe (provision.sh and its requirement files), shipped as package data."""
