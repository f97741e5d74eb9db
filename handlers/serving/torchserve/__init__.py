"""TorchServe as an engine: the handler and its metrics recorder. Imports the serving layer's
common part, never KServe's."""
