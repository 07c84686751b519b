"""A/B experiments: champion against challenger on ground truth, ending in a verdict (issue 35)."""
