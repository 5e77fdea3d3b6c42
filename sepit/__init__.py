"""sepit: build, train, sweep, evaluate and serve structure-enhanced protein language models."""

__version__ = "0.1.0"
