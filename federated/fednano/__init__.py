"""FedNano: server-held frozen model, client NanoAdapters, Fisher-guided merging."""
