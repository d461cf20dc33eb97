"""Federated continual learning: adaptsim's CL strategies inside federated clients."""
