"""cloudtrain: train Keras models on the cheapest AWS GPU spot instance, with one command."""

__version__ = "0.1.0"
