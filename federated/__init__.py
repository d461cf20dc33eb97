"""adaptsim package."""
