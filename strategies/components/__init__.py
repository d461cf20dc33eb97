"""Reusable pieces shared by strategies (heads, prototype classifiers, feature helpers)."""
