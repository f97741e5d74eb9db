"""KServe's model server as an engine: config, model, server (routes, middleware, errors, CLI),
batching, the explainer pool and its metrics. Imports the serving layer's common part, never TorchServe's."""
