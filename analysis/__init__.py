"""What a model knows about genes and what an embedding shows about cells: gene embeddings and programs, attention
networks, in-silico perturbation, clustering and trajectories. Built on the fine-tuning stage's model loading."""
