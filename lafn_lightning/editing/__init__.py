"""The LU-LAFN edit method: prompts, locating, ΔV injection, lower-layer cache, DataModule, LightningModule."""
