"""Evaluation of pretrained encoders: features, kNN, linear evaluation, fine-tuning, reports.

protocols.py: the registry (PROTOCOLS) and dispatcher; pretrained.py: restoring a
checkpoint with its architecture; features.py: the one feature-extraction path;
knn.py: weighted kNN and the kNN protocol; linear.py: linear evaluation;
finetune.py and subsets.py: semi-supervised fine-tuning; reports.py: accuracies,
confusion matrix, results.json; embeddings.py and embedding_map.py: h of a whole split
and its t-SNE/UMAP map (python -m simclr_jax.embed).
"""
