"""KServe deployment: the storage layout of KServe's TorchServe runtime and InferenceService manifests."""
