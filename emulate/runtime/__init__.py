"""The run path: the contract, the registries, oracles, kernels, merge, the local executor and the one run loop."""
