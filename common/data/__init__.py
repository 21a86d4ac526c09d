"""Interaction data: reading logs in their formats, cleaning, the item catalogue, splits and site partitions."""
