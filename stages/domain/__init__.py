"""The domain pieces the commands share: the noise model, the detector, images, metrics, plots."""
