"""lipdet.train: distributed training of lipdet detectors with Ray Train (TorchTrainer, Train V2)."""
