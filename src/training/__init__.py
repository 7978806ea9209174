"""Training: DistrustTrainer and the parts it composes (the step's loss and gradients, the loss in
chunks, the distrust objective, the memory pre-flight, several processes)."""
