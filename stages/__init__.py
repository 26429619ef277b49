"""The pipeline's stages (shard, extract, train, evaluate, detect) and the domain pieces they use."""
