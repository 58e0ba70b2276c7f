"""lipdet.eval: clean mAP, PGD / Square attacks and certificates measured on deployed artifacts."""
